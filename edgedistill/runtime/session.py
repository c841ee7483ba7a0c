"""An onnxruntime session opened the one way every runner opens it, and the rule that
PyTorch models run on the CPU here."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeDistillError


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


def check_cpu_only(folder: Path, providers: list[str] | None) -> None:
    """PyTorch models run on the CPU here: refuse a profile that asks for another device
    rather than label CPU numbers as that device's."""
    other = [p for p in providers or [] if p != "CPUExecutionProvider"]
    if other:
        raise EdgeDistillError(f"{folder}: a PyTorch model runs on the CPU here; profiles with "
                               f"{', '.join(other)} measure ONNX models only")
