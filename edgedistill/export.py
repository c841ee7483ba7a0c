"""ONNX export through optimum's exporter, checked against PyTorch on real inputs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from .errors import EdgeDistillError
from .runtime import OnnxPredictor, TorchPredictor

log = logging.getLogger(__name__)

# Files a deployment needs next to the graph: the tokenizer and the label names.
SIDECAR_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json", "tokenizer.model", "merges.txt")


# Architecture-name suffix -> optimum export task (optimum cannot infer it for a local folder).
# Only classifiers so far: validation compares their logits (causal LMs come with issue #4).
TASKS = {"ForSequenceClassification": "text-classification"}


def infer_task(model_dir: Path) -> str:
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    for arch in architectures:
        for suffix, task in TASKS.items():
            if arch.endswith(suffix):
                return task
    raise EdgeDistillError(
        f"{model_dir}: cannot export {', '.join(architectures) or 'a model without architectures'}"
        f"; edgedistill exports {', '.join('*' + s for s in TASKS)} models")


def export_onnx(model_dir: str | Path, output_dir: str | Path, opset: int = 17,
                atol: float = 1e-4, texts: list[str] | None = None,
                max_length: int = 128) -> dict:
    """Export the PyTorch model in ``model_dir`` to ``output_dir/model.onnx``.

    The exported graph is run on ``texts`` (real inputs, not random ids) next to PyTorch; the
    largest logit difference must stay within ``atol``. Returns that validation record.
    """
    from optimum.exporters.onnx import main_export

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if not (model_dir / "config.json").is_file():
        raise EdgeDistillError(f"{model_dir}: not a saved model (no config.json)")
    try:
        # optimum's own validation feeds random token ids; we validate on real text below.
        main_export(str(model_dir), output_dir, task=infer_task(model_dir), opset=opset,
                    library_name="transformers", do_validation=False)
    except (ValueError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0][:300]
        raise EdgeDistillError(f"{model_dir}: the ONNX exporter cannot export this model ({msg})")
    for name in SIDECAR_FILES:
        if (model_dir / name).is_file() and not (output_dir / name).is_file():
            shutil.copy2(model_dir / name, output_dir / name)
    return validate_onnx(model_dir, output_dir, atol, texts, max_length)


def validate_onnx(model_dir: Path, onnx_dir: Path, atol: float,
                  texts: list[str] | None = None, max_length: int = 128) -> dict:
    """Compare ONNX and PyTorch logits on ``texts``; raise when they differ by more than atol."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = texts or ["This medicine worked well for me.", "Terrible side effects, I stopped."]
    torch_model, onnx_model = TorchPredictor(model_dir), OnnxPredictor(onnx_dir)
    worst, agree = 0.0, 0
    for text in texts:
        enc = dict(tokenizer(text, truncation=True, max_length=max_length, return_tensors="np"))
        a, b = torch_model.logits(enc), onnx_model.logits(enc)
        worst = max(worst, float(np.abs(a - b).max()))
        agree += int(a.argmax(-1)[0] == b.argmax(-1)[0])
    record = {"max_abs_diff": worst, "atol": atol, "samples": len(texts),
              "argmax_agreement": agree / len(texts)}
    if worst > atol:
        raise EdgeDistillError(
            f"{onnx_dir}: ONNX logits differ from PyTorch by {worst:.2e} > atol {atol:.0e}; "
            "raise export.atol if that is acceptable or try another export.opset")
    log.info("ONNX export validated: max |diff| %.2e on %d texts", worst, len(texts))
    return record
