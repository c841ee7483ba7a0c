"""Time greedy generations of one causal LM in a fresh process:
``python -m edgedistill.bench.generation_worker SPEC OUT``.

The spec carries the prompt as token ids, so this process never imports a tokenizer, and an
ONNX model runs on onnxruntime alone (see :mod:`edgedistill.runtime.causal_lm`): its memory is what a
deployment would use.
"""

from __future__ import annotations

import functools
import json
import sys
import time

from edgedistill.bench.worker import measured_load, write_result


def _generate(lm, prompt, new_tokens: int, np) -> tuple[float, list[float], float]:
    """One greedy generation of exactly ``new_tokens`` tokens, EOS or not, so every model and
    every run times the same work: the first token comes from the prefill (time to first
    token, picking the token included), each further one from a decode step with the cache."""
    clock = time.perf_counter
    start = clock()
    logits, state = lm.prefill(prompt)
    token = int(np.argmax(logits))
    ttft = clock() - start
    steps = []
    for _ in range(new_tokens - 1):
        t0 = clock()
        logits, state = lm.step(token, state)
        token = int(np.argmax(logits))
        steps.append(clock() - t0)
    return ttft, steps, clock() - start


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    import numpy as np

    from ..runtime.causal_lm import load_causal_lm

    # an onnxruntime-genai Generator allocates its cache for the whole generation up front
    length = len(spec["prompt_ids"]) + spec["new_tokens"]
    lm, load = measured_load(functools.partial(load_causal_lm, max_length=length), spec)

    prompt = np.asarray([spec["prompt_ids"]], dtype=np.int64)
    n = spec["new_tokens"]
    first_ttft = _generate(lm, prompt, n, np)[0]  # the cold first generation, also a warm-up
    for _ in range(spec["warmup"] - 1):
        _generate(lm, prompt, n, np)
    ttft, steps, totals = [], [], []
    for _ in range(spec["iterations"]):
        t, s, total = _generate(lm, prompt, n, np)
        ttft.append(t)
        steps.append(s)
        totals.append(total)

    write_result(out_path, {
        "backend": lm.backend,
        **load,
        "first_ttft_s": first_ttft,
        "ttft_seconds": ttft,
        "step_seconds": steps,
        "total_seconds": totals,
        "imported": sorted({"torch", "transformers", "optimum"} & set(sys.modules)),
    })


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
