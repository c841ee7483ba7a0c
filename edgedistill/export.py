"""ONNX export through optimum's exporter, checked against PyTorch on real inputs.

Classifiers are checked on their logits, sentence embedders (their pooling added to the
graph) on their embeddings; causal LMs (exported with their KV cache) on their full-sequence
logits and on greedy generation, which is what a deployment runs.
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
from .pooling import Pooling, dense_weights, require_pooling
from .progress import silenced
from .runtime.causal_lm import load_causal_lm
from .runtime.classifier import EMBEDDING_OUTPUT, OnnxPredictor, TorchPredictor

log = logging.getLogger(__name__)

# Architecture-name suffix -> optimum export task (optimum cannot infer it for a local folder).
# Causal LMs are exported with their KV cache (past_key_values.* in, present.* out): without it
# every generated token would recompute the whole prefix.
CAUSAL_TASK = "text-generation-with-past"
# a bare encoder ("BertModel") is exported as a sentence embedder: its folder must say how it
# pools (edgedistill.pooling)
EMBEDDING_TASK = "feature-extraction"
TASKS = {"ForSequenceClassification": "text-classification", "ForCausalLM": CAUSAL_TASK,
         "ForTokenClassification": "token-classification",
         "ForQuestionAnswering": "question-answering", "Model": EMBEDDING_TASK}


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
    pooling = require_pooling(model_dir, "export") if task == EMBEDDING_TASK else None
    try:
        with _harmless_export_notices():
            # optimum's own validation feeds random token ids; we validate on real text below
            main_export(str(model_dir), output_dir, task=task, opset=opset,
                        library_name="transformers", do_validation=False)
    except (ValueError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0][:300]
        raise EdgeDistillError(f"{model_dir}: the ONNX exporter cannot export this model ({msg})")
    if pooling is not None:
        add_pooling(output_dir / "model.onnx", pooling,
                    dense_weights(model_dir) if pooling.dense else None)
    copy_sidecars(model_dir, output_dir)
    validate = validate_causal_onnx if task == CAUSAL_TASK else validate_onnx
    return {**validate(model_dir, output_dir, atol, texts, max_length),
            "opset": _opset_of(output_dir / "model.onnx")}


def _opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return _default_opset(model)


def _default_opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def add_pooling(path: Path, pooling: Pooling, dense=None) -> None:
    """Append ``pooling`` (as :func:`edgedistill.pooling.pool` computes it) to an encoder
    graph exported for feature extraction, so that the graph maps token ids to the sentence
    embedding (output ``sentence_embedding``) and replaces ``last_hidden_state`` as output.
    ``dense`` is the Dense layer's (weight, bias) (:func:`edgedistill.pooling.dense_weights`)
    when the pooling names one.

    Written by hand: optimum's feature-extraction export stops at the token states, and
    sentence-transformers' own ONNX route pools outside the graph, in Python; a phone app that
    loads only onnxruntime needs the pooling inside."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph, opset = model.graph, _default_opset(model)
    nodes, consts = [], []

    def const(name: str, value) -> str:
        consts.append(numpy_helper.from_array(np.asarray(value), f"pool/{name}"))
        return f"pool/{name}"

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"pool/{name}"], f"pool/{name}", **attrs))
        return f"pool/{name}"

    def reduce_sum(x: str, name: str, keepdims: int = 0, axis: int = 1) -> str:
        # ReduceSum's axes are an input from opset 13 on
        if opset >= 13:
            return node("ReduceSum", [x, const(f"{name}_axes", np.array([axis], np.int64))],
                        name, keepdims=keepdims)
        return node("ReduceSum", [x], name, axes=[axis], keepdims=keepdims)

    hidden = "last_hidden_state"
    if pooling.mode == "cls":
        out = node("Gather", [hidden, const("first", np.array(0, np.int64))], "cls", axis=1)
    else:
        mask = node("Cast", ["attention_mask"], "mask", to=TensorProto.FLOAT)
        if opset >= 13:
            mask = node("Unsqueeze", [mask, const("last", np.array([-1], np.int64))], "mask3")
        else:
            mask = node("Unsqueeze", [mask], "mask3", axes=[-1])
        total = reduce_sum(node("Mul", [hidden, mask], "masked"), "sum")
        count = node("Max", [reduce_sum(mask, "count"),
                             const("tiny", np.array(1e-9, np.float32))], "count_min")
        out = node("Div", [total, count], "mean")
    if pooling.dense:
        weight, bias = dense
        out = node("MatMul", [out, const("dense_weight", weight.T.astype(np.float32))], "dense")
        if bias is not None:
            out = node("Add", [out, const("dense_bias", bias.astype(np.float32))], "dense_added")
        if pooling.activation == "tanh":
            out = node("Tanh", [out], "dense_tanh")
    if pooling.normalize:
        # the norm as sqrt(sum(x^2)): onnxruntime's symbolic shape inference (which int8 fusion
        # runs) does not see through ReduceL2 (nor ReduceMax) with their axes as an input
        squares = reduce_sum(node("Mul", [out, out], "squares"), "sum_squares", keepdims=1,
                             axis=-1)
        norm = node("Max", [node("Sqrt", [squares], "l2"),
                            const("eps", np.array(1e-12, np.float32))], "l2_min")
        out = node("Div", [out, norm], "normalized")
    nodes.append(helper.make_node("Identity", [out], [EMBEDDING_OUTPUT], "pool/output"))
    width = next(o for o in graph.output if o.name == hidden).type.tensor_type.shape.dim[2]
    width = pooling.dense or width.dim_value or width.dim_param or "width"
    graph.node.extend(nodes)
    graph.initializer.extend(consts)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT,
                                                      ["batch_size", width]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


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
        agree += int((a.argmax(-1) == b.argmax(-1)).all())  # per text, or every token
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
