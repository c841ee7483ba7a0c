"""ONNX export through optimum's exporter, checked against PyTorch on real inputs.

Classifiers are checked on their logits; causal LMs (exported with their KV cache) on their
full-sequence logits and on greedy generation, which is what a deployment runs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from .errors import EdgeDistillError
from .runtime import OnnxPredictor, TorchPredictor

log = logging.getLogger(__name__)

# Files a deployment needs next to the graph: the tokenizer, the label names, and for a causal
# LM its generation defaults (eos, pad) and chat template.
SIDECAR_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json", "tokenizer.model", "merges.txt",
                 "generation_config.json", "chat_template.jinja")


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


def export_onnx(model_dir: str | Path, output_dir: str | Path, opset: int = 17,
                atol: float = 1e-4, texts: list[str] | None = None,
                max_length: int = 128) -> dict:
    """Export the PyTorch model in ``model_dir`` to ``output_dir/model.onnx``.

    The exported graph is run on ``texts`` (real inputs, not random ids) next to PyTorch; the
    largest logit difference must stay within ``atol`` (a causal LM must also generate the same
    greedy tokens, see ``validate_causal_onnx``). Returns that validation record.
    """
    from optimum.exporters.onnx import main_export

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if not (model_dir / "config.json").is_file():
        raise EdgeDistillError(f"{model_dir}: not a saved model (no config.json)")
    task = infer_task(model_dir)
    try:
        # optimum's own validation feeds random token ids; we validate on real text below.
        main_export(str(model_dir), output_dir, task=task, opset=opset,
                    library_name="transformers", do_validation=False)
    except (ValueError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0][:300]
        raise EdgeDistillError(f"{model_dir}: the ONNX exporter cannot export this model ({msg})")
    for name in SIDECAR_FILES:
        if (model_dir / name).is_file() and not (output_dir / name).is_file():
            shutil.copy2(model_dir / name, output_dir / name)
    if task == CAUSAL_TASK:
        return validate_causal_onnx(model_dir, output_dir, atol, texts, max_length)
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


def causal_logits(session, encoding: dict[str, np.ndarray]) -> np.ndarray:
    """Full-sequence logits of an exported causal LM run by onnxruntime with an empty KV cache.

    The graph always takes ``past_key_values.*``; a first step feeds them with a zero-length
    sequence axis. Position ids count the attended tokens, as transformers does for left pads.
    """
    input_ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    mask = np.asarray(encoding.get("attention_mask", np.ones_like(input_ids)), dtype=np.int64)
    feed = {"input_ids": input_ids, "attention_mask": mask}
    for inp in session.get_inputs():
        if inp.name == "position_ids":
            feed["position_ids"] = np.clip(mask.cumsum(-1) - 1, 0, None)
        elif inp.name.startswith("past_key_values"):
            # [batch, kv_heads, past_len, head_dim]: named axes other than the batch are empty
            shape = [d if isinstance(d, int) else (len(input_ids) if i == 0 else 0)
                     for i, d in enumerate(inp.shape)]
            dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
            feed[inp.name] = np.zeros(shape, dtype=dtype)
    return session.run(["logits"], feed)[0]


def validate_causal_onnx(model_dir: Path, onnx_dir: Path, atol: float,
                         texts: list[str] | None = None, max_length: int = 128,
                         new_tokens: int = 16) -> dict:
    """Check a causal-LM export two ways, raising on a mismatch.

    (a) logits over each full text (empty cache) within ``atol`` of PyTorch: the prompt pass;
    (b) ``new_tokens`` greedy tokens from the first text identical in PyTorch and ONNX: the
    decode passes, which read and extend the KV cache, so a broken cache shows here even when
    (a) passes.
    """
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, onnx_dir = Path(model_dir), Path(onnx_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = texts or ["This medicine worked well for me.", "Terrible side effects, I stopped."]
    torch_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    worst = 0.0
    for text in texts:
        enc = dict(tokenizer(text, truncation=True, max_length=max_length, return_tensors="np"))
        with torch.inference_mode():
            a = torch_model(**{k: torch.from_numpy(v) for k, v in enc.items()
                               if k in ("input_ids", "attention_mask")}).logits.float().numpy()
        worst = max(worst, float(np.abs(a - causal_logits(session, enc)).max()))
    del session
    if worst > atol:
        raise EdgeDistillError(
            f"{onnx_dir}: ONNX logits differ from PyTorch by {worst:.2e} > atol {atol:.0e}; "
            "raise export.atol if that is acceptable or try another export.opset")

    prompt = tokenizer(texts[0], truncation=True, max_length=max_length, return_tensors="pt")
    prompt = {k: v for k, v in prompt.items() if k in ("input_ids", "attention_mask")}
    n = prompt["input_ids"].shape[1]
    greedy = dict(do_sample=False, max_new_tokens=new_tokens, num_beams=1,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                  else tokenizer.eos_token_id)
    with torch.inference_mode():
        expected = torch_model.generate(**prompt, **greedy)[0, n:].tolist()
        onnx_model = ORTModelForCausalLM.from_pretrained(onnx_dir, use_cache=True)
        got = onnx_model.generate(**prompt, **greedy)[0, n:].tolist()
    record = {"max_abs_diff": worst, "atol": atol, "samples": len(texts),
              "greedy_tokens_match": expected == got, "greedy_tokens": got[:8],
              "new_tokens": new_tokens}
    if expected != got:
        step = next((i for i, (x, y) in enumerate(zip(expected, got)) if x != y),
                    min(len(expected), len(got)))
        with torch.inference_mode():  # a near-tie in PyTorch's own logits explains a flip
            ids = torch.tensor([prompt["input_ids"][0].tolist() + expected[:step]])
            top2 = torch_model(input_ids=ids).logits[0, -1].float().topk(2).values
        raise EdgeDistillError(
            f"{onnx_dir}: greedy generation differs from PyTorch at new token {step} "
            f"(PyTorch {expected[step:step + 4]}, ONNX {got[step:step + 4]}; PyTorch's top-2 "
            f"logit gap there is {float(top2[0] - top2[1]):.1e}); a gap near the logit diff "
            f"{worst:.1e} is a tie, so validate with another first text, otherwise the KV "
            "cache path is broken: try another export.opset")
    log.info("ONNX causal LM validated: max |diff| %.2e on %d texts, %d greedy tokens match",
             worst, len(texts), len(got))
    return record
