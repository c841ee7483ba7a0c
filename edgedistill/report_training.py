"""What a report says about how its models were made: the teacher's fine-tuning and the
student's distillation (with the warnings a user should act on), the transfer set, the
int8-aware phase, and how the int8 models were quantized (onnxruntime, OpenVINO). Each is a
line of report.md and report.html (edgedistill.report).
"""

from __future__ import annotations

import collections
import math


def training_warnings(training: dict) -> list[str]:
    """What the training records say about the teacher that a user should act on: still
    learning when its fine-tuning stopped, or beaten on validation by its own student (both on
    the metric that chose the best epoch)."""
    teacher, student = training.get("teacher", {}), training.get("distill", {})
    t_sel, s_sel = teacher.get("selection"), student.get("selection")
    out = []
    if t_sel and t_sel["last_epoch_improved"]:
        values = ", ".join(f"{v:.3f}" for v in t_sel["per_epoch"][-3:])
        out.append(f"the teacher's validation {t_sel['metric']} still improved in its last "
                   f"epoch (last epochs: {values}): it may be under-fit; raise teacher.epochs")
    if t_sel and s_sel and t_sel["metric"] == s_sel["metric"]:
        metric = t_sel["metric"]
        t, s = teacher["validation"].get(metric), student["validation"].get(metric)
        if t is not None and s is not None and (s > t if t_sel["greater_is_better"] else s < t):
            out.append(f"the student beat its teacher on validation ({metric} {s:.3f} against "
                       f"{t:.3f}): the teacher may be too weak to learn from; fine-tune it "
                       "longer or start from a stronger model")
    return out


def _validation_score(report: dict, record: dict) -> str:
    values = collections.defaultdict(lambda: float("nan"), record.get("validation", {}))
    if "loss" in values:  # a language model's best epoch is kept by loss: say its perplexity
        values["perplexity"] = math.exp(values["loss"])
    return report["view"]["validation"].format_map(values)


def training_lines(report: dict) -> list[str]:
    lines = []
    teacher, distill = report["training"].get("teacher", {}), report["training"].get("distill", {})
    if teacher.get("finetuned"):
        lines.append(f"teacher fine-tuned in {teacher['train_seconds']:.0f} s, "
                     f"{_validation_score(report, teacher)}")
    if distill:
        kept = distill.get("teacher_layers")  # None: a pretrained student.model
        lines.append(f"student: {f'teacher layers {kept}, ' if kept is not None else ''}"
                     f"{distill.get('parameters', 0) / 1e6:.1f}M of the teacher's "
                     f"{distill.get('teacher_parameters', 0) / 1e6:.1f}M parameters, distilled "
                     f"in {distill.get('train_seconds', 0):.0f} s, "
                     f"{_validation_score(report, distill)}")
    if distill.get("transfer"):
        lines.append(_transfer_line(distill["transfer"]))
    if distill.get("qat"):
        lines.append(_qat_line(report, distill["qat"],
                               report.get("quantization", {}).get("qat_check")))
    if report.get("quantization", {}).get("mode"):
        lines.append(_int8_line(report["quantization"]))
    if report.get("quantization", {}).get("openvino"):
        lines.append(openvino_line(report["quantization"]["openvino"]))
    return lines


def openvino_line(ov: dict) -> str:
    """How student-int8-openvino was made, and what NNCF's accuracy control reached."""
    line = (f"int8 on OpenVINO {ov['openvino']}: NNCF {ov['nncf']} post-training quantization "
            f"({ov['model_type']} model type) of the fp32 export, calibrated on "
            f"{ov['calibration_samples']} training texts; computes in "
            f"{ov['inference_precision']}")
    control = ov.get("accuracy_control")
    if control:
        verdict = "within" if control["passed"] else "NOT within"
        line += (f"; NNCF's accuracy control: validation macro-F1 {control['int8_macro_f1']:.4f} "
                 f"against fp32 {control['fp32_macro_f1']:.4f} ({control['relative_loss']:.1%} "
                 f"loss, {verdict} the tolerated {control['tolerable_loss']:.1%})")
    return line


def _int8_line(q: dict) -> str:
    """How student-int8 was made: mode, calibration, preset, and the fusions it started from."""
    how = (f"static (ranges from {q['calibration']} calibration on {q['calibration_samples']} "
           "training texts)" if q["mode"] == "static" else "dynamic (ranges measured per call)")
    line = (f"int8: {how}, preset {q['preset']}, "
            f"{'per-channel' if q['per_channel'] else 'per-tensor'} weights")
    if q.get("fused"):
        line += "; graph fused first (" + ", ".join(f"{op} {n}" for op, n in q["fused"].items())
        line += ")"
    if q.get("dynamic_operators"):
        line += f"; {', '.join(q['dynamic_operators'])} quantized dynamically (no static form)"
    if q.get("nodes_to_exclude"):
        line += f"; {len(q['nodes_to_exclude'])} nodes kept fp32"
    return line


def _qat_line(report: dict, qat: dict, check: dict | None) -> str:
    line = (f"int8-aware phase: {qat['epochs']:g} epochs through fake quantization at learning "
            f"rate {qat['learning_rate']:.1e}, {_validation_score(report, qat)} as int8")
    if "kept" in qat:
        before = next(iter(qat["before"].values()))
        line += (f" against {before:.3f} before it: "
                 + ("its model is shipped" if qat["kept"] else
                    "no better, so the float phase's model is shipped"))
    if check:
        line += (f"; against the onnxruntime int8 model on {check['texts']} validation texts, "
                 f"largest logit difference {check['fake_quant_max_abs_diff']:.2g} (float model: "
                 f"{check['fp32_max_abs_diff']:.2g}), same class "
                 f"{check['fake_quant_agreement']:.0%}")
    return line


def _transfer_line(t: dict) -> str:
    mix = ", ".join(f"{source} {n}" for source, n in t["sources"].items())
    methods = t.get("methods")
    how = f" (augmentation: {', '.join(f'{m} {n}' for m, n in methods.items())})" if methods else ""
    gen = t.get("generations")
    if gen:
        how += (f" (teacher generations: {gen['sequences']} continuations of "
                f"{gen['prompt_tokens']}-token prompts, {gen['mean_continuation_tokens']:.0f} "
                f"tokens on average{', from the cache' if gen['cached'] else ''})")
    if t.get("paraphrase_seconds"):
        how += f"; paraphrasing {t['paraphrase_seconds']:.0f} s"
    return (f"transfer set: {t['size']} teacher-labelled rows beside {t['training_rows']} "
            f"training rows; rows by source: {mix}{how}; teacher {t['teacher_seconds']:.0f} s")
