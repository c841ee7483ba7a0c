"""Run a recipe's stages in order, skipping those whose inputs and settings are unchanged.

Each stage writes into ``<output>/<stage>.partial`` and, when it has finished, writes its
``manifest.json`` (settings, fingerprint, record, library versions) last and renames the folder
to ``<output>/<stage>``. A killed stage therefore never looks finished; a partial training stage
with the same fingerprint resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
from rich.console import Console
from transformers import AutoConfig

from .bench.generation import GenerationSettings, benchmark_generation
from .bench.profiles import check_available, load_profile
from .bench.runner import BenchSettings, benchmark
from .data import TaskData, lm_blocks, load_task_data
from .distill.losses.token import TOKEN_LOSSES
from .distill.matching import resolve_matches
from .distill.qat import fake_quant_matches_onnxruntime, int8_scheme
from .distill.trainer import check_distill_settings
from .environment import environment
from .errors import EdgeDistillError
from .evaluation import evaluate, evaluate_lm
from .export import export_onnx
from .mobile import phone_artifact
from .quantization import int8_config, quantize, quantize_int4, resolve_preset, to_fp16
from .quantization.weight_only import quantize_weight_only
from .recipe import Recipe, load_recipe, recipe_from_dict
from .report import build_report, print_summary, write_report
from .sources import check_remote_code, resolve_model
from .training import distil_student, finetune_teacher, plan_student
from .transfer import check_transfer_settings

console = Console(stderr=True)
STAGES = ("teacher", "distill", "export", "quantize", "evaluate", "bench")
# what tuning reports about its search, apart from the chosen model's quantize record
TUNING_KEYS = ("passed", "metric", "tolerable_loss", "max_trials", "baseline", "trials",
               "chosen", "skipped", "ranking")
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
    """One run of a recipe into an output folder."""

    def __init__(self, recipe: Recipe, output_dir: Path, until: str | None = None):
        self.recipe, self.out = recipe, output_dir
        self.until = until
        self.fingerprints: dict[str, str] = {}
        self.records: dict[str, dict] = {}
        self._data: TaskData | None = None
        self.causal = recipe.task == "causal-lm"
        recipe.bench.fill_shape()  # before the resolved recipe is written: it shows what ran
        # the profile (a GPU's) asks for an fp16 student; built for encoders (a decoder's fp16
        # KV-cache graph was not validated here)
        self.fp16 = bool(resolve_preset(recipe.bench.profile).get("fp16")) and not self.causal
        self.qat_scheme = None  # set by preflight when distill.qat_epochs asks for it

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = load_task_data(self.recipe.data, self.recipe.seed,
                                        labelled=not self.causal)
        return self._data

    def stage(self, name: str, inputs: dict, work: Callable[[Path], dict]) -> Path:
        """Run ``work(partial_dir)`` unless a finished stage with the same inputs exists."""
        from . import __version__

        fp = fingerprint({"stage": name, "edgedistill": __version__, **inputs})
        self.fingerprints[name] = fp
        final, partial = self.out / name, self.out / f"{name}.partial"
        index = STAGES.index(name) + 1
        done = read_manifest(final)
        if done and done.get("fingerprint") == fp:
            console.print(f"[dim][{index}/{len(STAGES)}] {name}: unchanged, skipped[/dim]")
            self.records[name] = done["record"]
            return final
        marker = partial / ".fingerprint"
        if partial.exists() and not (marker.is_file() and marker.read_text() == fp):
            shutil.rmtree(partial)  # left over from other settings: nothing in it is reusable
        partial.mkdir(parents=True, exist_ok=True)
        marker.write_text(fp)
        console.print(f"[bold][{index}/{len(STAGES)}] {name}[/bold]")
        start = time.perf_counter()
        record = work(partial)
        manifest = {"stage": name, "fingerprint": fp, "inputs": inputs,
                    "seconds": round(time.perf_counter() - start, 2), "record": record,
                    "environment": environment()}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        self.records[name] = record
        return final

    # ------------------------------------------------------------------ the stages

    def run(self) -> dict | None:
        r, data_cfg = self.recipe, asdict(self.recipe.data)
        # training never sees the test split, so its settings must not force a retrain
        train_cfg = {k: v for k, v in data_cfg.items() if k not in ("test_split", "max_test_samples")}
        model_path = resolve_model(r.teacher.model)
        self.preflight(model_path)
        teacher = self.stage("teacher", {
            "data": train_cfg, "teacher": asdict(r.teacher), "seed": r.seed,
            "model_files": _folder_signature(model_path),
        }, lambda d: finetune_teacher(model_path, r.teacher, self.data, r.data, d, r.seed))
        distilled = self.stage("distill", {
            "teacher": self.fingerprints["teacher"], "data": train_cfg, "seed": r.seed,
            "student": asdict(r.student), "distill": asdict(r.distill),
            "student_files": _folder_signature(resolve_model(r.student.model))
            if r.student.model else None, "transfer": self._transfer_inputs(data_cfg),
            "qat_scheme": asdict(self.qat_scheme) if self.qat_scheme else None,
        }, lambda d: distil_student(teacher / "model", r.student, r.distill, self.data,
                                    r.data, d, r.seed, r.teacher.trust_remote_code,
                                    cache_dir=self.out / "teacher-cache",
                                    transfer=r.transfer if r.transfer.active else None,
                                    transfer_cache=self.out / "transfer-cache",
                                    qat_scheme=self.qat_scheme))
        if self.until == "distill":
            return None
        exported = self.stage("export", {
            "teacher": self.fingerprints["teacher"], "distill": self.fingerprints["distill"],
            "export": asdict(r.export),
        }, self._export(teacher / "model", distilled / "model"))
        quantized = self.stage("quantize", {
            "export": self.fingerprints["export"], "quantize": asdict(r.quantize),
            "profile": r.bench.profile,
        }, lambda d: self._quantize(exported / "student", d, distilled / "model"))
        models = self._models(teacher / "model", distilled / "model", exported, quantized)
        upstream = {k: self.fingerprints[k] for k in ("teacher", "distill", "export", "quantize")}
        self.stage("evaluate", {**upstream, "data": data_cfg, "evaluate": asdict(r.evaluate)},
                   lambda d: self._evaluate(models))
        self.stage("bench", {**upstream, "bench": asdict(r.bench), "data": data_cfg},
                   lambda d: self._bench(models))
        report = build_report(r, models, self.records)
        write_report(report, self.out, plots=r.report.plots)
        print_summary(report, console)
        return report

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
        earlier ones: unknown names, impossible layer choices, lengths past the model's
        positions, and data problems (the data are loaded here)."""
        r = self.recipe
        check_distill_settings(r.distill, "distill.")
        positive = {"teacher.epochs": r.teacher.epochs, "distill.epochs": r.distill.epochs,
                    "teacher.learning_rate": r.teacher.learning_rate,
                    "distill.learning_rate": r.distill.learning_rate,
                    "teacher.batch_size": r.teacher.batch_size,
                    "distill.batch_size": r.distill.batch_size,
                    "quantize.calibration_samples": r.quantize.calibration_samples,
                    "quantize.max_trials": r.quantize.max_trials,
                    "evaluate.batch_size": r.evaluate.batch_size,
                    "data.max_length": r.data.max_length, "bench.rounds": r.bench.rounds,
                    "bench.iterations": r.bench.iterations, "bench.batch_size": r.bench.batch_size,
                    "bench.sequence_length": r.bench.sequence_length}
        for key, value in positive.items():
            if value <= 0:
                raise EdgeDistillError(f"{key}: {value} must be > 0")
        resolve_preset(r.bench.profile, r.quantize.preset, r.quantize.per_channel, r.quantize.fuse)
        check_available(load_profile(r.bench.profile))
        self._check_task(r)
        check_transfer_settings(r.transfer, self.causal, r.distill.alpha_distil,
                                r.distill.cache_teacher, r.data.max_length)
        self._check_qat(r)
        check_remote_code(model_path, r.teacher.trust_remote_code, "teacher.trust_remote_code")
        if r.teacher.trust_remote_code:
            console.print(f"[yellow]warning: teacher.trust_remote_code is on: Python code from "
                          f"{r.teacher.model} will run on this machine[/yellow]")
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
        _ = self.data

    def _check_task(self, r: Recipe) -> None:
        """Settings that only make sense for one kind of model."""
        token_loss = r.distill.distil_loss in TOKEN_LOSSES
        if self.causal and not token_loss:
            raise EdgeDistillError(
                f"distill.distil_loss: '{r.distill.distil_loss}' compares classifier outputs; "
                f"task causal-lm takes one of {', '.join(TOKEN_LOSSES)}")
        if not self.causal and token_loss:
            raise EdgeDistillError(
                f"distill.distil_loss: '{r.distill.distil_loss}' is a token-level loss for "
                "task: causal-lm; a classifier takes soft_cross_entropy or kl_divergence")
        if self.causal and r.distill.matches:
            raise EdgeDistillError("distill.matches: feature and relation losses are not "
                                   "supported for task causal-lm yet; remove them")
        if self.causal and r.quantize.mode == "static":
            raise EdgeDistillError("quantize.mode: static calibration of a decoder with a KV "
                                   "cache is not supported yet; use dynamic (or int4: true)")
        if not self.causal and (r.distill.cache_teacher or r.quantize.int4
                                or r.quantize.pytorch_int4):
            raise EdgeDistillError("distill.cache_teacher, quantize.int4 and quantize."
                                   "pytorch_int4 are for task causal-lm; a classifier's "
                                   "logits are cached already and its int8 path is quantize.mode")
        loss = r.quantize.tolerable_loss
        if loss is not None:
            if self.causal:
                raise EdgeDistillError("quantize.tolerable_loss: accuracy-aware tuning is for "
                                       "classifiers (it judges on validation labels); remove it")
            if not 0 < loss < 1:
                raise EdgeDistillError(f"quantize.tolerable_loss: {loss} must be between 0 "
                                       "and 1 (a relative loss: 0.01 is 1%)")
            if r.quantize.nodes_to_exclude or r.quantize.operators:
                raise EdgeDistillError("quantize.tolerable_loss: tuning chooses the settings "
                                       "and the fp32 nodes itself; remove quantize."
                                       "nodes_to_exclude / quantize.operators")

    def _check_qat(self, r: Recipe) -> None:
        """Quantization-aware distillation simulates the one int8 scheme the quantize stage
        will apply; settings that leave that scheme open or make it another are refused."""
        d, q = r.distill, r.quantize
        if d.qat_epochs < 0 or (d.qat_learning_rate is not None and d.qat_learning_rate <= 0):
            raise EdgeDistillError("distill.qat_epochs must be >= 0 and distill."
                                   "qat_learning_rate > 0")
        if not d.qat_epochs:
            return
        if self.causal:
            raise EdgeDistillError("distill.qat_epochs: quantization-aware distillation is for "
                                   "classifiers; a language model's int4 path calibrates with "
                                   "GPTQ (quantize.int4_algorithm: gptq)")
        if q.tolerable_loss is not None:
            raise EdgeDistillError("distill.qat_epochs: accuracy-aware tuning may ship another "
                                   "int8 scheme than the one trained for; remove "
                                   "quantize.tolerable_loss or distill.qat_epochs")
        if q.nodes_to_exclude or q.operators:
            raise EdgeDistillError("distill.qat_epochs: the simulation rounds every Linear as "
                                   "default int8 does; remove quantize.nodes_to_exclude / "
                                   "quantize.operators")
        self.qat_scheme = int8_scheme(int8_config(r.bench.profile, q.preset, q.per_channel,
                                                  q.fuse, q.mode)[0])

    def _quantize(self, onnx_dir: Path, d: Path, student_dir: Path) -> dict:
        q, r = self.recipe.quantize, self.recipe
        texts = self._calibration_texts()

        def int8() -> dict:
            return quantize(onnx_dir, d / "student-int8", r.bench.profile, q.preset,
                            q.per_channel, q.mode, texts, q.calibration, r.data.max_length,
                            q.nodes_to_exclude, q.operators, q.fuse)

        record = int8() if q.tolerable_loss is None else self._tune(onnx_dir, d, texts, int8)
        if self.qat_scheme:
            # the int8-aware phase simulated this model's rounding: check that it did
            record["qat_check"] = fake_quant_matches_onnxruntime(
                student_dir, d / "student-int8", list(self.data.validation["text"])[:64],
                self.qat_scheme, r.data.max_length)
        if q.int4:
            record["int4"] = quantize_int4(
                onnx_dir, d / "student-int4", q.int4_block_size, q.int4_accuracy_level,
                algorithm=q.int4_algorithm, calibration_texts=texts,
                calibration_samples=q.calibration_samples, max_length=r.data.max_length)
        if q.pytorch_int4:
            record["pytorch_int4"] = quantize_weight_only(
                student_dir, d / "student-int4-pytorch", q.pytorch_int4,
                group_size=q.int4_block_size, calibration_texts=texts or (),
                calibration_samples=q.calibration_samples, max_length=r.data.max_length)
        if self.fp16:
            record["fp16"] = to_fp16(onnx_dir, d / "student-fp16")
        if load_profile(r.bench.profile).mobile_artifact:
            record["mobile"] = phone_artifact(d / "student-int8", d / "student-int8-mobile")
        return record

    def _tune(self, onnx_dir: Path, d: Path, texts: list[str], int8: Callable[[], dict]) -> dict:
        """Accuracy-aware int8 (:mod:`edgedistill.quantization.tuning`) judged on the validation
        split. When no setting passes, the default int8 model goes on to evaluation and the
        report, marked as not meeting the tolerance."""
        from .quantization.tuning import tune

        q, r, validation = self.recipe.quantize, self.recipe, self.data.validation
        result = tune(onnx_dir, d / "student-int8", list(validation["text"]),
                      list(validation["label"]), self.data.labels, q.tolerable_loss,
                      q.max_trials, r.bench.profile, q.preset, q.per_channel,
                      calibration_texts=texts, max_length=r.data.max_length)
        summary = {k: result.pop(k) for k in TUNING_KEYS}
        if not summary["passed"]:
            console.print(f"[red]tuning: no int8 setting kept {summary['metric']} within "
                          f"{q.tolerable_loss:.1%} of fp32 in {len(summary['trials'])} trials; "
                          "student-int8 is the untuned default, marked as failing[/red]")
            result = int8()
        return {**result, "tuning": {**summary, "texts": len(validation)}}

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

    def _calibration_texts(self) -> list[str] | None:
        """Training texts (never the test split) for what calibrates: static int8, tuning (its
        static trials), GPTQ."""
        q = self.recipe.quantize
        gptq = q.int4 and q.int4_algorithm == "gptq"
        if (q.mode != "static" and q.tolerable_loss is None and not gptq
                and q.pytorch_int4 in (None, "rtn")):
            return None
        train = self.data.train.shuffle(seed=self.recipe.seed)
        return list(train.select(range(min(q.calibration_samples, len(train))))["text"])

    def _models(self, teacher: Path, student: Path, exported: Path, quantized: Path) -> list[dict]:
        """The models the report compares, teacher first (the reference for agreement)."""
        models = [{"name": "teacher", "role": "teacher", "backend": "pytorch",
                   "precision": "fp32", "path": teacher}]
        if self.recipe.export.export_teacher:
            models.append({"name": "teacher-onnx", "role": "teacher", "backend": "onnxruntime",
                           "precision": "fp32", "path": exported / "teacher"})
        models += [
            {"name": "student", "role": "student", "backend": "pytorch", "precision": "fp32",
             "path": student},
            {"name": "student-onnx", "role": "student", "backend": "onnxruntime",
             "precision": "fp32", "path": exported / "student"},
            {"name": "student-int8", "role": "student", "backend": "onnxruntime",
             "precision": "int8", "path": quantized / "student-int8"},
        ]
        if self.recipe.quantize.int4:
            models.append({"name": "student-int4", "role": "student", "backend": "onnxruntime",
                           "precision": "int4", "path": quantized / "student-int4"})
        if self.recipe.quantize.pytorch_int4:
            models.append({"name": "student-int4-pytorch", "role": "student",
                           "backend": "pytorch", "precision": "int4",
                           "path": quantized / "student-int4-pytorch"})
        if self.fp16:
            models.append({"name": "student-fp16", "role": "student", "backend": "onnxruntime",
                           "precision": "fp16", "path": quantized / "student-fp16"})
        return models

    def _evaluate(self, models: list[dict]) -> dict:
        if self.causal:
            return self._evaluate_lm(models)
        test, cfg = self.data.test, self.recipe
        results, reference = {}, None
        for m in models:
            metrics = evaluate(m["path"], test, self.data.labels, cfg.evaluate.batch_size,
                               cfg.data.max_length, reference_predictions=reference)
            if reference is None:
                reference = metrics["predictions"]
                metrics["agreement"] = 1.0
            results[m["name"]] = metrics
            console.print(f"  {m['name']:<14} accuracy {metrics['accuracy']:.3f}  "
                          f"macro-F1 {metrics['macro_f1']:.3f}")
        return {"test_rows": len(test), "labels": self.data.labels, "models": results}

    def _test_blocks(self, model_dir: Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return tokenizer, lm_blocks(self.data.test, tokenizer, self.recipe.data.max_length)

    def _evaluate_lm(self, models: list[dict]) -> dict:
        cfg = self.recipe.evaluate
        tokenizer, blocks = self._test_blocks(models[0]["path"])
        ids = np.asarray(blocks["input_ids"])
        # prompts: the first words of test texts the blocks start with
        prompts = [row[:16] for row in tokenizer(list(self.data.test["text"][:cfg.generations]),
                                                 add_special_tokens=False)["input_ids"]]
        results, reference = {}, None
        for m in models:
            metrics = evaluate_lm(m["path"], ids, cfg.batch_size, reference, prompts,
                                  cfg.generation_tokens, tokenizer.eos_token_id)
            if reference is None:
                reference = metrics["predictions"]
                metrics["next_token_agreement"] = 1.0
            metrics["generations"] = [
                {"prompt": tokenizer.decode(p), "continuation": tokenizer.decode(g)}
                for p, g in zip(prompts, metrics["generations"])]
            results[m["name"]] = metrics
            console.print(f"  {m['name']:<14} perplexity {metrics['perplexity']:.2f}  "
                          f"next-token agreement {metrics['next_token_agreement']:.3f}")
        return {"test_blocks": len(ids), "test_tokens": int(ids.size), "models": results}

    def _bench(self, models: list[dict]) -> dict:
        if self.causal:
            return self._bench_generation(models)
        b = self.recipe.bench
        settings = BenchSettings(b.warmup, b.iterations, b.min_seconds, b.batch_size,
                                 b.sequence_length, b.real_length_samples,
                                 self.recipe.data.max_length, rounds=b.rounds)
        results = benchmark([m["path"] for m in models], b.profile,
                            list(self.data.test["text"]), settings)
        for m, result in zip(models, results):
            if "over_budget" in result:
                console.print(f"  {m['name']:<14} [red]{result['over_budget']}[/red]")
                continue
            console.print(f"  {m['name']:<14} p50 {result['latency']['p50_ms']:.2f} ms  "
                          f"peak RSS {result['peak_rss_mb']:.0f} MB")
        return {"models": {m["name"]: r for m, r in zip(models, results)}}


    def _bench_generation(self, models: list[dict]) -> dict:
        b = self.recipe.bench
        tokenizer, blocks = self._test_blocks(models[0]["path"])
        # a timed run is one whole generation: prompt, first token, new_tokens decode steps
        settings = GenerationSettings(prompt_tokens=b.sequence_length, new_tokens=b.new_tokens,
                                      warmup=b.warmup, iterations=b.iterations, rounds=b.rounds)
        prompt = [t for row in blocks["input_ids"] for t in row][:b.sequence_length]
        results = benchmark_generation([m["path"] for m in models], b.profile, prompt, settings)
        for m, result in zip(models, results):
            if "over_budget" in result:
                console.print(f"  {m['name']:<14} [red]{result['over_budget']}[/red]")
                continue
            console.print(f"  {m['name']:<14} first token {result['ttft_ms']['p50_ms']:.1f} ms  "
                          f"{result['decode_tokens_per_s']:.1f} tokens/s  "
                          f"peak RSS {result['peak_rss_mb']:.0f} MB")
        return {"models": {m["name"]: r for m, r in zip(models, results)}}


def run(recipe: str | Path | Recipe | None = None, output_dir: str | Path | None = None,
        overrides: list[str] | None = None, until: str | None = None) -> dict | None:
    """Run a recipe (a path, a Recipe, or None for the packaged default); return the report."""
    if isinstance(recipe, Recipe):  # validated like a file, with the overrides applied
        recipe = recipe_from_dict(recipe.to_dict(), "recipe", overrides)
    else:
        recipe = load_recipe(recipe, overrides)
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
