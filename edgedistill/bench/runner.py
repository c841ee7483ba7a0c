"""Run each model's benchmark in a fresh subprocess and collect latency and memory figures.

A fresh process per model keeps one model's allocator state, thread pools and caches from
colouring the next one's numbers. The parent polls the child's resident memory from outside;
the child reports the kernel's high-water mark, and the report keeps both.

The process, polling, turn-taking and memory machinery here (:func:`run_worker`,
:func:`take_turns`, :func:`memory_figures`) is shared with the generation benchmark.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..artifacts import size_on_disk_mb
from ..errors import EdgeDistillError
from ..host import usable_cores
from ..profiles import Target, check_available, resolve_target
from ..progress import Bar
from .roofline import roofline_estimate
from .stats import Latency

SAMPLE_TEXT = ("The medication helped with my pain within a week, although the first days brought "
               "headaches and some nausea that faded later. ") * 8


@dataclass
class BenchSettings:
    warmup: int = 10
    iterations: int = 50
    min_seconds: float = 2.0
    batch_size: int = 1
    sequence_length: int = 128
    real_length_samples: int = 64
    max_length: int = 128
    rounds: int = 3
    poll_interval_s: float = 0.001  # the parent reads the child's RSS every millisecond


class OverBudget(EdgeDistillError):
    """A model's process grew past its profile's memory budget and was stopped."""


class _PeakRss(threading.Thread):
    """Poll a process's resident set size from outside until it exits; past ``budget_mb``
    (0: none) kill it, as a phone's low-memory killer would, instead of letting it swap."""

    def __init__(self, child: subprocess.Popen, interval: float, budget_mb: float = 0):
        super().__init__(daemon=True)
        self.child, self.budget_mb, self.over = child, budget_mb, False
        self.path, self.interval, self.peak_mb = f"/proc/{child.pid}/statm", interval, 0.0
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with open(self.path) as f:
                    rss = int(f.read().split()[1]) * self.page / 1e6
            except (OSError, IndexError, ValueError):
                return
            self.peak_mb = max(self.peak_mb, rss)
            if self.budget_mb and rss > self.budget_mb:
                self.over = True
                self.child.kill()
                return
            time.sleep(self.interval)


def check_model_dirs(models: list[str | Path]) -> list[Path]:
    """The model folders as paths, each an existing saved model (a config.json beside it)."""
    dirs = [Path(m) for m in models]
    for d in dirs:
        if not d.is_dir():
            raise EdgeDistillError(f"{d}: model folder does not exist")
        if not (d / "config.json").is_file():
            raise EdgeDistillError(f"{d}: not a saved model (no config.json); pass a folder "
                                   "written by save_pretrained, edgedistill export or quantize")
    return dirs


def run_worker(module: str, spec: dict, model_dir: Path, profile: Target,
               poll_interval_s: float) -> dict:
    """``python -m module SPEC OUT`` in a fresh process under ``profile``'s constraints: OMP/MKL
    threads, the cores it is pinned to, its memory budget (see :func:`constraints`). Its
    resident memory is polled from outside; returns the worker's JSON result plus
    ``polled_peak_mb``. A worker past the budget raises :class:`OverBudget`; any other failure
    becomes an error naming ``model_dir`` and the last line the worker printed."""
    threads, cores = profile.threads, pinned_cores(profile)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        child = subprocess.Popen([sys.executable, "-m", module, str(spec_path), str(out_path)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, preexec_fn=pin)
        poll = _PeakRss(child, poll_interval_s, profile.memory_budget_mb)
        poll.start()
        _, err = child.communicate()
        poll.stop.set()
        poll.join()
        if poll.over:
            raise OverBudget(f"{model_dir}: over the {profile.memory_budget_mb} MB memory budget "
                             f"of profile '{profile.name}' (stopped at {poll.peak_mb:.0f} MB)")
        if child.returncode != 0 or not out_path.is_file():
            last = (err or "").strip().splitlines()[-1:] or ["no output"]
            raise EdgeDistillError(f"{model_dir}: benchmark process failed ({last[0][:200]})")
        raw = json.loads(out_path.read_text())
    raw["polled_peak_mb"] = poll.peak_mb
    return raw


def pinned_cores(profile: Target) -> list[int]:
    """The host cores a profile's processes are pinned to: the first ``cpu_affinity`` of those
    this process may use (all of them when the host has fewer), or none for no pinning."""
    if not profile.cpu_affinity or not hasattr(os, "sched_getaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))[:profile.cpu_affinity]


def constraints(profile: Target) -> dict:
    """What a profile run on this host actually constrained, for the report: a profile that
    asks for more cores than the host has runs on fewer, and says so."""
    host = usable_cores()
    cores = pinned_cores(profile)
    record = {"target": profile.device or "this host", "host_cores": host,
              "threads": profile.threads, "pinned_cores": cores,
              "memory_budget_mb": profile.memory_budget_mb or None}
    if profile.cpu_affinity and profile.cpu_affinity > host:
        record["note"] = (f"profile asks for {profile.cpu_affinity} cores, this host has {host}: "
                          "measured on fewer cores than the target has")
    return record


def take_turns(dirs: list[Path], rounds: int, run_one: Callable[[Path], dict], desc: str,
               progress: bool) -> tuple[dict[Path, list[dict]], dict[Path, str]]:
    """``run_one(model)`` for every model, round after round (A B C A B C): a slow spell of a
    shared machine then falls on every model alike instead of on whichever happened to run in
    it, which keeps the ratios between models steadier. A model over its memory budget drops
    out of later rounds; returns the runs and, for such models, why they stopped."""
    runs: dict[Path, list[dict]] = {d: [] for d in dirs}
    over: dict[Path, str] = {}
    with Bar(desc, rounds * len(dirs), show=progress) as bar:
        for _ in range(rounds):
            for d in dirs:
                bar.update(status="/".join(d.parts[-2:]))
                if d not in over:
                    try:
                        runs[d].append(run_one(d))
                    except OverBudget as e:
                        over[d] = str(e)
                bar.advance()
    return runs, over


def results(dirs: list[Path], runs: dict[Path, list[dict]], over: dict[Path, str],
            profile: Target, summarise: Callable[[Path, list[dict]], dict]) -> list[dict]:
    """One result per model: its summary, or what is known of a model over its budget."""
    out = []
    for d in dirs:
        common = {"path": str(d), "constraints": constraints(profile)}
        if d in over:
            out.append({**common, "profile": profile.name, "over_budget": over[d],
                        "size_mb": size_on_disk_mb(d)})
        else:
            out.append({**common, **summarise(d, runs[d])})
    return out


def memory_figures(model_dir: Path, runs: list[dict]) -> dict:
    """Load time, memory and size over the runs of one model: peak RSS is the larger of the
    polled and the kernel's figure (polling can miss a short spike, VmHWM cannot)."""
    return {
        "cores": runs[0].get("cores"),
        "load_s": statistics.median(r["load_s"] for r in runs),
        "peak_rss_mb": max(max(r["polled_peak_mb"], r["maxrss_mb"]) for r in runs),
        "peak_rss_polled_mb": max(r["polled_peak_mb"] for r in runs),
        "peak_rss_kernel_mb": max(r["maxrss_mb"] for r in runs),
        "rss_runtime_mb": statistics.median(r["rss_before_load_mb"] for r in runs),
        "rss_after_load_mb": statistics.median(r["rss_after_load_mb"] for r in runs),
        "size_mb": size_on_disk_mb(model_dir),
    }


def _inputs(model_dir: Path, texts: list[str], s: BenchSettings) -> tuple[dict, list[dict]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    limit = config.get("max_position_embeddings")
    if limit and s.sequence_length > limit:
        raise EdgeDistillError(
            f"bench.sequence_length: {s.sequence_length} exceeds the {limit} positions of "
            f"{model_dir}; set bench.sequence_length <= {limit}")
    batch = (texts * s.batch_size)[: s.batch_size]
    fixed = tokenizer(batch, padding="max_length", truncation=True,
                      max_length=s.sequence_length, return_tensors="np")
    real = [tokenizer(t, truncation=True, max_length=s.max_length, return_tensors="np")
            for t in texts[: s.real_length_samples]]
    as_lists = lambda enc: {k: v.tolist() for k, v in enc.items()}  # noqa: E731
    return as_lists(fixed), [as_lists(e) for e in real]


def _run_once(model_dir: Path, profile: Target, s: BenchSettings, fixed: dict,
              real: list[dict]) -> dict:
    """One fresh worker process for one model; its raw timings and memory readings."""
    spec = {"model_dir": str(model_dir), "threads": profile.threads,
            "providers": list(profile.providers), "warmup": s.warmup,
            "iterations": s.iterations, "min_seconds": s.min_seconds,
            "fixed_input": fixed, "real_inputs": real}
    return run_worker("edgedistill.bench.worker", spec, model_dir, profile, s.poll_interval_s)


def _summarise(model_dir: Path, runs: list[dict], profile: Target, s: BenchSettings) -> dict:
    """Pool the timed runs of every round; keep each round's p50 to show the drift."""
    fixed = [t for r in runs for t in r["fixed_seconds"]]
    real = [t for r in runs for t in r["real_seconds"]]
    result = {
        "backend": runs[0]["backend"],
        "profile": profile.name,
        "threads": profile.threads,
        "batch_size": s.batch_size,
        "sequence_length": s.sequence_length,
        "rounds": len(runs),
        "latency": Latency.from_seconds(fixed, s.batch_size).to_dict(),
        "round_p50_ms": [Latency.from_seconds(r["fixed_seconds"]).p50_ms for r in runs],
        "first_inference_ms": statistics.median(r["first_inference_s"] for r in runs) * 1000,
        **memory_figures(model_dir, runs),
    }
    if "inference_precision" in runs[0]:
        result["inference_precision"] = runs[0]["inference_precision"]
    # an ONNX graph to count operations and bytes in (an OpenVINO model computes what its
    # onnxruntime int8 twin does: no second estimate)
    if result["backend"] == "onnxruntime":
        result["roofline"] = roofline_estimate(model_dir, result["latency"]["p50_ms"], profile,
                                               s.batch_size, s.sequence_length)
    if real:
        lengths = runs[0]["real_lengths"]
        result["latency_real_lengths"] = Latency.from_seconds(real).to_dict()
        result["real_length_mean"] = sum(lengths) / len(lengths)
    return result


def benchmark(models: list[str | Path], profile: Target | str = "cpu",
              texts: list[str] | None = None, settings: BenchSettings | None = None,
              progress: bool = True) -> list[dict]:
    """Latency (batch x sequence length, and real text lengths one by one), load time, first
    inference, peak memory and size of each saved model (PyTorch or ONNX folder). Without
    ``settings``, the defaults at the profile's input shape.

    Models take turns, one fresh process each, for ``settings.rounds`` rounds (A B C A B C;
    see :func:`take_turns`).
    """
    profile = resolve_target(profile)
    s = settings or BenchSettings(batch_size=profile.batch_size,
                                  sequence_length=profile.sequence_length)
    check_available(profile)
    dirs = check_model_dirs(models)
    inputs = {d: _inputs(d, texts or [SAMPLE_TEXT], s) for d in dirs}
    runs, over = take_turns(dirs, s.rounds, lambda d: _run_once(d, profile, s, *inputs[d]),
                            "benchmark", progress)
    return results(dirs, runs, over, profile, lambda d, r: _summarise(d, r, profile, s))


def benchmark_model(model_dir: str | Path, profile: Target | str = "cpu",
                    texts: list[str] | None = None,
                    settings: BenchSettings | None = None) -> dict:
    """:func:`benchmark` for a single model."""
    return benchmark([model_dir], profile, texts, settings, progress=False)[0]


__all__ = ["BenchSettings", "benchmark", "benchmark_model"]
