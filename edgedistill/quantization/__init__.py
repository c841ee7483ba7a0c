"""int8 quantization of an exported ONNX model with onnxruntime, via optimum's ORTQuantizer.

The preset (instruction set, per-channel weights, reduce_range, activation and weight types,
QDQ or QOperator) comes from the hardware profile, so the same recipe quantizes for the machine
it targets. Before quantizing, encoder graphs are fused by onnxruntime's transformer optimizer
(attention, layer norms, GELU), so the attention runs as one integer QAttention in both
modes. The quantized folder keeps ``ort_config.json``, the exact settings that made it. int4
weight-only quantization (for causal LMs) is in ``int4``.
"""

from __future__ import annotations

import collections
import json
import shutil
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


# Fused operators onnxruntime quantizes dynamically only (its IntegerOps registry alone has a
# form for them): static mode gives them a dynamic pass after the static one.
DYNAMIC_ONLY = ("Attention",)


# What a profile's ``quantization`` block may set beyond ``preset`` and ``per_channel``, and the
# values each takes. Left out, optimum's preset decides (e.g. reduce_range on for avx2, whose
# u8 x s8 multiply-add can saturate 16-bit sums with full-range weights).
PRESET_OPTIONS = {"reduce_range": (True, False), "format": ("QDQ", "QOperator"),
                  "activations": ("uint8", "int8"), "weights": ("int8", "uint8"),
                  "fuse": (True, False), "fp16": (True, False)}


def resolve_preset(profile: str = "cpu", preset: str = "auto",
                   per_channel: bool | None = None, fuse: bool | None = None) -> dict:
    """The concrete preset for ``profile``: 'auto' becomes the host's best instruction set;
    ``preset``, ``per_channel`` and ``fuse`` (not None) override the profile's."""
    settings = dict(load_profile(profile).quantization)
    overrides = {"preset": None if preset == "auto" else preset, "per_channel": per_channel,
                 "fuse": fuse}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings.get("preset", "auto") == "auto":
        settings["preset"] = host_isa()
    if settings["preset"] not in PRESETS:
        raise EdgeDistillError(
            f"quantize.preset: '{settings['preset']}' is unknown; valid: auto, {', '.join(PRESETS)}")
    for key, value in settings.items():
        if key in PRESET_OPTIONS and value not in PRESET_OPTIONS[key]:
            raise EdgeDistillError(
                f"profile '{profile}': quantization.{key} '{value}' is invalid; valid: "
                f"{', '.join(map(str, PRESET_OPTIONS[key]))}")
        if key not in PRESET_OPTIONS and key not in ("preset", "per_channel"):
            raise EdgeDistillError(
                f"profile '{profile}': quantization.{key} is unknown; valid: preset, "
                f"per_channel, {', '.join(PRESET_OPTIONS)}")
    settings.setdefault("per_channel", True)
    settings.setdefault("fuse", True)
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
             calibration_texts: list[str] | None = None, calibration: str = "percentile",
             max_length: int = 128, nodes_to_exclude: list[str] | None = None,
             operators: list[str] | None = None, fuse: bool | None = None) -> dict:
    """int8 quantization of the ONNX model in ``onnx_dir``.

    ``dynamic``: weights int8 ahead of time, activation ranges measured at run time.
    ``static``: activation ranges too are fixed ahead of time (QDQ format), calibrated by
    running the fp32 model on ``calibration_texts`` (the task's own training texts, never the
    test split) and reading each tensor's range with ``minmax``, ``entropy`` (KL-optimal
    threshold, as TensorRT does) or ``percentile`` (99.999th). ``nodes_to_exclude`` stay fp32.
    ``operators`` are the ONNX operator types quantized: by default optimum's set in dynamic
    mode and MatMul and the fused Attention in static mode, where quantizing the Adds would
    also quantize the attention mask (values near -3.4e38, which no int8 scale and no
    calibration histogram can hold) and every residual sum.
    ``fuse`` (None: the profile's, on by default) first fuses an encoder's graph with
    onnxruntime's transformer optimizer (:func:`fuse_graph`); node names then are the fused
    graph's. onnxruntime's static quantizers have no form for the fused Attention (its Q, K, V
    projection would stay fp32), so in static mode a second, dynamic pass makes it the integer
    ``QAttention`` (its input range measured at run time, as in dynamic mode): on the default
    student, static percentile was 0.94x dynamic int8's p50 at 1.02x fp32's macro-F1, where
    static QDQ of the unfused graph was 1.23x (benchmarks/results/quantization.md, 3 seeds).
    The profile's preset options (:data:`PRESET_OPTIONS`) apply on top of optimum's preset.
    """
    from optimum.onnxruntime import ORTQuantizer

    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    model_file = onnx_file(onnx_dir)
    if model_file is None:
        raise EdgeDistillError(f"{onnx_dir}: no .onnx file to quantize; run the export first")
    graph = fp32_graph(model_file)
    if mode not in ("dynamic", "static"):
        raise EdgeDistillError(f"quantize.mode: '{mode}' is unknown; valid: dynamic, static")
    qconfig, settings = int8_config(profile, preset, per_channel, fuse, mode, nodes_to_exclude,
                                    operators)
    output_dir.mkdir(parents=True, exist_ok=True)
    fused_dir = output_dir / "fused.tmp"
    record = {"mode": mode, "profile": profile, **settings,
              "operators": list(qconfig.operators_to_quantize),
              "nodes_to_exclude": list(nodes_to_exclude or []),
              "fused": fuse_graph(onnx_dir, model_file, fused_dir) if settings["fuse"] else None}
    source = fused_dir if record["fused"] else onnx_dir
    quantizer = ORTQuantizer.from_pretrained(source, file_name=onnx_file(source).name)
    if mode == "dynamic":
        quantizer.quantize(save_dir=output_dir, quantization_config=qconfig)
    else:
        # only a fused graph has operators without a static form
        dynamic_ops = [o for o in qconfig.operators_to_quantize
                       if o in DYNAMIC_ONLY and record["fused"]]
        qconfig.operators_to_quantize = [o for o in qconfig.operators_to_quantize
                                         if o not in DYNAMIC_ONLY]
        dataset = _calibration_set(onnx_dir, {i.name for i in graph.input}, calibration_texts,
                                   max_length)
        ranges = quantizer.fit(dataset=dataset, calibration_config=_calibration_config(
            calibration, dataset), operators_to_quantize=qconfig.operators_to_quantize,
            onnx_augmented_model_name=output_dir / "augmented.onnx.tmp")
        (output_dir / "augmented.onnx.tmp").unlink(missing_ok=True)
        record.update(calibration=calibration, calibration_samples=len(dataset))
        staged = output_dir / "static.tmp" if dynamic_ops else output_dir
        quantizer.quantize(save_dir=staged, quantization_config=qconfig,
                           calibration_tensors_range=ranges)
        if dynamic_ops:
            _dynamic_pass(staged, output_dir, dynamic_ops, profile, preset, per_channel,
                          nodes_to_exclude)
        record["dynamic_operators"] = dynamic_ops
    shutil.rmtree(fused_dir, ignore_errors=True)
    copy_sidecars(onnx_dir, output_dir)
    return record


def _dynamic_pass(staged: Path, output_dir: Path, operators: list[str], profile: str,
                  preset: str, per_channel: bool | None, nodes_to_exclude) -> None:
    """Quantize ``operators`` of the static model in ``staged`` dynamically into
    ``output_dir`` (same file name), keeping the static pass's ``ort_config.json``."""
    import logging

    from optimum.onnxruntime import ORTQuantizer

    qconfig, _ = int8_config(profile, preset, per_channel, True, "dynamic", nodes_to_exclude,
                             operators)
    name = onnx_file(staged).name
    root = logging.getLogger()
    # onnxruntime warns "Please check if the model is already quantized": it is, on purpose
    quiet = lambda r: "already quantized" not in r.getMessage()  # noqa: E731
    root.addFilter(quiet)
    try:
        ORTQuantizer.from_pretrained(staged, file_name=name).quantize(
            save_dir=output_dir, quantization_config=qconfig, file_suffix="")
    finally:
        root.removeFilter(quiet)
    shutil.copy(staged / "ort_config.json", output_dir / "ort_config.json")
    shutil.rmtree(staged)


def int8_config(profile: str = "cpu", preset: str = "auto", per_channel: bool | None = None,
                fuse: bool | None = None, mode: str = "dynamic",
                nodes_to_exclude: list[str] | None = None, operators: list[str] | None = None):
    """optimum's quantization configuration for these settings (the profile's preset and its
    options applied), and the resolved preset: the one description of the int8 scheme, read
    by :func:`quantize` and by quantization-aware distillation."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    settings = resolve_preset(profile, preset, per_channel, fuse)
    make_config = getattr(AutoQuantizationConfig, settings["preset"])
    if operators is None and mode == "static":
        operators = ["MatMul", *DYNAMIC_ONLY]
    qconfig = make_config(is_static=mode == "static", per_channel=settings["per_channel"],
                          nodes_to_exclude=list(nodes_to_exclude or []),
                          operators_to_quantize=operators)
    _apply_options(qconfig, settings, mode)
    return qconfig, settings


def to_fp16(onnx_dir: str | Path, output_dir: str | Path) -> dict:
    """The fp16 model a GPU profile asks for: the graph fused for a GPU and its weights and
    arithmetic in float16 (optimum's ORTOptimizer, onnxruntime's float16 converter), inputs and
    outputs kept in their types so callers feed and read it as before. Built on any host;
    fast only on a GPU (onnxruntime's CPU provider runs few fp16 kernels)."""
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    model_file = onnx_file(onnx_dir)
    if model_file is None:
        raise EdgeDistillError(f"{onnx_dir}: no .onnx file to convert; run the export first")
    fp32_graph(model_file)
    ORTOptimizer.from_pretrained(onnx_dir, file_names=[model_file.name]).optimize(
        save_dir=output_dir, optimization_config=OptimizationConfig(
            optimization_level=2, optimize_for_gpu=True, fp16=True))
    copy_sidecars(onnx_dir, output_dir)
    graph = onnx.load(str(onnx_file(output_dir)), load_external_data=False).graph
    halves = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    return {"precision": "fp16", "fp16_initializers": halves,
            "fused": _fused_ops(graph)}


def _apply_options(qconfig, settings: dict, mode: str) -> None:
    """The profile's preset options on top of optimum's preset configuration."""
    from onnxruntime.quantization import QuantFormat, QuantType

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if "reduce_range" in settings:
        qconfig.reduce_range = settings["reduce_range"]
    if "activations" in settings:
        qconfig.activations_dtype = types[settings["activations"]]
    if "weights" in settings:
        qconfig.weights_dtype = types[settings["weights"]]
    if "format" in settings and mode == "static":  # dynamic quantization has one format
        qconfig.format = getattr(QuantFormat, settings["format"])


# Decoders are left unfused: the fusions for them target GPUs, and a fused KV-cache graph was
# not validated here (int4 is the decoders' CPU path).
def fuse_graph(onnx_dir: Path, model_file: Path, out: Path) -> dict | None:
    """Fuse an encoder's graph with onnxruntime's transformer optimizer (through optimum's
    ORTOptimizer: attention, skip + layer norm, bias + GELU, embedding + layer norm) into
    ``out``, then run onnxruntime's symbolic shape inference: the fused operators live in the
    com.microsoft domain, which ONNX's own shape inference cannot see through, and the
    quantizer needs every tensor's type. Returns the fused operator counts, or None when the
    model type has no fusions (the graph is then quantized as exported)."""
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig
    from optimum.onnxruntime.utils import ORTConfigManager
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    config = json.loads((onnx_dir / "config.json").read_text())
    decoder = any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])
    try:
        ORTConfigManager.check_supported_model(config.get("model_type"))
    except KeyError:
        return None
    if decoder:
        return None
    shutil.rmtree(out, ignore_errors=True)
    optimizer = ORTOptimizer.from_pretrained(onnx_dir, file_names=[model_file.name])
    # level 2: onnxruntime's basic and extended rewrites plus the transformer fusions; exact
    # (level 3 would also swap GELU for its tanh approximation)
    optimizer.optimize(save_dir=out, optimization_config=OptimizationConfig(
        optimization_level=2, optimize_for_gpu=False))
    fused_file = onnx_file(out)
    model = SymbolicShapeInference.infer_shapes(onnx.load(str(fused_file)), auto_merge=True)
    onnx.save(model, str(fused_file))
    return _fused_ops(model.graph)


def _fused_ops(graph: onnx.GraphProto) -> dict[str, int]:
    """How many of each fused operator (onnxruntime's com.microsoft domain) ``graph`` holds."""
    counts = collections.Counter(n.op_type for n in graph.node if n.domain == "com.microsoft")
    return dict(sorted(counts.items()))


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
