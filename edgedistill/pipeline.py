"""Run a recipe's stages in order, skipping those whose inputs and settings are unchanged.

Each stage writes into ``<output>/<stage>.partial`` and, when it has finished, writes its
``manifest.json`` (settings, fingerprint, record, library versions) last and renames the folder
to ``<output>/<stage>``. A killed stage therefore never looks finished; a partial training stage
with the same fingerprint resumes from its last checkpoint.

Under a launcher (torchrun, accelerate launch) the training stages run on every process and the
others on the main process alone (:mod:`edgedistill.distributed`); only the main process writes
manifests, renames stage folders and writes the report.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from transformers import AutoConfig, AutoTokenizer

from . import __version__, distributed, progress, search
from .artifacts import publish_folder, write_atomic
from .data import TaskData
from .distill.matching import resolve_matches
from .distill.student import check_positions, plan_student, student_tokenizer
from .distill.trainer import check_distill_settings
from .distill.training import distill_student, finetune_teacher
from .distill.transfer import check_transfer_settings
from .errors import EdgeDistillError
from .export import export_onnx
from .host import environment
from .model_card import CARD_FILE, write_model_cards
from .profiles import check_available, resolve_target
from .recipe import Recipe, load_recipe, recipe_from_dict
from .report import build_report, write_report
from .report_training import training_warnings
from .sources import check_remote_code, resolve_model
from .tasks import get_task

log = logging.getLogger(__name__)
STAGES = ("teacher", "search", "distill", "export", "quantize", "evaluate", "bench")
TRAINING_STAGES = ("teacher", "distill")  # run on every process of a launched run
MANIFEST = "manifest.json"


def model_rows(models: list[dict], out: Path) -> list[list[str]]:
    """What a quantize fingerprint covers of the task's model list: each model's name, backend,
    precision and place in the run, so that code which names or places its outputs otherwise
    builds them again instead of reading another model under the name."""
    return [[m["name"], m["backend"], m["precision"], os.path.relpath(m["path"], out)]
            for m in models]


def check_models_present(models: list[dict], out: Path) -> None:
    """Refuse, before evaluation or benchmarking loads any model, a finished stage whose folder
    lacks a model the task lists (moved or deleted by hand)."""
    for m in models:
        path = Path(m["path"])
        if not path.exists():
            fix = (f"delete {out / path.relative_to(out).parts[0]} to build it again"
                   if path.is_relative_to(out) else "restore it")
            raise EdgeDistillError(f"{path}: {m['name']} is missing from a finished stage; "
                                   f"{fix}")


def fingerprint(inputs: dict) -> str:
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _folder_signature(path: Path, ignore: tuple[str, ...] = ()) -> list:
    """Names, sizes and modification times of a model folder: changes when its files do
    (those named in ``ignore`` aside)."""
    return sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                  for f in path.rglob("*") if f.is_file() and f.name not in ignore)


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
        self.world = distributed.join(recipe.distributed)
        if not self.world.main:  # one process speaks for the run; the others log to files
            progress.mute()
        self.task = get_task(recipe.task)
        self.target = resolve_target(recipe.bench.profile)
        # the stages this run has: a search only where the recipe sets its budget
        self.stages = tuple(s for s in STAGES if s != "search" or recipe.search.active)
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

    def log_file(self, name: str) -> Path:
        """Where a stage's library logs go: each process of a launched run writes its own."""
        logs = self.out / "logs"
        return logs / (f"{name}.log" if self.world.main else f"rank-{self.world.rank}/{name}.log")

    def stage(self, name: str, inputs: dict, work: Callable[[Path], dict]) -> Path:
        """Run ``work(partial_dir)`` unless a finished stage with the same inputs exists.
        A training stage's work runs on every process of a launched run, another stage's on the
        main process while the others wait; the main process alone prepares the partial folder
        and publishes it, and every process gets its record."""
        fp = fingerprint({"stage": name, "edgedistill": __version__, **inputs})
        self.fingerprints[name] = fp
        final, partial = self.out / name, self.out / f"{name}.partial"
        index = self.stages.index(name) + 1
        # every process decides alike: the previous stage was published before any went on
        done = read_manifest(final)
        if done and done.get("fingerprint") == fp:
            progress.note(f"[dim][{index}/{len(self.stages)}] {name}: unchanged, skipped[/dim]")
            self.records[name] = done["record"]
            return final

        def prepare() -> None:
            marker = partial / ".fingerprint"
            if partial.exists() and not (marker.is_file() and marker.read_text() == fp):
                shutil.rmtree(partial)  # left over from other settings: nothing is reusable
            partial.mkdir(parents=True, exist_ok=True)
            marker.write_text(fp)

        def publish(record: dict) -> dict:
            manifest = {"stage": name, "fingerprint": fp, "inputs": inputs,
                        "seconds": round(time.perf_counter() - start, 2), "record": record,
                        "environment": environment()}
            write_atomic(partial / MANIFEST, json.dumps(manifest, indent=2, default=str))
            publish_folder(partial, final)
            return record

        distributed.on_main(self.world, prepare, f"preparing {name}")
        start = time.perf_counter()
        everywhere = name in TRAINING_STAGES
        # a process that only waits has no log of its own to write
        shown = progress.stage(f"[{index}/{len(self.stages)}] {name}", self.log_file(name)) \
            if everywhere or self.world.main else contextlib.nullcontext()
        with shown:
            if everywhere:  # the report says on how many processes each trained
                record = {**work(partial), "processes": self.world.describe()}
                self.records[name] = distributed.on_main(self.world, lambda: publish(record),
                                                         f"the {name} stage")
            else:
                with distributed.all_cores(self.world):
                    self.records[name] = distributed.on_main(
                        self.world, lambda: publish(work(partial)), f"the {name} stage")
        return final

    # ------------------------------------------------------------------ the stages

    def run(self) -> dict | None:
        r, data_cfg = self.recipe, asdict(self.recipe.data)
        # training never sees the test split, so its settings must not force a retrain
        train_cfg = {k: v for k, v in data_cfg.items() if k not in ("test_split", "max_test_samples")}
        log_file = self.log_file("preflight")
        with progress.library_logs(log_file) as counter:  # which copy of a model is used, too
            model_path = resolve_model(r.teacher.model)
            self.preflight(model_path)
        if counter.count:
            progress.note(f"[dim]preflight: {progress.warnings_line(counter, log_file)}[/dim]")
        teacher = self.stage("teacher", {
            "data": train_cfg, "teacher": asdict(r.teacher), "seed": r.seed,
            "model_files": _folder_signature(model_path),
            **self._batch_inputs(r.teacher.batch_size),
        }, lambda d: finetune_teacher(self.task, model_path, r.teacher, self.data, r.data, d,
                                      r.seed, r.distributed))
        self._warn_about_training()
        if self.until == "teacher":
            return None
        if r.search.active:  # the student and its distillation settings are chosen here
            self.stage("search", {
                "teacher": self.fingerprints["teacher"], "data": train_cfg, "seed": r.seed,
                **{k: asdict(getattr(r, k)) for k in ("search", "student", "distill", "export",
                                                      "quantize", "bench")},
                # a run's folder gets its model card written again on every run: not the model
                "budget_model_files": _folder_signature(Path(r.search.budget_model),
                                                        ignore=(CARD_FILE,))
                if r.search.budget_model else None,
                "student_model_files": [_folder_signature(resolve_model(m))
                                        for m in r.search.student_models],
            }, lambda d: search.search(self, teacher / "model", d,
                                       self.out / "search-cache" / "costs.json"))
            r.student, r.distill = search.chosen_blocks(self.records["search"])
        distilled = self.stage("distill", {
            "teacher": self.fingerprints["teacher"], "data": train_cfg, "seed": r.seed,
            "student": asdict(r.student), "distill": asdict(r.distill),
            "student_files": _folder_signature(resolve_model(r.student.model))
            if r.student.model else None, "transfer": self._transfer_inputs(data_cfg),
            "qat_scheme": asdict(self.qat_scheme) if self.qat_scheme else None,
            **self._batch_inputs(r.distill.batch_size),
        }, lambda d: distill_student(self.task, teacher / "model", r.student, r.distill,
                                    self.data,
                                    r.data, d, r.seed, r.teacher.trust_remote_code,
                                    cache_dir=self.out / "teacher-cache",
                                    transfer=r.transfer if r.transfer.active else None,
                                    transfer_cache=self.out / "transfer-cache",
                                    qat_scheme=self.qat_scheme, parallel=r.distributed))
        self._warn_about_training()
        if self.until == "distill":
            return None
        exported = self.stage("export", {
            "teacher": self.fingerprints["teacher"], "distill": self.fingerprints["distill"],
            "export": asdict(r.export),
        }, self._export(teacher / "model", distilled / "model"))
        models = self.task.models(self, teacher / "model", distilled / "model", exported,
                                  self.out / "quantize")
        self.stage("quantize", {
            "export": self.fingerprints["export"], "quantize": asdict(r.quantize),
            "profile": r.bench.profile, "runtimes": self.runtimes,
            "models": model_rows(models, self.out),
        }, lambda d: self.task.quantize(self, exported / "student", d, distilled / "model"))
        upstream = {k: self.fingerprints[k] for k in ("teacher", "distill", "export", "quantize")}
        # the rows themselves, not only the settings that pick them: an evaluation of other
        # rows (another edgedistill's sampling, a changed file) is not reused
        test_rows = fingerprint(self.data.test.to_dict())

        def present() -> list[dict]:
            check_models_present(models, self.out)
            return models

        self.stage("evaluate", {**upstream, "data": data_cfg, "test_rows": test_rows,
                                "evaluate": asdict(r.evaluate)},
                   lambda d: {**self.task.evaluate(self, present()),
                              "dropped_rows": self.data.dropped})
        self.stage("bench", {**upstream, "bench": asdict(r.bench), "data": data_cfg},
                   lambda d: self.task.bench(self, present()))
        if not self.world.main:
            return None  # the main process writes the report
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

    def _batch_inputs(self, batch_size: int) -> dict:
        """A training stage's fingerprint names the global batch where it is not the recipe's
        own (per-device batches on several processes): the process count alone, with the
        global batch kept, retrains nothing."""
        steps = distributed.global_batch(batch_size, self.recipe.distributed, self.world.size)
        return {"global_batch": steps} if steps != batch_size else {}

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
        distributed.pick_backend(r.distributed.backend)  # nccl on a machine without GPUs
        for block in ("teacher", "distill"):  # a batch that does not split fails now
            distributed.per_device_batch(getattr(r, block).batch_size, r.distributed,
                                         self.world.size, f"{block}.batch_size")
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
        if r.search.active:  # the candidates' shapes replace the recipe student's
            search.check(r, model_path, t_config, self.task, self.out, self.data.labels)
        for who, config in (("teacher", t_config), ("student", s_config)):
            check_positions(config, who, r.data.max_length, r.bench.sequence_length)
        if r.student.model:
            teacher_tokenizer = AutoTokenizer.from_pretrained(
                model_path, trust_remote_code=r.teacher.trust_remote_code)
            self.task.check_student(r, s_config, teacher_tokenizer,
                                    student_tokenizer(teacher_tokenizer, r.student),
                                    self.data.labels)
            if r.student.cuts_model():  # a model a recipe names whole elsewhere: say so
                progress.note(f"student.model: {s_config.num_hidden_layers} of its blocks "
                              "kept (student.num_layers / layer_ids; unset them to train it "
                              "whole)")
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
        probe = out / f".write-test-{os.getpid()}"  # one per process of a launched run
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise EdgeDistillError(f"{out}: output folder is not writable ({e.strerror}); "
                               "choose another with --output")
    pipeline = Run(recipe, out, until)
    if pipeline.world.main:
        recipe.dump(out / "recipe.resolved.yaml")
    return pipeline.run()
