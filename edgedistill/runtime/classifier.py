"""Load a saved classifier on its backend (PyTorch or onnxruntime) behind one small interface.

Evaluation, export validation and the benchmark worker all run models through this, so a model
is fed the same inputs whichever backend it is on.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from ..artifacts import backend_of, onnx_file
from ..errors import EdgeDistillError
from .session import check_cpu_only, open_onnx_session


class Predictor:
    """``logits(encoding)`` for a batch of numpy token arrays; ``input_names`` it accepts."""

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
        from transformers import AutoModelForSequenceClassification

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        accepted = inspect.signature(self.model.forward).parameters
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                            if n in accepted]

    def logits(self, encoding):
        with self.torch.inference_mode():
            batch = {k: self.torch.from_numpy(v) for k, v in self.feed(encoding).items()}
            return self.model(**batch).logits.float().numpy()


class OnnxPredictor(Predictor):
    backend = "onnxruntime"

    def __init__(self, folder: Path, threads: int | None = None,
                 providers: list[str] | None = None):
        self.session = open_onnx_session(onnx_file(folder), threads, providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def logits(self, encoding):
        return self.session.run(["logits"], self.feed(encoding))[0]


def load_predictor(folder: str | Path, threads: int | None = None,
                   providers: list[str] | None = None) -> Predictor:
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgeDistillError(f"{folder}: model folder does not exist")
    if backend_of(folder) == "onnxruntime":
        return OnnxPredictor(folder, threads, providers)
    check_cpu_only(folder, providers)
    if not (folder / "config.json").is_file():
        raise EdgeDistillError(f"{folder}: neither an ONNX model nor a saved PyTorch model")
    return TorchPredictor(folder, threads)
