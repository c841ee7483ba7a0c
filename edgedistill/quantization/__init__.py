"""int8 quantization of an exported ONNX model with onnxruntime, via optimum's ORTQuantizer.

The preset (instruction set, per-channel weights) comes from the hardware profile, so the same
recipe quantizes for the machine it targets. The quantized folder keeps ``ort_config.json``,
the exact settings that made it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from ..bench.profiles import host_isa, load_profile
from ..errors import EdgeDistillError
from ..export import SIDECAR_FILES
from ..runtime import onnx_file

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


def quantize(onnx_dir: str | Path, output_dir: str | Path, profile: str = "cpu",
             preset: str = "auto", per_channel: bool | None = None) -> dict:
    """Dynamic int8 quantization (weights int8 ahead of time, activations at run time)."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    model_file = onnx_file(onnx_dir)
    if model_file is None:
        raise EdgeDistillError(f"{onnx_dir}: no .onnx file to quantize; run the export first")
    try:
        graph_ops = {node.op_type for node in onnx.load(str(model_file), load_external_data=False).graph.node}
    except Exception as e:
        raise EdgeDistillError(f"{model_file}: not a readable ONNX model ({str(e)[:150]}); re-export it")
    already = sorted(graph_ops & QUANTIZED_OPS)
    if already:
        raise EdgeDistillError(
            f"{model_file}: already quantized (has {', '.join(already)}); quantize the fp32 export")
    settings = resolve_preset(profile, preset, per_channel)
    make_config = getattr(AutoQuantizationConfig, settings["preset"])
    qconfig = make_config(is_static=False, per_channel=settings["per_channel"])
    quantizer = ORTQuantizer.from_pretrained(onnx_dir, file_name=model_file.name)
    quantizer.quantize(save_dir=output_dir, quantization_config=qconfig)
    for name in SIDECAR_FILES:
        if (onnx_dir / name).is_file() and not (output_dir / name).is_file():
            shutil.copy2(onnx_dir / name, output_dir / name)
    return {"mode": "dynamic", "profile": profile, **settings}
