"""What each candidate shape of a search costs on the run's hardware profile, measured, not
guessed: the shape built untrained, exported, quantized as the quantize stage would and timed
by the task's own benchmark (a model's speed depends on its shape, not on its weights), cached
by shape, settings and host; or timed beside ``search.budget_model`` in one benchmark and read
round by round against it. The search stage (edgedistill.search) trains only shapes that fit.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from . import progress
from .artifacts import write_atomic
from .distill.student import plan_student, pretrained_student, student_tokenizer
from .errors import EdgeDistillError
from .export import export_onnx
from .host import environment
from .quantization import quantize
from .recipe_blocks import StudentConfig
from .report import value_at
from .tasks.base import model_row

REFERENCE = "budget model"  # search.budget_model's row in the shapes' benchmark


@dataclass
class Candidate:
    """A student shape the search may choose: its name in the report and its student block."""

    name: str
    width: float
    student: StudentConfig  # its num_layers is the candidate's depth


def check_budget_model(folder: Path, out: Path) -> None:
    """search.budget_model can be timed (a saved model with its tokenizer) and stays as it is
    while the run goes on: not one of the run's own folders, which this run rewrites."""
    def refuse(problem: str) -> None:
        raise EdgeDistillError(f"search.budget_model: {folder} {problem}")

    if not (folder / "config.json").is_file():
        refuse("is not a saved model folder (no config.json); give the folder of the model to "
               "be as fast as, e.g. an earlier run's quantize/student-int8")
    if folder.resolve().is_relative_to(out.resolve()):
        refuse(f"is inside this run's output folder {out}, whose models this run replaces; "
               "copy it elsewhere, or write this run to another --output")
    try:
        AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:  # what a folder without one raises varies
        refuse(f"has no tokenizer the benchmark can load ({str(e).splitlines()[0]}); save "
               "the model's tokenizer beside it")


def _cost_key(run, config, host: dict, model: str | None = None) -> str:
    """What the measured cost of a shape (its student ``config``) depends on: the config, the
    export, int8 and timing settings, the profile, the ``host``, and for a pretrained
    ``model`` its name (it reads its own tokens)."""
    blob = {"config": config.to_diff_dict(), "quantize": asdict(run.recipe.quantize),
            "bench": asdict(run.recipe.bench), "export": asdict(run.recipe.export),
            "max_length": run.recipe.data.max_length, "host": host}
    if model:  # only there: the teacher's shapes keep the keys they were cached under
        blob["student_model"] = model
    return json.dumps(blob, sort_keys=True, default=str)


def time_shapes(run, shapes: list[Candidate], teacher_dir: Path, teacher_config, where: Path,
                reference: Path | None = None) -> dict[str, dict]:
    """Build, export and quantize each shape untrained in a scratch folder under ``where``,
    then time them all in one benchmark on the run's profile, taking turns (with the
    ``reference`` model folder among them, named :data:`REFERENCE`, where given): p50, peak
    memory, size and parameters by name."""
    r, view = run.recipe, run.task.report
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir,
                                              trust_remote_code=r.teacher.trust_remote_code)
    texts = list(run.data.validation["text"])[:8]
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        rows, parameters = [], {}
        for c in progress.track(shapes, "export and quantize untrained shapes"):
            folder = Path(tmp) / c.name
            # untrained weights: the cost of a shape does not depend on them; a pretrained
            # candidate is loaded instead, as its config lacks what the task carries in it
            # (a sentence embedder's pooling)
            model = (pretrained_student(run.task, c.student, teacher_config) if c.student.model
                     else run.task.untrained_model(
                         plan_student(teacher_dir, teacher_config, c.student)[0]))
            parameters[c.name] = sum(p.numel() for p in model.parameters())
            # a pretrained candidate is timed on its own tokens (their count per text)
            run.task.save_model(model, student_tokenizer(tokenizer, c.student), folder / "model")
            export_onnx(folder / "model", folder / "onnx", r.export.opset, r.export.atol,
                        texts, r.data.max_length)
            quantize(folder / "onnx", folder / "int8", r.quantize, run.target,
                     calibration_texts=run.calibration, max_length=r.data.max_length)
            rows.append(model_row(c.name, "student", "onnxruntime", "int8", folder / "int8"))
        if reference is not None:
            rows.append(model_row(REFERENCE, "reference", "onnxruntime", "", reference))
        timed = run.task.bench(run, rows)["models"]
    # each round's p50 beside the pooled one: how far from the budget line a shape is, in
    # the host's own noise (forward-pass timings keep them)
    return {name: {"p50_ms": value_at(result, f"{view.timing}.p50_ms"),
                   "round_p50_ms": result.get("round_p50_ms"),
                   "peak_rss_mb": result.get("peak_rss_mb"), "size_mb": result.get("size_mb"),
                   "parameters": parameters.get(name), "over_budget": result.get("over_budget")}
            for name, result in timed.items()}


def measure(run, shapes: list[Candidate], teacher_dir: Path, teacher_config,
            cache_file: Path) -> dict[str, dict]:
    """p50, peak memory, size and parameters of each shape's int8 model on the run's profile,
    from the cache or measured now (all new shapes in one benchmark, taking turns)."""
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    host = {k: v for k, v in environment().items() if k != "memory_gb"}  # read once
    keys = {c.name: _cost_key(run, plan_student(teacher_dir, teacher_config, c.student)[0], host,
                              c.student.model) for c in shapes}
    todo = [c for c in shapes if keys[c.name] not in cache]
    if todo:
        timed = time_shapes(run, todo, teacher_dir, teacher_config, cache_file.parent)
        cache.update({keys[name]: cost for name, cost in timed.items()})
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, json.dumps(cache, indent=1))
    return {c.name: cache[keys[c.name]] for c in shapes}


def measure_beside(run, shapes: list[Candidate], teacher_dir: Path, teacher_config,
                   out: Path) -> tuple[dict[str, dict], dict]:
    """The costs of the shapes timed beside ``search.budget_model`` in one benchmark, and the
    budget that model sets. Not from the cache: a p50 measured at another time is what this
    budget is for avoiding. Kept in ``out`` (the stage's folder), so a resumed search compares
    its trials against the same measures."""
    s, kept = run.recipe.search, out / "costs-beside-budget-model.json"
    if kept.is_file():
        found = json.loads(kept.read_text())
        return found["costs"], found["budget"]
    costs = time_shapes(run, shapes, teacher_dir, teacher_config, out,
                        reference=Path(s.budget_model))
    model = costs.pop(REFERENCE)
    if model["p50_ms"] is None:  # over the profile's memory budget: never timed
        raise EdgeDistillError(f"search.budget_model: {s.budget_model} was not timed on profile "
                               f"{run.recipe.bench.profile} ({model['over_budget']}); give a "
                               "model that runs there, or search.budget_ms")
    for cost in costs.values():
        paired = paired_p50(cost, model)
        if paired is not None:
            cost.update(pooled_p50_ms=cost["p50_ms"], p50_ms=paired)
    budget = {"model": s.budget_model, "model_p50_ms": model["p50_ms"],
              "model_round_p50_ms": model["round_p50_ms"], "tolerance": s.budget_tolerance,
              "ms": round(model["p50_ms"] * (1 + s.budget_tolerance), 4)}
    write_atomic(kept, json.dumps({"costs": costs, "budget": budget}, indent=1))
    return costs, budget


def paired_p50(cost: dict, model: dict) -> float | None:
    """A shape's p50 on the budget model's scale: the model's p50 times the median, over the
    benchmark's rounds, of the shape's round p50 over the model's in the same round. Why: the
    models take turns round by round, so a slow spell of the host that spans a round moves
    both sides of its ratio, and the median drops a round whose spell caught one side alone.
    Pooled over the rounds, the two p50s mix different moments of the host: on the tweets
    (seed 42) the model's first round ran in a slow spell (10.9 ms against 3.5 and 3.9) and a
    3-block shape's third (4.5 against 3.8 and 3.7); pooled, the shape took 1.03 times the
    model's p50 and fitted a 5 % tolerance, round by round 0.34, 1.07 and 1.15 times (median
    1.07: over). None when a side has no rounds (not timed, or over the memory budget)."""
    ratios = [a / b for a, b in zip(cost.get("round_p50_ms") or [],
                                    model.get("round_p50_ms") or []) if a and b]
    return model["p50_ms"] * float(np.median(ratios)) if ratios else None


def within_budget(cost: dict, budget_ms: float, budget_mb: float | None) -> bool:
    return (cost["p50_ms"] is not None and not cost.get("over_budget")
            and cost["p50_ms"] <= budget_ms
            and (budget_mb is None or (cost["peak_rss_mb"] or 0) <= budget_mb))
