"""The phone-ready artifact: the model in ONNX Runtime's ORT format, the operator list for a
reduced onnxruntime build, and onnxruntime's own analysis of how well it suits NNAPI (Android)
and CoreML (iOS).

ONNX Runtime Mobile loads ``.ort`` files (a flatbuffer, graph optimizations already applied);
a build of onnxruntime with only the operators in ``required_operators.config`` is a fraction
of the full library's size. Both come from onnxruntime's own tools, run here as a library.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

from .artifacts import copy_sidecars, onnx_file, publish_folder
from .errors import EdgeDistillError

NOT_CHECKED = "not analysed (onnxruntime ships no checker for it)"


def mobile_usability(model_file: Path) -> dict:
    """onnxruntime's verdict (YES / MAYBE / NO) on running the model with the NNAPI and CoreML
    execution providers, and how many of its inputs have dynamic shapes (those providers
    want fixed ones)."""
    import tempfile

    from onnxruntime.tools.mobile_helpers.usability_checker import (
        check_coreml_partitions,
        check_nnapi_partitions,
        check_shapes,
    )
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    with tempfile.TemporaryDirectory() as tmp:
        # as onnxruntime's own checker does: the basic optimizations an ORT-format conversion
        # applies first (they also complete attributes the checker reads, like Transpose perms)
        optimized = Path(tmp) / model_file.name
        optimize_model(model_file, optimized, use_external_initializers=True)
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
    dynamic_inputs, _ = check_shapes(model.graph)
    return {
        "NNAPI": check_nnapi_partitions(model, True).suitability().name,
        "CoreML NeuralNetwork": check_coreml_partitions(
            model, True, "coreml_supported_neuralnetwork_ops.md").suitability().name,
        "CoreML MLProgram": check_coreml_partitions(
            model, True, "coreml_supported_mlprogram_ops.md").suitability().name,
        "XNNPACK": NOT_CHECKED,
        "dynamic_inputs": sorted(i.name for i in dynamic_inputs or []),
    }


def phone_artifact(onnx_dir: str | Path, output_dir: str | Path) -> dict:
    """Write ``output_dir``: the model of ``onnx_dir`` as ``.ort`` (optimized for ARM), the
    ``required_operators.config`` of a reduced build, ``mobile_usability.json`` and the
    tokenizer files. Written under a temporary name and renamed when complete."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    model_file = onnx_file(onnx_dir)
    if model_file is None:
        raise EdgeDistillError(f"{onnx_dir}: no .onnx file to convert; run the export first")
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
            convert_onnx_models_to_ort(model_file, partial, [OptimizationStyle.Fixed],
                                       target_platform="arm")
    except Exception as e:  # onnxruntime raises its own types for graphs it cannot convert
        raise EdgeDistillError(f"{model_file}: onnxruntime cannot convert it to ORT format "
                               f"({str(e).splitlines()[0][:200]})")
    usability = mobile_usability(model_file)
    (partial / "mobile_usability.json").write_text(json.dumps(usability, indent=2))
    copy_sidecars(onnx_dir, partial)
    ort = next(partial.glob("*.ort"))
    config = next(partial.glob("*required_operators*.config"))
    operators = [line for line in config.read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    record = {"ort_file": ort.name, "size_mb": round(ort.stat().st_size / 1e6, 3),
              "required_operators": config.name,
              "operator_types": sum(len(line.split(";")[-1].split(",")) for line in operators),
              "usability": usability}
    publish_folder(partial, output_dir)
    return record
