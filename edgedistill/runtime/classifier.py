"""Load a saved classifier, sentence embedder or question answerer on its backend (PyTorch,
onnxruntime or OpenVINO) behind one small interface.

Evaluation, export validation and the benchmark worker all run models through this, so a model
is fed the same inputs whichever backend it is on.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np

from ..artifacts import OPENVINO_SETTINGS, backend_of, onnx_file, openvino_file
from ..errors import EdgeDistillError
from ..pooling import DENSE, attach_dense, pool, read_pooling
from .session import check_cpu_only, open_onnx_session, open_openvino_model

# the output of an exported sentence embedder (its pooling runs inside the graph)
EMBEDDING_OUTPUT = "sentence_embedding"
# the outputs of a question answerer: a score per token for the answer's first and last token
SPAN_OUTPUTS = ("start_logits", "end_logits")


class Predictor:
    """``logits(encoding)`` for a batch of numpy token arrays (a classifier's logits, per text
    or per token; an embedder's sentence embeddings; a question answerer's start and end
    logits stacked as (batch, 2, tokens), so that argmax(-1) is the span); ``input_names`` it
    accepts."""

    backend: str
    input_names: list[str]

    def logits(self, encoding: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def feed(self, encoding: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.int64) for k, v in encoding.items()
                if k in self.input_names}


class TorchPredictor(Predictor):
    backend = "pytorch"

    def __init__(self, folder: Path, threads: int | None = None):
        import torch
        from transformers import (
            AutoModel,
            AutoModelForQuestionAnswering,
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
        )

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        # a sentence embedder is its encoder (no head) followed by its pooling; a token
        # classifier gives logits per token, a question answerer two per token
        self.pooling = read_pooling(folder)
        heads = {"ForTokenClassification": AutoModelForTokenClassification,
                 "ForQuestionAnswering": AutoModelForQuestionAnswering}
        architectures = json.loads((folder / "config.json").read_text()).get("architectures")
        auto = AutoModel if self.pooling else next(
            (heads[h] for a in architectures or [] for h in heads if a.endswith(h)),
            AutoModelForSequenceClassification)
        self.model = auto.from_pretrained(folder).eval()
        if self.pooling:
            attach_dense(self.model, self.pooling, folder)
        accepted = inspect.signature(self.model.forward).parameters
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                            if n in accepted]

    def logits(self, encoding):
        with self.torch.inference_mode():
            batch = {k: self.torch.from_numpy(v) for k, v in self.feed(encoding).items()}
            out = self.model(**batch)
            if self.pooling:
                return pool(out.last_hidden_state, batch["attention_mask"], self.pooling,
                            getattr(self.model, DENSE, None)).float().numpy()
            if "start_logits" in out:
                return self.torch.stack([out[n] for n in SPAN_OUTPUTS], 1).float().numpy()
            return out.logits.float().numpy()


class OnnxPredictor(Predictor):
    backend = "onnxruntime"

    def __init__(self, folder: Path, threads: int | None = None,
                 providers: list[str] | None = None):
        self.session = open_onnx_session(onnx_file(folder), threads, providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.outputs = ([EMBEDDING_OUTPUT] if EMBEDDING_OUTPUT in outputs else
                        list(SPAN_OUTPUTS) if SPAN_OUTPUTS[0] in outputs else ["logits"])

    def logits(self, encoding):
        out = self.session.run(self.outputs, self.feed(encoding))
        return np.stack(out, 1) if len(out) > 1 else out[0]


class OpenVinoPredictor(Predictor):
    """An OpenVINO model on the CPU, computing in the precision its quantization wrote into
    its folder (``openvino_config.json``; f32 when absent), so evaluation and benchmark run it
    alike."""

    backend = "openvino"

    def __init__(self, folder: Path, threads: int | None = None,
                 providers: list[str] | None = None):
        check_cpu_only(folder, providers, "an OpenVINO model")
        settings = folder / OPENVINO_SETTINGS
        precision = (json.loads(settings.read_text()).get("inference_precision", "f32")
                     if settings.is_file() else "f32")
        self.compiled = open_openvino_model(openvino_file(folder), threads, precision)
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output = self.compiled.output("logits")

    def logits(self, encoding):
        return self.request.infer(self.feed(encoding))[self.output].copy()

    def computes_in(self) -> str:
        """The precision the compiled model computes in, read back from OpenVINO ('f32')."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()


def load_predictor(folder: str | Path, threads: int | None = None,
                   providers: list[str] | None = None) -> Predictor:
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgeDistillError(f"{folder}: model folder does not exist")
    backend = backend_of(folder)
    if backend == "onnxruntime":
        return OnnxPredictor(folder, threads, providers)
    if backend == "openvino":
        return OpenVinoPredictor(folder, threads, providers)
    check_cpu_only(folder, providers)
    if not (folder / "config.json").is_file():
        raise EdgeDistillError(f"{folder}: neither an ONNX model nor a saved PyTorch model")
    return TorchPredictor(folder, threads)
