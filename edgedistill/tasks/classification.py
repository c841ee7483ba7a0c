"""Text classification: a fine-tuned classifier teacher, a smaller classifier student, scored
by accuracy and macro-F1 on the test split and timed one forward pass at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import AutoModelForSequenceClassification

from ..distill.qat import fake_quant_matches_onnxruntime, int8_scheme
from ..distill.student import shares_tokenizer
from ..distill.trainer import check_classifier_settings
from ..distill.training import class_weights, classifier_sets
from ..evaluation import classification_metrics, evaluate, predict
from ..quantization import int8_config, quantize_openvino, to_fp16
from ..quantization.tuning import tune
from ..recipe import Recipe
from ..recipe_blocks import QuantizeConfig
from .base import (
    NAME_WIDTH,
    Column,
    ReportView,
    Task,
    head_like,
    label_head,
    literal,
    model_row,
    refuse,
    snippet_opening,
    time_forward_passes,
)

# what tuning reports about its search, apart from the chosen model's quantize record
TUNING_KEYS = ("passed", "metric", "tolerable_loss", "max_trials", "baseline", "trials",
               "chosen", "skipped", "ranking")


class ClassificationTask(Task):
    name = "classification"
    labelled = True
    auto_model = AutoModelForSequenceClassification
    runtimes = ("onnxruntime", "openvino")
    report = ReportView(
        columns=(Column("accuracy", "metrics.accuracy"), Column("macro-F1", "metrics.macro_f1"),
                 Column("agreement", "metrics.agreement"), Column("p50 ms", "latency.p50_ms", 2),
                 Column("p99 ms", "latency.p99_ms", 2),
                 Column("p50 ms real lengths", "latency_real_lengths.p50_ms", 2)),
        summary=("macro-F1", "agreement", "p50 ms"),
        setting=("Test split: {test_rows} rows. Latency: batch {batch_size}, sequence "
                 "{sequence_length}, {threads} threads, profile `{profile}`; each model in its "
                 "own process."),
        quality="metrics.macro_f1", quality_label="macro-F1 on the test split",
        higher_is_better=True, timing="latency", speed_label="latency per inference, ms",
        roofline_measure="p50", validation="validation macro-F1 {macro_f1:.3f}")
    hub_pipeline = "text-classification"
    ort_model_class = "ORTModelForSequenceClassification"
    example_text = "It helped a lot and I slept better."

    def new_head(self, labels):
        return label_head(labels)

    def student_head(self, config):
        return head_like(config)

    def selection(self, cfg, data):
        # the best epoch by validation macro-F1
        return dict(metric_for_best_model="macro_f1", per_device_eval_batch_size=64,
                    class_weights=class_weights(data, cfg.class_weights))

    def training_sets(self, tokenizer, args, data, data_cfg, **kw):
        return classifier_sets(tokenizer, args, data, data_cfg, **kw)

    per_row_validation = True

    def validation_predictions(self, model_dir, data, max_length):
        return predict(model_dir, list(data.validation["text"]), max_length=max_length,
                       desc="validation predictions").tolist()

    def resampled_scores(self, predictions, data, metric, draws, seed):
        labels = np.asarray(data.validation["label"])
        rng = np.random.default_rng(seed)
        # stratified: every class keeps its count in each draw, so a rare class never drops
        # out of the macro-F1 (about 6 neutral rows in the default recipe's validation split)
        by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        samples = [np.concatenate([rng.choice(rows, len(rows)) for rows in by_class])
                   for _ in range(draws)]
        return {name: np.array([classification_metrics(np.asarray(p)[s], labels[s],
                                                       data.labels)[metric] for s in samples])
                for name, p in predictions.items()}

    def onnxruntime_snippet(self, location: str, file_name: str) -> str:
        # the class is the argmax of the logits, named by the config's id2label
        return "\n".join([
            *snippet_opening(location, file_name, "AutoConfig, AutoTokenizer"),
            "labels = AutoConfig.from_pretrained(folder).id2label",
            (f"inputs = tokenizer([{literal(self.example_text)}], truncation=True, "
             'return_tensors="np")'),
            "# feed what the graph takes (not every encoder has token_type_ids)",
            "names = {i.name for i in session.get_inputs()}",
            "feed = {k: v.astype(np.int64) for k, v in inputs.items() if k in names}",
            "logits = session.run(None, feed)[0]",
            "print(labels[int(logits[0].argmax())])"])

    # ------------------------------------------------------------------ preflight

    def check(self, r: Recipe) -> None:
        check_classifier_settings(r.distill, "distill.")
        q, d, t = r.quantize, r.distill, r.transfer
        refuse(d.cache_teacher or q.int4 or q.pytorch_int4 or q.genai,
               "distill.cache_teacher, quantize.int4, quantize.pytorch_int4 and quantize.genai "
               "are for task causal-lm; a classifier's logits are cached already and its int8 "
               "path is quantize.mode")
        refuse(bool(t.generate.prompts), "transfer.generate.prompts: teacher generations are "
               "for task causal-lm; a classifier takes transfer.augment / unlabelled")
        refuse(t.active and d.alpha_distill <= 0, "transfer: the transfer rows have only the "
               "teacher's soft targets, which distill.alpha_distill: 0 ignores; set it > 0")

    def check_student(self, r: Recipe, config, teacher_tokenizer, student_tokenizer, labels):
        # a classifier's targets are one per example, so a student may read its own tokens;
        # layer losses compare token positions and still need one tokenizer
        refuse(bool(r.distill.matches) and not shares_tokenizer(teacher_tokenizer,
                                                                 student_tokenizer),
               "student.model: its tokenizer differs from the teacher's, and distill.matches "
               "compare the two models token by token; drop distill.matches (the logit loss "
               "works across tokenizers) or use a student with the teacher's tokenizer")
        trained_head = any(a.endswith("ForSequenceClassification")
                           for a in config.architectures or [])
        if trained_head and labels:
            names = [config.id2label[i] for i in range(config.num_labels)]
            generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
            refuse(len(names) != len(labels) or not (generic or names == labels),
                   f"student.model: its classification head predicts {len(names)} labels "
                   f"({', '.join(names)}), the data has {len(labels)} ({', '.join(labels)}); "
                   "use the model without its head (its encoder) or one trained on these "
                   "labels in this order")

    def qat_scheme(self, r: Recipe, target):
        if not r.distill.qat_epochs:
            return None
        return int8_scheme(int8_config(r.quantize, target)[0])

    def needs_calibration(self, q: QuantizeConfig, runtimes) -> bool:
        # tuning tries static settings first; NNCF always calibrates
        return q.mode == "static" or q.tolerable_loss is not None or "openvino" in runtimes

    # ------------------------------------------------------------------ stages

    def quantize(self, run, onnx_dir: Path, out: Path, student_dir: Path) -> dict:
        record = super().quantize(run, onnx_dir, out, student_dir)
        if run.qat_scheme:
            # the int8-aware phase simulated this model's rounding: check that it did
            record["qat_check"] = fake_quant_matches_onnxruntime(
                student_dir, out / "student-int8", list(run.data.validation["text"])[:64],
                run.qat_scheme, run.recipe.data.max_length)
        if run.target.fp16:
            record["fp16"] = to_fp16(onnx_dir, out / "student-fp16")
        if "openvino" in run.runtimes:
            record["openvino"] = self._openvino(run, onnx_dir, out / "student-int8-openvino")
        return record

    def _openvino(self, run, onnx_dir: Path, out: Path) -> dict:
        """The OpenVINO int8 student; with quantize.tolerable_loss, NNCF's accuracy control
        judges it on the validation split, as tuning judges student-int8."""
        r, validation = run.recipe, run.data.validation
        record = quantize_openvino(
            onnx_dir, out, run.calibration, precision=run.target.openvino_precision,
            max_length=r.data.max_length, tolerable_loss=r.quantize.tolerable_loss,
            validation=(list(validation["text"]), list(validation["label"]), run.data.labels))
        control = record.get("accuracy_control")
        if control and not control["passed"]:
            run.console.print(
                f"[red]openvino: NNCF's accuracy control kept validation macro-F1 "
                f"{control['relative_loss']:.1%} below fp32, past the tolerated "
                f"{control['tolerable_loss']:.1%}; student-int8-openvino is marked as failing[/red]")
        return record

    def int8(self, run, onnx_dir: Path, out: Path, student_dir: Path) -> dict:
        if run.recipe.quantize.tolerable_loss is None:
            return super().int8(run, onnx_dir, out, student_dir)
        return self._tune(run, onnx_dir, out, student_dir)

    def _tune(self, run, onnx_dir: Path, out: Path, student_dir: Path) -> dict:
        """Accuracy-aware int8 (:mod:`edgedistill.quantization.tuning`) judged on the validation
        split. When no setting passes, the default int8 model goes on to evaluation and the
        report, marked as not meeting the tolerance."""
        r, validation = run.recipe, run.data.validation
        q = r.quantize
        result = tune(onnx_dir, out / "student-int8", list(validation["text"]),
                      list(validation["label"]), run.data.labels, q, run.target,
                      calibration_texts=run.calibration, max_length=r.data.max_length)
        summary = {k: result.pop(k) for k in TUNING_KEYS}
        if not summary["passed"]:
            run.console.print(
                f"[red]tuning: no int8 setting kept {summary['metric']} within "
                f"{q.tolerable_loss:.1%} of fp32 in {len(summary['trials'])} trials; "
                "student-int8 is the untuned default, marked as failing[/red]")
            result = super().int8(run, onnx_dir, out, student_dir)
        return {**result, "tuning": {**summary, "texts": len(validation)}}

    def models(self, run, teacher, student, exported, quantized) -> list[dict]:
        models = super().models(run, teacher, student, exported, quantized)
        if run.target.fp16:
            models.append(model_row("student-fp16", "student", "onnxruntime", "fp16",
                                    quantized / "student-fp16"))
        if "openvino" in run.runtimes:
            models.append(model_row("student-int8-openvino", "student", "openvino", "int8",
                                    quantized / "student-int8-openvino"))
        return models

    def evaluate(self, run, models: list[dict]) -> dict:
        test, r = run.data.test, run.recipe
        results, reference = {}, None
        for m in models:
            metrics = evaluate(m["path"], test, run.data.labels, r.evaluate.batch_size,
                               r.data.max_length, reference_predictions=reference,
                               desc=f"evaluate {m['name']}")
            if reference is None:
                reference = metrics["predictions"]
                metrics["agreement"] = 1.0
            results[m["name"]] = metrics
            run.console.print(f"  {m['name']:<{NAME_WIDTH}} accuracy {metrics['accuracy']:.3f}  "
                              f"macro-F1 {metrics['macro_f1']:.3f}")
        return {"test_rows": len(test), "labels": run.data.labels, "models": results}

    def bench(self, run, models: list[dict]) -> dict:
        return time_forward_passes(run, models)
