"""Run a recipe's stages in order, skipping those whose inputs and settings are unchanged.

Each stage writes into ``<output>/<stage>.partial`` and, when it has finished, writes its
``manifest.json`` (settings, fingerprint, record, library versions) last and renames the folder
to ``<output>/<stage>``. A killed stage therefore never looks finished; a partial training stage
with the same fingerprint resumes from its last checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from transformers import AutoConfig, AutoTokenizer

from . import __version__, progress
from .artifacts import publish_folder, write_atomic
from .data import TaskData
from .distill.matching import resolve_matches
from .distill.trainer import check_distill_settings
from .distill.training import distill_student, finetune_teacher, plan_student, student_tokenizer
from .distill.transfer import check_transfer_settings
from .errors import EdgeDistillError
from .export import export_onnx
from .host import environment
from .model_card import write_model_cards
from .profiles import check_available, resolve_target
from .recipe import Recipe, load_recipe, recipe_from_dict
from .report import build_report, training_warnings, write_report
from .sources import check_remote_code, resolve_model
from .tasks import get_task

log = logging.getLogger(__name__)
STAGES = ("teacher", "distill", "export", "quantize", "evaluate", "bench")
MANIFEST = "manifest.json"


def fingerprint(inputs: dict) -> str:
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _folder_signature(path: Path) -> list:
    """Names, sizes and modification times of a model folder: changes when its files do."""
    return sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                  for f in path.rglob("*") if f.is_file())


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


class Run:
    """One run of a recipe into an output folder. What differs by task is asked of
    ``self.task`` (:mod:`edgedistill.tasks`); the profile is resolved once into ``self.target``."""

    console = progress.console

    def __init__(self, recipe: Recipe, output_dir: Path, until: str | None = None):
        self.recipe, self.out = recipe, output_dir
        self.until = until
        self.fingerprints: dict[str, str] = {}
        self.records: dict[str, dict] = {}
        self._data: TaskData | None = None
        self.task = get_task(recipe.task)
        self.target = resolve_target(recipe.bench.profile)
        # before the resolved recipe is written: it shows what ran
        recipe.bench.fill_shape(self.target.batch_size, self.target.sequence_length)
        self.qat_scheme = None  # set by preflight when distill.qat_epochs asks for it
        # the runtimes the int8 student ships on (the profile's, or quantize.runtimes), set by
        # preflight
        self.runtimes: tuple[str, ...] = ("onnxruntime",)
        self._warned: set[str] = set()

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = self.task.load_data(self.recipe.data, self.recipe.seed)
        return self._data

    def stage(self, name: str, inputs: dict, work: Callable[[Path], dict]) -> Path:
        """Run ``work(partial_dir)`` unless a finished stage with the same inputs exists."""
        fp = fingerprint({"stage": name, "edgedistill": __version__, **inputs})
        self.fingerprints[name] = fp
        final, partial = self.out / name, self.out / f"{name}.partial"
        index = STAGES.index(name) + 1
        done = read_manifest(final)
        if done and done.get("fingerprint") == fp:
            progress.note(f"[dim][{index}/{len(STAGES)}] {name}: unchanged, skipped[/dim]")
            self.records[name] = done["record"]
            return final
        marker = partial / ".fingerprint"
        if partial.exists() and not (marker.is_file() and marker.read_text() == fp):
            shutil.rmtree(partial)  # left over from other settings: nothing in it is reusable
        partial.mkdir(parents=True, exist_ok=True)
        marker.write_text(fp)
        start = time.perf_counter()
        with progress.stage(f"[{index}/{len(STAGES)}] {name}", self.out / "logs" / f"{name}.log"):
            record = work(partial)
        manifest = {"stage": name, "fingerprint": fp, "inputs": inputs,
                    "seconds": round(time.perf_counter() - start, 2), "record": record,
                    "environment": environment()}
        write_atomic(partial / MANIFEST, json.dumps(manifest, indent=2, default=str))
        publish_folder(partial, final)
        self.records[name] = record
        return final

    # ------------------------------------------------------------------ the stages

    def run(self) -> dict | None:
        r, data_cfg = self.recipe, asdict(self.recipe.data)
        # training never sees the test split, so its settings must not force a retrain
        train_cfg = {k: v for k, v in data_cfg.items() if k not in ("test_split", "max_test_samples")}
        log_file = self.out / "logs" / "preflight.log"
        with progress.library_logs(log_file) as counter:  # which copy of a model is used, too
            model_path = resolve_model(r.teacher.model)
            self.preflight(model_path)
        if counter.count:
            progress.note(f"[dim]preflight: {progress.warnings_line(counter, log_file)}[/dim]")
        teacher = self.stage("teacher", {
            "data": train_cfg, "teacher": asdict(r.teacher), "seed": r.seed,
            "model_files": _folder_signature(model_path),
        }, lambda d: finetune_teacher(self.task, model_path, r.teacher, self.data, r.data, d,
                                      r.seed))
        self._warn_about_training()
        if self.until == "teacher":
            return None
        distilled = self.stage("distill", {
            "teacher": self.fingerprints["teacher"], "data": train_cfg, "seed": r.seed,
            "student": asdict(r.student), "distill": asdict(r.distill),
            "student_files": _folder_signature(resolve_model(r.student.model))
            if r.student.model else None, "transfer": self._transfer_inputs(data_cfg),
            "qat_scheme": asdict(self.qat_scheme) if self.qat_scheme else None,
        }, lambda d: distill_student(self.task, teacher / "model", r.student, r.distill,
                                    self.data,
                                    r.data, d, r.seed, r.teacher.trust_remote_code,
                                    cache_dir=self.out / "teacher-cache",
                                    transfer=r.transfer if r.transfer.active else None,
                                    transfer_cache=self.out / "transfer-cache",
                                    qat_scheme=self.qat_scheme))
        self._warn_about_training()
        if self.until == "distill":
            return None
        exported = self.stage("export", {
            "teacher": self.fingerprints["teacher"], "distill": self.fingerprints["distill"],
            "export": asdict(r.export),
        }, self._export(teacher / "model", distilled / "model"))
        quantized = self.stage("quantize", {
            "export": self.fingerprints["export"], "quantize": asdict(r.quantize),
            "profile": r.bench.profile, "runtimes": self.runtimes,
        }, lambda d: self.task.quantize(self, exported / "student", d, distilled / "model"))
        models = self.task.models(self, teacher / "model", distilled / "model", exported,
                                  quantized)
        upstream = {k: self.fingerprints[k] for k in ("teacher", "distill", "export", "quantize")}
        self.stage("evaluate", {**upstream, "data": data_cfg, "evaluate": asdict(r.evaluate)},
                   lambda d: {**self.task.evaluate(self, models),
                              "dropped_rows": self.data.dropped})
        self.stage("bench", {**upstream, "bench": asdict(r.bench), "data": data_cfg},
                   lambda d: self.task.bench(self, models))
        report = build_report(r, models, self.records, self.task.report)
        write_report(report, self.out, plots=r.report.plots)
        write_model_cards(report, self.out)
        return report

    def _warn_about_training(self) -> None:
        """Say at the end of a training stage what the report will flag: a teacher still
        learning when it stopped, or one its student beat (each warning once)."""
        for warning in training_warnings(self.records):
            if warning not in self._warned:
                log.warning(warning)
                self._warned.add(warning)

    def _transfer_inputs(self, data_cfg: dict) -> dict | None:
        """What the transfer set is made from: its settings, the files of its unlabelled
        sources and the test split's settings (its texts are kept out of the set)."""
        t = self.recipe.transfer
        if not t.active:
            return None
        files = {}
        for u in t.unlabelled:
            path = Path(u.source).expanduser()
            if u.source != "train" and path.exists():
                files[u.source] = (_folder_signature(path) if path.is_dir() else
                                   [path.stat().st_size, path.stat().st_mtime_ns])
        return {"settings": asdict(t), "files": files, "data": data_cfg}

    def preflight(self, model_path: Path) -> None:
        """Fail on settings that would break a later stage before spending minutes on the
        earlier ones: the task's rules, unknown names, impossible layer choices, lengths past
        the model's positions, and data problems (the data are loaded here). Single-field
        limits were checked when the recipe was read."""
        r = self.recipe
        check_distill_settings(r.distill, "distill.")
        self.target.int8_for(r.quantize)  # an unknown preset fails here, not after training
        self.runtimes = self.target.runtimes_for(r.quantize, self.task.runtimes)
        check_available(self.target)
        self.task.check(r)
        check_transfer_settings(r.transfer, r.data.max_length)
        self.qat_scheme = self.task.qat_scheme(r, self.target)
        check_remote_code(model_path, r.teacher.trust_remote_code, "teacher.trust_remote_code")
        if r.teacher.trust_remote_code:
            log.warning(f"teacher.trust_remote_code is on: Python code from {r.teacher.model} "
                        "will run on this machine")
        t_config = AutoConfig.from_pretrained(model_path,
                                              trust_remote_code=r.teacher.trust_remote_code)
        s_config, kept = plan_student(model_path, t_config, r.student,
                                      r.teacher.trust_remote_code)
        resolve_matches([asdict(m) for m in r.distill.matches], s_config, t_config, kept,
                        "distill.matches")
        for who, config in (("teacher", t_config), ("student", s_config)):
            positions = getattr(config, "max_position_embeddings", None)
            for key, length in (("data.max_length", r.data.max_length),
                                ("bench.sequence_length", r.bench.sequence_length)):
                if positions and length > positions:
                    raise EdgeDistillError(f"{key}: {length} exceeds the {who}'s {positions} "
                                           f"positions; set {key} <= {positions}")
        if r.student.model:
            teacher_tokenizer = AutoTokenizer.from_pretrained(
                model_path, trust_remote_code=r.teacher.trust_remote_code)
            self.task.check_student(r, s_config, teacher_tokenizer,
                                    student_tokenizer(teacher_tokenizer, r.student),
                                    self.data.labels)
        _ = self.data

    def _export(self, teacher_dir: Path, student_dir: Path) -> Callable[[Path], dict]:
        cfg = self.recipe.export

        def work(d: Path) -> dict:
            texts = list(self.data.test["text"])[:16]
            length = self.recipe.data.max_length
            record = {"student": export_onnx(student_dir, d / "student", cfg.opset, cfg.atol,
                                             texts, length)}
            if cfg.export_teacher:
                record["teacher"] = export_onnx(teacher_dir, d / "teacher", cfg.opset, cfg.atol,
                                                texts, length)
            return record
        return work

    @functools.cached_property
    def calibration(self) -> list[str] | None:
        """Training texts (never the test split) for what calibrates (the task says what:
        static int8, tuning's static trials, GPTQ), or None."""
        q = self.recipe.quantize
        if not self.task.needs_calibration(q, self.runtimes):
            return None
        return self.data.calibration_texts(q.calibration_samples, self.recipe.seed)


def run(recipe: str | Path | Recipe | None = None, output_dir: str | Path | None = None,
        overrides: list[str] | None = None, until: str | None = None) -> dict | None:
    """Run a recipe (a path, a Recipe, or None for the packaged default); return the report.
    ``until``: 'teacher' or 'distill' stops after that stage (and returns None)."""
    source = "recipe" if isinstance(recipe, Recipe) else str(recipe or "the default recipe")
    if isinstance(recipe, Recipe):  # validated like a file, with the overrides applied
        recipe = recipe_from_dict(recipe.to_dict(), "recipe", overrides)
    else:
        recipe = load_recipe(recipe, overrides)
    if until not in (None, "teacher", "distill"):
        raise EdgeDistillError(f"until: '{until}' is not a stage a run can stop after; use "
                               "'teacher' or 'distill'")
    try:  # an unknown task fails before the output folder is made
        get_task(recipe.task)
    except EdgeDistillError as e:
        raise EdgeDistillError(f"{source}: {e}") from None
    out = Path(output_dir or recipe.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise EdgeDistillError(f"{out}: output folder is not writable ({e.strerror}); "
                               "choose another with --output")
    pipeline = Run(recipe, out, until)
    recipe.dump(out / "recipe.resolved.yaml")
    return pipeline.run()
