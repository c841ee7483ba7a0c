"""ONNX export through optimum's exporter, checked against PyTorch on real inputs.

Classifiers are checked on their logits; causal LMs (exported with their KV cache) on their
full-sequence logits and on greedy generation, which is what a deployment runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from .artifacts import copy_sidecars
from .errors import EdgeDistillError
from .progress import silenced
from .runtime.causal_lm import load_causal_lm
from .runtime.classifier import OnnxPredictor, TorchPredictor

log = logging.getLogger(__name__)

# Architecture-name suffix -> optimum export task (optimum cannot infer it for a local folder).
# Causal LMs are exported with their KV cache (past_key_values.* in, present.* out): without it
# every generated token would recompute the whole prefix.
CAUSAL_TASK = "text-generation-with-past"
TASKS = {"ForSequenceClassification": "text-classification", "ForCausalLM": CAUSAL_TASK}


def infer_task(model_dir: Path) -> str:
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    for arch in architectures:
        for suffix, task in TASKS.items():
            if arch.endswith(suffix):
                return task
    raise EdgeDistillError(
        f"{model_dir}: cannot export {', '.join(architectures) or 'a model without architectures'}"
        f"; edgedistill exports {', '.join('*' + s for s in TASKS)} models")


def export_onnx(model_dir: str | Path, output_dir: str | Path, opset: int | None = None,
                atol: float = 1e-4, texts: list[str] | None = None,
                max_length: int = 128) -> dict:
    """Export the PyTorch model in ``model_dir`` to ``output_dir/model.onnx``.

    The exported graph is run on ``texts`` (real inputs, not random ids) next to PyTorch; the
    largest logit difference must stay within ``atol`` (a causal LM must also generate the same
    greedy tokens, see ``validate_causal_onnx``). Returns that validation record with the
    opset used (``None`` asks for the exporter's recommendation for the architecture).
    """
    from optimum.exporters.onnx import main_export

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if not (model_dir / "config.json").is_file():
        raise EdgeDistillError(f"{model_dir}: not a saved model (no config.json)")
    task = infer_task(model_dir)
    try:
        with _harmless_export_notices():
            # optimum's own validation feeds random token ids; we validate on real text below
            main_export(str(model_dir), output_dir, task=task, opset=opset,
                        library_name="transformers", do_validation=False)
    except (ValueError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0][:300]
        raise EdgeDistillError(f"{model_dir}: the ONNX exporter cannot export this model ({msg})")
    copy_sidecars(model_dir, output_dir)
    validate = validate_causal_onnx if task == CAUSAL_TASK else validate_onnx
    return {**validate(model_dir, output_dir, atol, texts, max_length),
            "opset": _opset_of(output_dir / "model.onnx")}


def _opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _harmless_export_notices():
    """Every export printed these; none is the user's to act on: torch's notice that the
    TorchScript exporter (the one optimum drives) is legacy, the tracer's note that
    transformers' mask code makes constants (their values do not depend on the input),
    transformers' rename of the ``torch_dtype`` argument optimum still passes, and the
    exporter's caution that advanced indexing with negative indices would export wrongly (the
    graph is checked against PyTorch on real inputs right after, which is what it asks for)."""
    with warnings.catch_warnings(), silenced("transformers.configuration_utils", "torch_dtype"):
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        yield


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


def validate_causal_onnx(model_dir: Path, onnx_dir: Path, atol: float,
                         texts: list[str] | None = None, max_length: int = 128,
                         new_tokens: int = 16) -> dict:
    """Check a causal-LM export two ways, raising on a mismatch.

    (a) logits over each full text (empty cache) within ``atol`` of PyTorch: the prompt pass;
    (b) ``new_tokens`` greedy tokens from the first text identical in PyTorch and ONNX: the
    decode passes, which read and extend the KV cache, so a broken cache shows here even when
    (a) passes. Both models run through :mod:`edgedistill.runtime.causal_lm`, as evaluation and the
    benchmark run them.
    """
    from transformers import AutoTokenizer

    model_dir, onnx_dir = Path(model_dir), Path(onnx_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = texts or ["This medicine worked well for me.", "Terrible side effects, I stopped."]
    torch_lm, onnx_lm = load_causal_lm(model_dir), load_causal_lm(onnx_dir)
    encode = lambda text: np.asarray(  # noqa: E731
        [tokenizer(text, truncation=True, max_length=max_length)["input_ids"]], dtype=np.int64)
    worst = max(float(np.abs(torch_lm.logits(encode(t)) - onnx_lm.logits(encode(t))).max())
                for t in texts)
    if worst > atol:
        raise EdgeDistillError(
            f"{onnx_dir}: ONNX logits differ from PyTorch by {worst:.2e} > atol {atol:.0e}; "
            "raise export.atol if that is acceptable or try another export.opset")

    prompt = encode(texts[0])
    expected = torch_lm.greedy(prompt, new_tokens)
    got = onnx_lm.greedy(prompt, new_tokens)
    record = {"max_abs_diff": worst, "atol": atol, "samples": len(texts),
              "greedy_tokens_match": expected == got, "greedy_tokens": got[:8],
              "new_tokens": new_tokens}
    if expected != got:
        step = next((i for i, (x, y) in enumerate(zip(expected, got)) if x != y),
                    min(len(expected), len(got)))
        # a near-tie in PyTorch's own logits explains a flip
        last = torch_lm.logits(np.concatenate([prompt[0], expected[:step]])[None])[0, -1]
        top2 = np.sort(last)[-2:]
        raise EdgeDistillError(
            f"{onnx_dir}: greedy generation differs from PyTorch at new token {step} "
            f"(PyTorch {expected[step:step + 4]}, ONNX {got[step:step + 4]}; PyTorch's top-2 "
            f"logit gap there is {float(top2[1] - top2[0]):.1e}); a gap near the logit diff "
            f"{worst:.1e} is a tie, so validate with another first text, otherwise the KV "
            "cache path is broken: try another export.opset")
    log.info("ONNX causal LM validated: max |diff| %.2e on %d texts, %d greedy tokens match",
             worst, len(texts), len(got))
    return record
