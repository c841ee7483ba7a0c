"""Benchmark one model inside a fresh process: ``python -m edgedistill.bench.worker SPEC OUT``.

The parent tokenizes and passes token ids, so this process imports only the runtime the model
needs (onnxruntime alone for ONNX models) and its memory is what a deployment would use.
"""

from __future__ import annotations

import json
import os
import sys
import time

from edgedistill.artifacts import write_atomic


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def high_water_mb() -> float:
    """The kernel's peak RSS of this process image (VmHWM). Not getrusage's ru_maxrss: Linux
    carries that over fork and exec, so a child of a big parent would report the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6  # KiB -> MB, like the polled figure
    return 0.0


def measured_load(load, spec: dict):
    """``load(model_dir, threads=, providers=)``; the model and the load's time and memory."""
    before = rss_mb()
    t0 = time.perf_counter()
    model = load(spec["model_dir"], threads=spec["threads"], providers=spec["providers"])
    return model, {"load_s": time.perf_counter() - t0, "rss_before_load_mb": before,
                   "rss_after_load_mb": rss_mb()}


def write_result(out_path: str, result: dict) -> None:
    """Write the result whole or not at all: the parent treats a missing file as a failure.
    The kernel's memory high-water mark and the cores the process ran on go with it (so
    pinning is checked, not assumed)."""
    result = {**result, "maxrss_mb": high_water_mb()}
    if hasattr(os, "sched_getaffinity"):
        result["cores"] = sorted(os.sched_getaffinity(0))
    write_atomic(out_path, json.dumps(result))


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    import numpy as np

    from ..runtime.classifier import load_predictor

    predictor, load = measured_load(load_predictor, spec)

    fixed = {k: np.asarray(v, dtype=np.int64) for k, v in spec["fixed_input"].items()}
    t0 = time.perf_counter()
    predictor.logits(fixed)
    first_s = time.perf_counter() - t0

    for _ in range(spec["warmup"]):
        predictor.logits(fixed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < spec["iterations"] or time.perf_counter() - start < spec["min_seconds"]:
        t0 = time.perf_counter()
        predictor.logits(fixed)
        times.append(time.perf_counter() - t0)

    real_times: list[float] = []
    real = [{k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
            for enc in spec["real_inputs"]]
    for enc in real[:3]:  # shapes change from row to row: warm the shape-dependent paths once
        predictor.logits(enc)
    for enc in real:
        t0 = time.perf_counter()
        predictor.logits(enc)
        real_times.append(time.perf_counter() - t0)

    write_result(out_path, {
        "backend": predictor.backend,
        **({"inference_precision": predictor.computes_in()} if predictor.backend == "openvino"
           else {}),
        **load,
        "first_inference_s": first_s,
        "fixed_seconds": times,
        "real_seconds": real_times,
        "real_lengths": [int(enc["input_ids"].shape[1]) for enc in real],
    })


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
