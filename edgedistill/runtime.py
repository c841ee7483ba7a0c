"""Load a saved classifier on its backend (PyTorch or onnxruntime) behind one small interface.

Evaluation, export validation and the benchmark worker all run models through this, so a model
is fed the same inputs whichever backend it is on.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from .errors import EdgeDistillError

# the settings file of a PyTorch model packed by Intel Neural Compressor (quantization.weight_only)
WEIGHT_ONLY_SETTINGS = "weight_only.json"


def onnx_file(folder: Path) -> Path | None:
    """The ONNX file in ``folder`` (quantized models keep optimum's ``model_quantized.onnx``)."""
    files = sorted(Path(folder).glob("*.onnx"))
    return files[0] if files else None


def backend_of(folder: Path) -> str:
    return "onnxruntime" if onnx_file(folder) is not None else "pytorch"


def open_onnx_session(path: Path, threads: int | None = None,
                      providers: list[str] | None = None):
    """An onnxruntime session on ``threads`` intra-op threads (one inter-op thread: these
    graphs run sequentially), with a load failure worded as a user-fixable error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise EdgeDistillError(
            f"{path}: onnxruntime cannot load this model ({str(e).splitlines()[0][:200]}); "
            "re-export it with `edgedistill export`")


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


def check_cpu_only(folder: Path, providers: list[str] | None) -> None:
    """PyTorch models run on the CPU here: refuse a profile that asks for another device
    rather than label CPU numbers as that device's."""
    other = [p for p in providers or [] if p != "CPUExecutionProvider"]
    if other:
        raise EdgeDistillError(f"{folder}: a PyTorch model runs on the CPU here; profiles with "
                               f"{', '.join(other)} measure ONNX models only")


def size_on_disk_mb(folder: str | Path) -> float:
    """Size of the weights a device has to ship (model files, not tokenizer or configs)."""
    folder = Path(folder)
    onnx = onnx_file(folder)
    if onnx is not None:  # the graph and its external weights, if it has any
        files = [onnx, *folder.glob(onnx.name + "_data")]
    else:
        files = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
    return sum(f.stat().st_size for f in files) / 1e6
