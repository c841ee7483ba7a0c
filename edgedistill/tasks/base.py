"""The task interface: everything in a run that differs by what the model does.

A task says how its data are prepared, which transformers class loads its teacher and student,
how training keeps its best epoch, which distillation losses it accepts, what its preflight
refuses, which models the quantize stage writes beside the int8 student, how the models are
evaluated and benchmarked, how the report shows them and how a model card loads them. The
pipeline runs the stages in order and asks the run's task at each point where tasks differ; it
never asks which task it has.

Task methods that do stage work receive the pipeline's run (``run.recipe``, ``run.target``,
``run.data``, ``run.console``): tasks sit below the pipeline and do not import it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from ..bench.runner import BenchSettings, benchmark
from ..data import TaskData, load_task_data
from ..distill.student import check_same_tokenizer
from ..distill.trainer import check_classifier_settings
from ..errors import EdgeDistillError
from ..mobile import phone_artifact
from ..profiles import Target
from ..progress import silenced
from ..quantization import quantize
from ..recipe import Recipe
from ..recipe_blocks import DataConfig, QuantizeConfig, TrainingConfig
from ..sources import resolve_model


@dataclass(frozen=True)
class Column:
    """One column of the report's results table: its header, the path of the value in a
    model's report row (``metrics.macro_f1``, ``latency.p50_ms``) and its decimals."""

    header: str
    path: str
    digits: int = 3


@dataclass(frozen=True)
class ReportView:
    """How the report shows a task's models (stored whole in report.json, so the report is
    drawn again from that file alone): the table's columns, the sentence above it, the plots'
    axes (a speed and a quality per model) and the training lines' validation score."""

    columns: tuple[Column, ...]
    # headers of the columns the terminal summary shows (with model, precision and size): few
    # enough to read in an 80-column log; report.md and report.html show them all
    summary: tuple[str, ...]
    # the sentence above the table, formatted with the report's test_rows / test_tokens and
    # the first timed model's benchmark fields (batch_size, threads, profile, ...)
    setting: str
    quality: str            # path of the plots' quality in a model row
    quality_label: str
    higher_is_better: bool
    timing: str             # the row field holding the timing: p50_ms and percentiles_ms
    speed_label: str        # what one timed unit is ("latency per inference, ms")
    roofline_measure: str   # what the roofline compares with ("p50")
    validation: str         # formatted with the validation metrics (and perplexity = e^loss)


class Task:
    """Base class of a task plug-in; see the module docstring. Subclasses set the class
    attributes and implement :meth:`selection`, :meth:`training_sets`, :meth:`evaluate` and
    :meth:`bench` (``register_task`` checks)."""

    name: str = ""
    labelled: bool = True           # the data carry a label column
    auto_model = None               # transformers Auto class of teacher and student
    runtimes: tuple[str, ...] = ("onnxruntime",)  # what its int8 student ships on (profiles.RUNTIMES)
    report: ReportView

    # What a model card (edgedistill.model_card) says of this task's ONNX models. The defaults
    # suit a task that sets none of them: its card loads the graph and lists its inputs.
    hub_pipeline: str = ""          # the Hub's pipeline tag, also transformers' pipeline() task
    ort_model_class: str = ""       # the optimum.onnxruntime class that loads the model
    example_text: str = "Hello world."
    pipeline_options: str = ""      # extra keyword arguments of the card's pipeline call, as code

    # ------------------------------------------------------------------ data and models

    def load_data(self, cfg: DataConfig, seed: int) -> TaskData:
        return load_task_data(cfg, seed, labelled=self.labelled)

    def load_model(self, path: Path, trust_remote_code: bool = False, **head):
        """The model in ``path``; ``head``: keywords that give it a new head (new_head,
        student_head)."""
        # transformers warns that a new head's weights are newly initialised: that is what was
        # asked for, and training follows (a model loaded without a new head keeps the warning)
        quiet = (silenced("transformers.modeling_utils", "newly initialized") if head
                 else contextlib.nullcontext())
        with quiet:
            return self.auto_model.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                   **head)

    def untrained_model(self, config):
        """A model of ``config`` with fresh weights (the search times shapes untrained)."""
        return self.auto_model.from_config(config)

    def save_model(self, model, tokenizer, folder: Path) -> None:
        """Save a model as it was loaded (a teacher used as it is), for :meth:`load_model`."""
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def new_head(self, labels: list[str] | None) -> dict:
        """Loading keywords that give a pretrained teacher this task's head."""
        return {}

    def student_head(self, teacher_config) -> dict:
        """Loading keywords that give another pretrained student the teacher's head."""
        return {}

    def selection(self, cfg: TrainingConfig, data: TaskData) -> dict:
        """Training arguments that choose the best epoch (and how evaluation runs)."""
        raise NotImplementedError

    def training_sets(self, tokenizer, args, data: TaskData, data_cfg: DataConfig, **kw):
        """(train, validation, collator, metrics, teacher still to run, record): see
        :func:`edgedistill.distill.training.classifier_sets`."""
        raise NotImplementedError

    # a search's one_se selection resamples validation rows: tasks whose score is a function of
    # per-row predictions say so, and give both
    per_row_validation = False

    def validation_predictions(self, model_dir: Path, data: TaskData, max_length: int) -> list:
        """The model's prediction for each validation row (JSON-able, row order)."""
        raise NotImplementedError

    def resampled_scores(self, predictions: dict, data: TaskData, metric: str, draws: int,
                         seed: int) -> dict:
        """``metric`` of each entry of ``predictions`` (name -> validation_predictions) on the
        same ``draws`` bootstrap resamples of the validation rows: name -> array of scores."""
        raise NotImplementedError

    # ------------------------------------------------------------------ preflight

    def check(self, recipe: Recipe) -> None:
        """Refuse settings that make no sense for this task (one line each, naming the key)."""

    def check_student(self, recipe: Recipe, config, teacher_tokenizer, student_tokenizer,
                      labels: list[str] | None) -> None:
        """Refuse a pretrained ``student.model`` (its ``config`` and tokenizer) the task cannot
        distil into. By default both must read the same token ids: the targets are per
        token."""
        check_same_tokenizer(teacher_tokenizer, student_tokenizer, "student.model")

    def qat_scheme(self, recipe: Recipe, target: Target):
        """The int8 scheme quantization-aware distillation simulates, or None."""
        return None

    def needs_calibration(self, q: QuantizeConfig, runtimes: tuple[str, ...]) -> bool:
        """Whether the quantize stage calibrates on training texts, for the block ``q`` and the
        run's ``runtimes``."""
        return q.mode == "static"

    # ------------------------------------------------------------------ stages

    def quantize(self, run, onnx_dir: Path, out: Path, student_dir: Path) -> dict:
        """The quantize stage's work: the int8 student (and its phone copy where the profile
        asks); tasks add their own models (int4, fp16) around it."""
        record = self.int8(run, onnx_dir, out, student_dir)
        if run.target.mobile_artifact:
            record["mobile"] = phone_artifact(out / "student-int8", out / "student-int8-mobile")
        return record

    def int8(self, run, onnx_dir: Path, out: Path, student_dir: Path) -> dict:
        r = run.recipe
        return quantize(onnx_dir, out / "student-int8", r.quantize, run.target,
                        calibration_texts=run.calibration, max_length=r.data.max_length)

    def models(self, run, teacher: Path, student: Path, exported: Path,
               quantized: Path) -> list[dict]:
        """The models the report compares, teacher first (the reference for agreement)."""
        models = [model_row("teacher", "teacher", "pytorch", "fp32", teacher)]
        if run.recipe.export.export_teacher:
            models.append(model_row("teacher-onnx", "teacher", "onnxruntime", "fp32",
                                    exported / "teacher"))
        return models + [
            model_row("student", "student", "pytorch", "fp32", student),
            model_row("student-onnx", "student", "onnxruntime", "fp32", exported / "student"),
            model_row("student-int8", "student", "onnxruntime", "int8",
                      quantized / "student-int8"),
        ]

    def evaluate(self, run, models: list[dict]) -> dict:
        raise NotImplementedError

    def bench(self, run, models: list[dict]) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ model card

    def onnxruntime_snippet(self, location: str, file_name: str) -> str:
        """Python that runs the model in ``location`` (a folder or a Hub repo id) with plain
        onnxruntime and prints the result; the card shows it and the tests run it."""
        imports, folder = local_folder(location)
        return "\n".join([
            "import onnxruntime as ort", *imports, "",
            folder,
            f'session = ort.InferenceSession(f"{{folder}}/{file_name}",',
            '                               providers=["CPUExecutionProvider"])',
            "for i in session.get_inputs():",
            "    print(i.name, i.type, i.shape)"])

    def pipeline_snippet(self, location: str, file_name: str) -> str:
        """Python that loads the model with optimum's ORTModel class into transformers'
        ``pipeline()`` and prints its output; empty where the task names neither."""
        if not (self.ort_model_class and self.hub_pipeline):
            return ""
        options = f", {self.pipeline_options}" if self.pipeline_options else ""
        return "\n".join([
            f"from optimum.onnxruntime import {self.ort_model_class}",
            "from transformers import AutoTokenizer, pipeline", "",
            f"model_id = {literal(location)}",
            (f"model = {self.ort_model_class}.from_pretrained(model_id, "
             f"file_name={literal(file_name)})"),
            "tokenizer = AutoTokenizer.from_pretrained(model_id)",
            f"pipe = pipeline({literal(self.hub_pipeline)}, model=model, tokenizer=tokenizer)",
            f"print(pipe({literal(self.example_text)}{options}))"])


def label_head(labels: list[str]) -> dict:
    """Loading keywords that give a model a fresh classification head for ``labels`` (per text
    or per token, as the model class says)."""
    return dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True)


def head_like(config) -> dict:
    """Loading keywords that give another pretrained model the head of ``config``'s labels."""
    return dict(num_labels=config.num_labels, id2label=config.id2label,
                label2id=config.label2id, ignore_mismatched_sizes=True)


def bench_settings(recipe: Recipe) -> BenchSettings:
    """The timing settings of a recipe's bench block (its shape filled in from the profile),
    for a model timed one forward pass at a time (classifiers, sentence embedders)."""
    b = recipe.bench
    return BenchSettings(b.warmup, b.iterations, b.min_seconds, b.batch_size, b.sequence_length,
                         b.real_length_samples, recipe.data.max_length, rounds=b.rounds)


def time_forward_passes(run, models: list[dict]) -> dict:
    """The bench stage of a task timed one forward pass at a time on the test texts."""
    results = benchmark([m["path"] for m in models], run.target, list(run.data.test["text"]),
                        bench_settings(run.recipe))
    for m, result in zip(models, results):
        if not print_over_budget(run.console, m["name"], result):
            run.console.print(f"  {m['name']:<{NAME_WIDTH}} p50 {result['latency']['p50_ms']:.2f} ms"
                              f"  peak RSS {result['peak_rss_mb']:.0f} MB")
    return {"models": {m["name"]: r for m, r in zip(models, results)}}


def model_row(name: str, role: str, backend: str, precision: str, path: Path) -> dict:
    """A model the report compares."""
    return {"name": name, "role": role, "backend": backend, "precision": precision, "path": path}


def literal(text: str) -> str:
    """``text`` as a double-quoted Python string literal, for the code a model card shows."""
    return json.dumps(text, ensure_ascii=False)


def snippet_opening(location: str, file_name: str,
                    transformers_names: str = "AutoTokenizer") -> list[str]:
    """The lines a task's onnxruntime loading snippet starts with: imports, the model's
    folder, its tokenizer and an onnxruntime session on its graph."""
    imports, folder = local_folder(location)
    return ["import numpy as np", "import onnxruntime as ort", *imports,
            f"from transformers import {transformers_names}", "", folder,
            "tokenizer = AutoTokenizer.from_pretrained(folder)",
            f'session = ort.InferenceSession(f"{{folder}}/{file_name}",',
            '                               providers=["CPUExecutionProvider"])']


def local_folder(location: str) -> tuple[list[str], str]:
    """(imports, line) of a loading snippet that sets ``folder`` to the model's files: the
    folder itself, or a download of the Hub repo ``location`` (onnxruntime opens files only)."""
    if Path(location).is_dir():
        return [], f"folder = {literal(location)}"
    return (["from huggingface_hub import snapshot_download"],
            f"folder = snapshot_download({literal(location)})")


def refuse(condition: bool, message: str) -> None:
    """Preflight's one-line refusal."""
    if condition:
        raise EdgeDistillError(message)


def refuse_classifier_and_lm_extras(r: Recipe, task: str, more_text: bool = False) -> None:
    """Refuse what is built for text classifiers and language models only: the teacher cache,
    the int8-aware phase, int4, accuracy-aware tuning and transfer sets (but for their
    unlabelled text where ``more_text``: a task that learns from text alone takes it)."""
    q, d = r.quantize, r.distill
    refuse(d.cache_teacher or q.int4 or q.pytorch_int4 or q.genai or d.qat_epochs > 0,
           f"distill.cache_teacher, distill.qat_epochs, quantize.int4, quantize.pytorch_int4 "
           f"and quantize.genai are not built for task {task}; its int8 path is quantize.mode")
    refuse(q.tolerable_loss is not None, "quantize.tolerable_loss: accuracy-aware tuning scores "
           f"text classifiers; for task {task} leave it unset")
    t = r.transfer
    if more_text:
        refuse(bool(t.augment.factor or t.augment.paraphrases or t.generate.prompts),
               f"transfer: task {task} takes more text (transfer.unlabelled) only; augmented "
               "and generated rows are built for text classifiers and language models")
    else:
        refuse(t.active, "transfer: transfer sets are built for text classifiers and "
               f"language models, not for task {task}")


def check_per_token_task(r: Recipe, task: str, head: str, what: str) -> None:
    """The preflight of the tasks that distil logits per token (tags, answer spans): the
    classifiers' logit losses, none of what is built for text classifiers and language models
    only (class weights included), and a teacher used as it is must have the task's ``head``
    (``what``: the task's model, in words)."""
    check_classifier_settings(r.distill, "distill.")
    refuse_classifier_and_lm_extras(r, task)
    for block in ("teacher", "distill"):
        refuse(getattr(r, block).class_weights != "none",
               f"{block}.class_weights: class weights are built for text classifiers; leave it "
               f"'none' for task {task}")
    if not r.teacher.finetune:
        heads = AutoConfig.from_pretrained(resolve_model(r.teacher.model), trust_remote_code=(
            r.teacher.trust_remote_code)).architectures or []
        refuse(not any(a.endswith(head) for a in heads),
               f"teacher.model: {', '.join(heads) or 'a model without a head'} is not a {what}; "
               f"set teacher.finetune: true to give it that head and train it, or take a "
               f"*{head} model")


# the heads transformers names its task classes by
TASK_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
              "ForCausalLM")


def refuse_other_heads(config, own: str, what: str) -> None:
    """Refuse a ``student.model`` whose head is another task's (``own``: this task's head)."""
    heads = [a for a in config.architectures or [] if a.endswith(TASK_HEADS)
             and not a.endswith(own)]
    refuse(bool(heads), f"student.model: its head ({heads[0] if heads else ''}) is not a "
           f"{what}'s; use the model without its head (its encoder)")


# the width of the model-name column in the stages' lines: the longest name a run writes
# (student-int8-openvino)
NAME_WIDTH = 21


def print_over_budget(console, name: str, result: dict) -> bool:
    if "over_budget" in result:
        console.print(f"  {name:<{NAME_WIDTH}} [red]{result['over_budget']}[/red]")
        return True
    return False
