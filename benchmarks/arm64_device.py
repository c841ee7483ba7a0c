"""The device side of benchmarks/arm64_check.py: run a phone artifact on inputs prepared on
the host and write what it computed. It runs twice, on the x86 host and on arm64 under
emulation, with numpy, onnxruntime and onnxruntime_genai only (no edgedistill, transformers
or torch: the arm64 side has only those three wheels).

    python arm64_device.py SPEC.json OUT.json

SPEC lists artifacts: ``{"kind": "classifier", "model": "x.ort", "inputs": "x.npz"}`` (the
logits of every row) or ``{"kind": "generator", "model": "folder", "prompts": [[ids]],
"new_tokens": 16}`` (onnxruntime-genai's greedy tokens after each prompt).
"""

from __future__ import annotations

import json
import platform
import sys

import numpy as np


def classifier(spec: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(spec["model"], providers=["CPUExecutionProvider"])
    arrays = np.load(spec["inputs"])
    names = {i.name for i in session.get_inputs()}
    logits = session.run(None, {k: arrays[k] for k in arrays.files if k in names})[0]
    return {"logits": logits.astype(np.float64).tolist()}


def generator(spec: dict) -> dict:
    import onnxruntime_genai as og

    model = og.Model(spec["model"])
    tokens = []
    for prompt in spec["prompts"]:
        length = len(prompt) + spec["new_tokens"]
        params = og.GeneratorParams(model)
        # greedy, and exactly new_tokens tokens: an early end of text would shorten the check
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        run = og.Generator(model, params)
        run.append_tokens(prompt)
        while not run.is_done():
            run.generate_next_token()
        tokens.append([int(t) for t in run.get_sequence(0)[len(prompt):]])
    return {"tokens": tokens}


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    kinds = {"classifier": classifier, "generator": generator}
    results = {name: kinds[a["kind"]](a) for name, a in spec["artifacts"].items()}
    with open(out_path, "w") as f:
        json.dump({"machine": platform.machine(), "results": results}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
