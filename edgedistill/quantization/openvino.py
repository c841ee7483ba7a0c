"""int8 for OpenVINO: the fp32 ONNX export read by OpenVINO's ONNX front end, quantized after
training by NNCF (activation ranges calibrated on training texts, never the test split), saved
as OpenVINO IR with the precision it is to run in.

It starts from the fp32 export, not from ``student-int8``: OpenVINO has no conversion rule for
onnxruntime's fused contrib operators (``com.microsoft.QAttention``, ``DynamicQuantizeMatMul``).
optimum-intel's OVQuantizer would call the same NNCF, but optimum-intel 2.2 lifts optimum to
2.3, past what optimum-onnx 0.1.0 (the exporter) accepts, so NNCF is called directly.

With ``tolerable_loss``, NNCF's accuracy control (``quantize_with_accuracy_control``) quantizes,
then returns the layers that cost the most validation macro-F1 to fp32 until the relative loss
is within the tolerance (or it gives up: ``passed`` is then False). The graph is read with
``Core.read_model``, not ``convert_model``: the converter tool reports usage to Intel unless
the user opted out, the runtime's ONNX front end does not.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..artifacts import OPENVINO_SETTINGS, OPENVINO_XML, copy_sidecars, onnx_file, write_atomic
from ..errors import EdgeDistillError
from ..evaluation import classification_metrics
from ..runtime.session import check_openvino_precision, open_openvino_model


def read_onnx(model_file: Path):
    """The ONNX graph as an OpenVINO model; a graph it cannot read fails naming the operators
    it has no rule for."""
    import openvino as ov

    try:
        return ov.Core().read_model(str(model_file))
    except Exception as e:  # OpenVINO raises RuntimeError with a long C++ trace
        missing = re.findall(r"No conversion rule found for operations: ([^\n]+)", str(e))
        if missing:
            raise EdgeDistillError(
                f"{model_file}: OpenVINO cannot convert operators {missing[0].strip()}; give it "
                "the fp32 export (export/student), not a fused or quantized graph") from None
        raise EdgeDistillError(f"{model_file}: OpenVINO cannot read this graph "
                               f"({str(e).splitlines()[0][:200]})") from None


def _nncf():
    # NNCF reports usage to Google Analytics unless the user opted out; a library must not do
    # that for its users. NNCF_CI is the switch NNCF reads, and only its telemetry reads it
    # (nncf 3.4); a user's own setting is kept.
    os.environ.setdefault("NNCF_CI", "1")
    import nncf

    return nncf


def quantize_openvino(onnx_dir: str | Path, output_dir: str | Path,
                      calibration_texts: list[str], *, precision: str = "f32",
                      max_length: int = 128, tolerable_loss: float | None = None,
                      validation: tuple[list[str], list[int], list[str]] | None = None) -> dict:
    """An OpenVINO int8 model of the fp32 ONNX classifier in ``onnx_dir``, in ``output_dir``
    (``openvino_model.xml`` and ``.bin``, the tokenizer and config, and
    ``openvino_config.json``: how it was made and the ``precision`` it runs in).

    ``calibration_texts``: training texts NNCF reads activation ranges from (one text per
    sample, at its own length). ``tolerable_loss`` with ``validation`` (texts, label ids, label
    names): NNCF's accuracy control keeps validation macro-F1 within that relative loss of
    fp32's by returning the most harmful layers to fp32.
    """
    import openvino as ov
    from transformers import AutoTokenizer

    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    model_file = onnx_file(onnx_dir)
    if model_file is None:
        raise EdgeDistillError(f"{onnx_dir}: no .onnx file to quantize; run the export first")
    check_openvino_precision(precision, "quantize (openvino)")
    if not calibration_texts:
        raise EdgeDistillError("quantize (openvino): NNCF calibrates on training texts; pass "
                               "calibration_texts=[...] (the pipeline passes training texts)")
    if tolerable_loss is not None and validation is None:
        raise EdgeDistillError("quantize (openvino): tolerable_loss needs validation texts and "
                               "labels to measure the loss on")
    model = read_onnx(model_file)
    names = {i.get_any_name() for i in model.inputs}
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)

    def encode(text: str) -> dict:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="np")
        return {k: v.astype(np.int64) for k, v in enc.items() if k in names}

    nncf = _nncf()
    calibration = nncf.Dataset([encode(t) for t in calibration_texts])
    common = dict(model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration_texts))
    record = {"runtime": "openvino", "openvino": ov.get_version().split("-")[0],
              "nncf": nncf.__version__, "model_type": "transformer",
              "calibration_samples": len(calibration_texts), "inference_precision": precision}
    if tolerable_loss is None:
        quantized = nncf.quantize(model, calibration, **common)
    else:
        texts, labels, label_names = validation
        samples = [(encode(t), int(y)) for t, y in zip(texts, labels)]

        def macro_f1(compiled, data) -> float:
            output = compiled.output("logits")
            predictions = [int(compiled(x)[output].argmax(-1)[0]) for x, _ in data]
            return classification_metrics(predictions, [y for _, y in data],
                                          label_names)["macro_f1"]

        quantized = nncf.quantize_with_accuracy_control(
            model, calibration, nncf.Dataset(samples), validation_fn=macro_f1,
            max_drop=tolerable_loss, drop_type=nncf.DropType.RELATIVE, **common)
        # NNCF logs its verdict; measure it again here so the record says what was reached
        fp32 = macro_f1(open_openvino_model(model, precision=precision), samples)
        int8 = macro_f1(open_openvino_model(quantized, precision=precision), samples)
        loss = (fp32 - int8) / fp32 if fp32 else 0.0
        record["accuracy_control"] = {
            "tolerable_loss": tolerable_loss, "validation_texts": len(samples),
            "fp32_macro_f1": fp32, "int8_macro_f1": int8, "relative_loss": loss,
            "passed": loss <= tolerable_loss}
    output_dir.mkdir(parents=True, exist_ok=True)
    # weights stay as NNCF left them (int8, fp32 where it kept fp32): no fp16 compression,
    # which would change an "f32" model's numbers
    ov.save_model(quantized, str(output_dir / OPENVINO_XML), compress_to_fp16=False)
    write_atomic(output_dir / OPENVINO_SETTINGS, json.dumps(record, indent=2))
    copy_sidecars(onnx_dir, output_dir)
    return record
