"""An onnxruntime session and an OpenVINO compiled model, each opened the one way every runner
opens it, and the rule that PyTorch models run on the CPU here."""

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


# OpenVINO's CPU plugin computes in bf16 by default on CPUs with AVX-512 BF16 or AMX, so an
# "fp32" model silently runs in bf16 there: the precision is always set, never left to the host
OPENVINO_PRECISIONS = ("f32", "bf16")


def check_openvino_precision(precision: str, where: str) -> str:
    if precision not in OPENVINO_PRECISIONS:
        raise EdgeDistillError(f"{where}: OpenVINO precision '{precision}' is unknown; valid: "
                               f"{', '.join(OPENVINO_PRECISIONS)}")
    return precision


def open_openvino_model(model, threads: int | None = None, precision: str = "f32"):
    """An OpenVINO model (an IR file's path, or a model in memory) compiled for the CPU for
    latency (one stream, one request at a time) on ``threads`` threads, computing in
    ``precision``, with a load failure worded as a user-fixable error."""
    import openvino as ov

    where = str(model) if isinstance(model, Path) else "OpenVINO model"
    check_openvino_precision(precision, where)
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
              "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        return ov.Core().compile_model(str(model) if isinstance(model, Path) else model, "CPU",
                                       config)
    except Exception as e:  # OpenVINO raises RuntimeError with a multi-line C++ trace
        raise EdgeDistillError(
            f"{where}: OpenVINO cannot load this model ({str(e).splitlines()[0][:200]}); "
            "quantize it again with runtime openvino")


def check_cpu_only(folder: Path, providers: list[str] | None,
                   what: str = "a PyTorch model") -> None:
    """PyTorch and OpenVINO models run on the CPU here: refuse a profile that asks for another
    device rather than label CPU numbers as that device's."""
    other = [p for p in providers or [] if p != "CPUExecutionProvider"]
    if other:
        raise EdgeDistillError(f"{folder}: {what} runs on the CPU here; profiles with "
                               f"{', '.join(other)} measure onnxruntime models only")
