"""int8 quantization of an exported ONNX model with onnxruntime, via optimum's ORTQuantizer.

The preset (instruction set, per-channel weights, reduce_range, activation and weight types,
QDQ or QOperator) comes from the hardware profile, so the same recipe quantizes for the machine
it targets. Before quantizing, encoder graphs are fused by onnxruntime's transformer optimizer
(attention, layer norms, GELU), so the attention runs as one integer QAttention in both
modes. The quantized folder keeps ``ort_config.json``, the exact settings that made it. int4
weight-only quantization (for causal LMs) is in ``int4``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from ..artifacts import copy_sidecars, onnx_file
from ..errors import EdgeDistillError
from ..progress import silenced
from ..profiles import Profile, Target, resolve_target
from ..recipe_blocks import QuantizeConfig, check_limits
from .graph import fp32_graph, fuse_graph

# Fused operators onnxruntime quantizes dynamically only (its IntegerOps registry alone has a
# form for them): static mode gives them a dynamic pass after the static one.
DYNAMIC_ONLY = ("Attention",)
CALIBRATIONS = ("minmax", "entropy", "percentile")


def settle(config: QuantizeConfig | None, settings: dict) -> QuantizeConfig:
    """A quantize block with keyword settings on top (``mode="static"``, ...), as the SDK's
    keyword form writes them; an unknown keyword is refused with the valid ones."""
    if config is not None and not isinstance(config, QuantizeConfig):
        raise EdgeDistillError(f"quantize: config must be a QuantizeConfig, got {config!r}; "
                               "name a profile with profile=")
    config = config or QuantizeConfig()
    if settings.get("nodes_to_exclude", []) is None:  # the keyword form's old default
        settings["nodes_to_exclude"] = []
    fields = {f.name for f in dataclasses.fields(QuantizeConfig)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise EdgeDistillError(f"quantize: unknown setting(s) {', '.join(unknown)}; valid: "
                               f"{', '.join(sorted(fields))}")
    config = dataclasses.replace(config, **settings)
    check_limits(QuantizeConfig, config, "quantize.")  # the recipe's limits, for SDK callers too
    config.check("quantize.")
    return config


def quantize(onnx_dir: str | Path, output_dir: str | Path, config: QuantizeConfig | None = None,
             profile: str | Profile | Target = "cpu", *,
             calibration_texts: list[str] | None = None, max_length: int = 128,
             **settings) -> dict:
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
    The profile's preset options (:data:`edgedistill.profiles.PRESET_OPTIONS`) apply on top
    of optimum's preset.

    ``config`` is the recipe's quantize block (default settings when None); keyword
    ``settings`` are its fields for SDK users (``quantize(onnx, out, mode="static")``). Its
    tuning fields (``tolerable_loss``, ``max_trials``) are :func:`~.tuning.tune`'s, and its
    int4 fields :func:`~.int4.quantize_int4`'s: this function reads neither.
    ``profile`` is a profile name, a loaded profile, or the run's resolved
    :class:`~edgedistill.profiles.Target`.
    """
    from optimum.onnxruntime import ORTQuantizer

    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    model_file = onnx_file(onnx_dir)
    if model_file is None:
        raise EdgeDistillError(f"{onnx_dir}: no .onnx file to quantize; run the export first")
    graph = fp32_graph(model_file)
    config, target = settle(config, settings), resolve_target(profile)
    mode = config.mode
    if mode not in ("dynamic", "static"):
        raise EdgeDistillError(f"quantize.mode: '{mode}' is unknown; valid: dynamic, static")
    qconfig, scheme = int8_config(config, target)
    output_dir.mkdir(parents=True, exist_ok=True)
    fused_dir = output_dir / "fused.tmp"
    record = {"mode": mode, "profile": target.name, **scheme,
              "operators": list(qconfig.operators_to_quantize),
              "nodes_to_exclude": list(config.nodes_to_exclude),
              "fused": fuse_graph(onnx_dir, model_file, fused_dir) if scheme["fuse"] else None}
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
            config.calibration, dataset), operators_to_quantize=qconfig.operators_to_quantize,
            onnx_augmented_model_name=output_dir / "augmented.onnx.tmp")
        (output_dir / "augmented.onnx.tmp").unlink(missing_ok=True)
        record.update(calibration=config.calibration, calibration_samples=len(dataset))
        staged = output_dir / "static.tmp" if dynamic_ops else output_dir
        quantizer.quantize(save_dir=staged, quantization_config=qconfig,
                           calibration_tensors_range=ranges)
        if dynamic_ops:
            _dynamic_pass(staged, output_dir, dataclasses.replace(
                config, mode="dynamic", fuse=True, operators=dynamic_ops), target)
        record["dynamic_operators"] = dynamic_ops
    shutil.rmtree(fused_dir, ignore_errors=True)
    copy_sidecars(onnx_dir, output_dir)
    return record


def _dynamic_pass(staged: Path, output_dir: Path, config: QuantizeConfig, target: Target) -> None:
    """Quantize ``config.operators`` of the static model in ``staged`` dynamically into
    ``output_dir`` (same file name), keeping the static pass's ``ort_config.json``."""
    from optimum.onnxruntime import ORTQuantizer

    qconfig, _ = int8_config(config, target)
    name = onnx_file(staged).name
    # onnxruntime warns (on the root logger) "Please check if the model is already
    # quantized": it is, on purpose
    with silenced("", "already quantized"):
        ORTQuantizer.from_pretrained(staged, file_name=name).quantize(
            save_dir=output_dir, quantization_config=qconfig, file_suffix="")
    shutil.copy(staged / "ort_config.json", output_dir / "ort_config.json")
    shutil.rmtree(staged)


def int8_config(config: QuantizeConfig | None = None,
                profile: str | Profile | Target = "cpu"):
    """optimum's quantization configuration for a quantize block on a target (the profile's
    preset and its options, the block's choices on top), and the resolved preset: the one
    description of the int8 scheme, read by :func:`quantize` and by quantization-aware
    distillation."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    config = config or QuantizeConfig()
    settings = resolve_target(profile).int8_for(config)
    make_config = getattr(AutoQuantizationConfig, settings["preset"])
    operators = config.operators
    if operators is None and config.mode == "static":
        operators = ["MatMul", *DYNAMIC_ONLY]
    qconfig = make_config(is_static=config.mode == "static", per_channel=settings["per_channel"],
                          nodes_to_exclude=list(config.nodes_to_exclude),
                          operators_to_quantize=operators)
    _apply_options(qconfig, settings, config.mode)
    return qconfig, settings


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
