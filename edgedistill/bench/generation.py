"""Generation benchmark for causal LMs: time to first token, time per output token, tokens
per second and memory, each model greedy-decoding a fixed prompt in its own fresh process.

Every generation runs exactly ``new_tokens`` tokens whatever the model predicts (EOS is
ignored), so models that would stop early are timed on the same work as the others.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeDistillError
from ..profiles import Target, check_available, resolve_target
from .roofline import roofline_estimate
from .runner import SAMPLE_TEXT, check_model_dirs, memory_figures, results, run_worker, take_turns
from .stats import Latency


@dataclass
class GenerationSettings:
    prompt_tokens: int = 128  # prompt length when built from text (given prompt ids are kept)
    new_tokens: int = 32  # tokens per generation: 1 from the prefill + new_tokens - 1 steps
    warmup: int = 1  # untimed generations per process (the first, cold one always runs)
    iterations: int = 5  # timed generations per process (per round)
    rounds: int = 3
    poll_interval_s: float = 0.001  # the parent reads the child's RSS every millisecond


def _check_settings(s: GenerationSettings) -> None:
    if s.new_tokens < 2:
        raise EdgeDistillError(f"new_tokens: {s.new_tokens} leaves no decode step to time (the "
                               "first token comes from the prefill); set new_tokens >= 2")
    for name in ("prompt_tokens", "iterations", "rounds"):
        if getattr(s, name) < 1:
            raise EdgeDistillError(f"{name}: must be at least 1, got {getattr(s, name)}")


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _prompt_from_text(model_dir: Path, text: str, n: int) -> list[int]:
    """``n`` token ids of ``text`` (repeated as often as needed) by the model's own tokenizer;
    tokenized here in the parent so the worker process never loads a tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise EdgeDistillError(f"{model_dir}: no tokenizer to build the prompt with "
                               f"({str(e).splitlines()[0][:120]}); save the tokenizer next to "
                               "the model or pass prompt_ids")
    ids = list(tokenizer(text, verbose=False)["input_ids"])
    more = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if not more:
        raise EdgeDistillError(f"{model_dir}: the prompt text has no tokens; pass another text")
    while len(ids) < n:
        ids += more
    return ids[:n]


def _check_prompt(model_dir: Path, prompt: list[int], s: GenerationSettings) -> None:
    config = _config(model_dir)
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if limit and len(prompt) + s.new_tokens > limit:
        raise EdgeDistillError(
            f"prompt_tokens + new_tokens: {len(prompt)} + {s.new_tokens} exceeds the {limit} "
            f"positions of {model_dir}; lower them to sum to <= {limit}")
    vocab = config.get("vocab_size")
    if vocab and max(prompt) >= vocab:
        raise EdgeDistillError(f"prompt_ids: token {max(prompt)} is outside the {vocab}-token "
                               f"vocabulary of {model_dir}; pass ids of this model's tokenizer")


def _run_once(model_dir: Path, profile: Target, s: GenerationSettings,
              prompt: list[int]) -> dict:
    spec = {"model_dir": str(model_dir), "threads": profile.threads,
            "providers": list(profile.providers), "prompt_ids": prompt,
            "new_tokens": s.new_tokens, "warmup": s.warmup, "iterations": s.iterations}
    return run_worker("edgedistill.bench.generation_worker", spec, model_dir, profile,
                      s.poll_interval_s)


def _summarise(model_dir: Path, runs: list[dict], profile: Target, s: GenerationSettings,
               prompt: list[int]) -> dict:
    """Pool every timed generation of every round; keep each round's p50 time per token to
    show the drift between rounds."""
    ttft = [t for r in runs for t in r["ttft_seconds"]]
    steps = [t for r in runs for g in r["step_seconds"] for t in g]
    tpot = Latency.from_seconds(steps)
    # the prefill (the prompt's pass) is the part a roofline of the graph describes; a decode
    # step's cost depends on the cache's length
    first = Latency.from_seconds(ttft)
    roofline = {"roofline": roofline_estimate(model_dir, first.p50_ms,
                                              profile, 1, len(prompt))
                } if runs[0]["backend"] == "onnxruntime" else {}
    return {
        "backend": runs[0]["backend"],
        "profile": profile.name,
        "threads": profile.threads,
        "prompt_tokens": len(prompt),
        "new_tokens": s.new_tokens,
        "rounds": len(runs),
        "generations": len(ttft),
        "ttft_ms": first.to_dict(),
        "tpot_ms": tpot.to_dict(),
        "decode_tokens_per_s": 1000.0 / tpot.p50_ms,
        "tokens_per_s": statistics.median(s.new_tokens / t
                                          for r in runs for t in r["total_seconds"]),
        "round_tpot_p50_ms": [Latency.from_seconds([t for g in r["step_seconds"] for t in g])
                              .p50_ms for r in runs],
        "first_ttft_ms": statistics.median(r["first_ttft_s"] for r in runs) * 1000,
        **memory_figures(model_dir, runs),
        **roofline,
    }


def benchmark_generation(models: list[str | Path], profile: Target | str = "cpu",
                         prompt_ids: list[int] | None = None,
                         settings: GenerationSettings | None = None,
                         text: str | None = None, progress: bool = True) -> list[dict]:
    """Greedy-generation figures of each saved causal LM (PyTorch or ONNX folder).

    The prompt is ``prompt_ids`` as given, or ``settings.prompt_tokens`` tokens of ``text``
    (a sample review by default) by each model's tokenizer. Models take turns, one fresh
    process each, for ``settings.rounds`` rounds (A B C A B C).
    """
    s = settings or GenerationSettings()
    _check_settings(s)
    profile = resolve_target(profile)
    check_available(profile)
    dirs = check_model_dirs(models)
    if prompt_ids is not None and len(prompt_ids) == 0:
        raise EdgeDistillError("prompt_ids: empty; pass at least one token id or leave it out")
    prompts = {d: list(map(int, prompt_ids)) if prompt_ids is not None
               else _prompt_from_text(d, text or SAMPLE_TEXT, s.prompt_tokens) for d in dirs}
    for d in dirs:
        _check_prompt(d, prompts[d], s)
    runs, over = take_turns(dirs, s.rounds, lambda d: _run_once(d, profile, s, prompts[d]),
                            "generation benchmark", progress)
    return results(dirs, runs, over, profile,
                   lambda d, r: _summarise(d, r, profile, s, prompts[d]))


__all__ = ["GenerationSettings", "benchmark_generation"]
