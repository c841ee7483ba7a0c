"""int8 quantization of an exported ONNX model with onnxruntime, via optimum's ORTQuantizer.

The preset (instruction set, per-channel weights) comes from the hardware profile, so the same
recipe quantizes for the machine it targets. The quantized folder keeps ``ort_config.json``,
the exact settings that made it. int4 weight-only quantization (for causal LMs) is in ``int4``.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from ..bench.profiles import host_isa, load_profile
from ..errors import EdgeDistillError
from ..export import copy_sidecars
from ..runtime import onnx_file
from .int4 import quantize_int4  # noqa: F401  (re-exported: edgedistill.quantization.quantize_int4)

PRESETS = ("avx512_vnni", "avx512", "avx2", "arm64")
# Operators that only appear in a graph that is already quantized.
QUANTIZED_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
                 "MatMulNBits", "QAttention", "DynamicQuantizeMatMul"}


def resolve_preset(profile: str = "cpu", preset: str = "auto",
                   per_channel: bool | None = None) -> dict:
    """The concrete preset for ``profile``: 'auto' becomes the host's best instruction set."""
    settings = dict(load_profile(profile).quantization)
    if preset != "auto":
        settings["preset"] = preset
    if per_channel is not None:
        settings["per_channel"] = per_channel
    if settings.get("preset", "auto") == "auto":
        settings["preset"] = host_isa()
    if settings["preset"] not in PRESETS:
        raise EdgeDistillError(
            f"quantize.preset: '{settings['preset']}' is unknown; valid: auto, {', '.join(PRESETS)}")
    settings.setdefault("per_channel", True)
    return settings


CALIBRATIONS = ("minmax", "entropy", "percentile")


def fp32_graph(model_file: Path) -> onnx.GraphProto:
    """The graph of ``model_file`` (weights not loaded), refused when unreadable or already
    quantized: quantizing again would stack a second rounding on the first."""
    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception as e:
        raise EdgeDistillError(f"{model_file}: not a readable ONNX model ({str(e)[:150]}); re-export it")
    already = sorted({node.op_type for node in graph.node} & QUANTIZED_OPS)
    if already:
        raise EdgeDistillError(
            f"{model_file}: already quantized (has {', '.join(already)}); quantize the fp32 export")
    return graph


def quantize(onnx_dir: str | Path, output_dir: str | Path, profile: str = "cpu",
             preset: str = "auto", per_channel: bool | None = None, mode: str = "dynamic",
             calibration_texts: list[str] | None = None, calibration: str = "minmax",
             max_length: int = 128, nodes_to_exclude: list[str] | None = None,
             operators: list[str] | None = None) -> dict:
    """int8 quantization of the ONNX model in ``onnx_dir``.

    ``dynamic``: weights int8 ahead of time, activation ranges measured at run time.
    ``static``: activation ranges too are fixed ahead of time (QDQ format), calibrated by
    running the fp32 model on ``calibration_texts`` (the task's own training texts, never the
    test split) and reading each tensor's range with ``minmax``, ``entropy`` (KL-optimal
    threshold, as TensorRT does) or ``percentile`` (99.999th). ``nodes_to_exclude`` stay fp32.
    ``operators`` are the ONNX operator types quantized: by default optimum's set in dynamic
    mode and MatMul alone in static mode, where quantizing the Adds would also quantize the
    attention mask (values near -3.4e38, which no int8 scale and no calibration histogram can
    hold) and every residual sum.
    """
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    model_file = onnx_file(onnx_dir)
    if model_file is None:
        raise EdgeDistillError(f"{onnx_dir}: no .onnx file to quantize; run the export first")
    graph = fp32_graph(model_file)
    if mode not in ("dynamic", "static"):
        raise EdgeDistillError(f"quantize.mode: '{mode}' is unknown; valid: dynamic, static")
    settings = resolve_preset(profile, preset, per_channel)
    make_config = getattr(AutoQuantizationConfig, settings["preset"])
    if operators is None and mode == "static":
        operators = ["MatMul"]
    qconfig = make_config(is_static=mode == "static", per_channel=settings["per_channel"],
                          nodes_to_exclude=list(nodes_to_exclude or []),
                          operators_to_quantize=operators)
    quantizer = ORTQuantizer.from_pretrained(onnx_dir, file_name=model_file.name)
    record = {"mode": mode, "profile": profile, **settings,
              "operators": list(qconfig.operators_to_quantize)}
    ranges = None
    if mode == "static":
        dataset = _calibration_set(onnx_dir, {i.name for i in graph.input}, calibration_texts,
                                   max_length)
        output_dir.mkdir(parents=True, exist_ok=True)
        ranges = quantizer.fit(dataset=dataset, calibration_config=_calibration_config(
            calibration, dataset), operators_to_quantize=qconfig.operators_to_quantize,
            onnx_augmented_model_name=output_dir / "augmented.onnx.tmp")
        (output_dir / "augmented.onnx.tmp").unlink(missing_ok=True)
        record.update(calibration=calibration, calibration_samples=len(dataset))
    quantizer.quantize(save_dir=output_dir, quantization_config=qconfig,
                       calibration_tensors_range=ranges)
    copy_sidecars(onnx_dir, output_dir)
    return record


def _calibration_set(onnx_dir: Path, inputs: set[str], texts: list[str] | None,
                     max_length: int):
    """The calibration texts tokenized as the model's inputs, one text per batch."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    if not texts:
        raise EdgeDistillError("quantize.mode static needs calibration texts (the pipeline "
                               "passes training texts); pass calibration_texts=[...]")
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    # one common length: the histogram calibrators (entropy, percentile) stack the tensors of
    # all batches, so shapes must agree; the longest text sets it (attention masks the pads)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True)
    return Dataset.from_dict({k: v for k, v in encoded.items() if k in inputs})


def _calibration_config(method: str, dataset):
    from optimum.onnxruntime.configuration import AutoCalibrationConfig

    if method == "minmax":
        return AutoCalibrationConfig.minmax(dataset)
    if method == "entropy":
        return AutoCalibrationConfig.entropy(dataset)
    if method == "percentile":
        return AutoCalibrationConfig.percentiles(dataset, percentile=99.999)
    raise EdgeDistillError(f"quantize.calibration: '{method}' is unknown; "
                           f"valid: {', '.join(CALIBRATIONS)}")
