"""The search stage (``edgedistill search``): the student with the best validation score whose
int8 model meets a latency (and memory) budget on the run's hardware profile.

1. **Candidate shapes**: every depth in ``search.layers`` (teacher blocks kept, as
   ``student.layers`` picks them) at every width in ``search.widths`` (below 1, the blocks are
   narrowed by pruning, :mod:`edgedistill.distill.pruning`), and each pretrained model of
   ``search.student_models`` at the depths it has (its own blocks kept, its own tokenizer).
2. **Measured, not guessed**: each shape is built untrained, exported, quantized as the quantize
   stage would, and timed on the profile by the task's own benchmark (each model in its own
   process, taking turns). A model's speed depends on its shape, not on its weights, so no
   training is spent on a shape before it is known to fit. The measures are kept in
   ``<output>/search-cache`` by shape, settings and host: another budget re-times nothing.
   A ``search.budget_model`` is timed with the shapes instead, in the same benchmark, each
   shape's p50 then read round by round against the model's, and those measures stay with
   that search (edgedistill.search_costs).
3. **Training where it pays**: Optuna chooses a shape within the budget, a temperature, a
   weight of the soft targets and a feature or relation loss for each trial (the first trials
   are the widest shape of each depth at the recipe's settings, :func:`first_trials`), a short
   distillation that reports its validation score after every epoch; the successive-halving
   pruner stops the weak ones early. The study lives in SQLite in the stage's folder, so a
   killed search resumes from its finished trials (the trial it was in is run again).
4. **Choosing**: ``search.selection`` best takes the highest validation score; one_se the
   slowest student (most compute) within one bootstrap standard error of it (:func:`choose`).
   A finished trial keeps its validation predictions (classification), for one_se and for an
   audit of both rules on the same trials (benchmarks/search_budget.py).

Why one objective (the validation score) and not two: the latency of a shape is measured
before any training and the budget is a constraint, so there is nothing to learn about it; and
Optuna's pruners work on single-objective studies only. The report still draws the front of
the trials' score against their measured p50 (:func:`pareto`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState
from transformers import AutoConfig, AutoTokenizer, TrainerCallback

from . import progress
from .distill.matching import resolve_matches
from .distill.pruning import PRUNABLE
from .distill.student import check_positions, plan_student, student_tokenizer
from .distill.training import distill_student
from .errors import EdgeDistillError
from .recipe import Recipe
from .recipe_blocks import DistillConfig, MatchConfig, SearchConfig, StudentConfig
from .search_costs import Candidate, check_budget_model, measure, measure_beside, within_budget
from .sources import check_remote_code, resolve_model

log = logging.getLogger(__name__)
NO_MATCH = "none"  # search.match_losses: the logit loss alone
STUDY = "student"
BOOTSTRAP_DRAWS = 1000  # resamples of the validation rows for search.selection: one_se


def candidates(recipe: Recipe, teacher_config) -> list[Candidate]:
    """Every shape of ``recipe.search`` (depth x width), checked against the teacher."""
    s, student = recipe.search, recipe.student
    if student.model:
        raise EdgeDistillError("student.model: a search builds its students from the "
                               "teacher and search.student_models; move it there (or remove "
                               "the search's budget)")
    models = model_candidates(recipe)
    depth = teacher_config.num_hidden_layers
    too_deep = [n for n in s.layers
                if n > depth and not any(c.student.num_layers == n for c in models)]
    if too_deep:
        raise EdgeDistillError(f"search.layers: {too_deep[0]} is more blocks than the teacher's "
                               f"{depth}" + (" and every search.student_models'"
                                             if models else "") + f"; use depths up to {depth}")
    narrow = [w for w in s.widths if w < 1]
    if narrow and teacher_config.model_type not in PRUNABLE:
        raise EdgeDistillError(f"search.widths: {narrow[0]} needs a pruned student, which "
                               f"supports {', '.join(PRUNABLE)} teachers, and the teacher is "
                               f"{teacher_config.model_type}; set search.widths: [1.0]")
    hidden, inner = teacher_config.hidden_size, getattr(teacher_config, "intermediate_size", 0)
    head_dim = hidden // teacher_config.num_attention_heads
    out, seen = [], set()
    for n in sorted(n for n in set(s.layers) if n <= depth):  # deeper: a model's alone
        for w in sorted(set(s.widths), reverse=True):
            if w == 1:
                block = replace(student, init="teacher", num_layers=n, layer_ids=None, config={})
            else:  # whole heads are kept, so the width is a multiple of the head size
                config = {"hidden_size": max(head_dim, round(w * hidden / head_dim) * head_dim),
                          "intermediate_size": max(1, round(w * inner))}
                block = replace(student, init="pruned", num_layers=n, layer_ids=None,
                                config=config)
            key = (n, json.dumps(block.config, sort_keys=True))
            if key not in seen:  # two widths that round to one shape are one candidate
                seen.add(key)
                out.append(Candidate(f"{n}L-w{w:g}", w, block))
    return out + models


def model_candidates(recipe: Recipe) -> list[Candidate]:
    """Each model of ``search.student_models`` at the depths of ``search.layers`` it has."""
    s, out = recipe.search, []
    for model in s.student_models:
        path = resolve_model(model)
        # as for student.model: a student's own code is not run
        check_remote_code(path, False, "search.student_models (custom code is not supported)")
        blocks = AutoConfig.from_pretrained(path).num_hidden_layers
        depths = sorted(n for n in set(s.layers) if n <= blocks)
        if not depths:
            raise EdgeDistillError(f"search.student_models: {model} has {blocks} blocks, fewer "
                                   f"than every depth of search.layers {s.layers}; add a depth "
                                   f"up to {blocks} or leave the model out")
        for n in depths:
            block = replace(recipe.student, model=model, num_layers=n, layer_ids=None,
                            init="teacher", config={})
            out.append(Candidate(f"{Path(model).name}-{n}L", 1.0, block))
    names = [c.name for c in out]
    twice = [n for n in names if names.count(n) > 1]
    if twice:
        raise EdgeDistillError(f"search.student_models: two models named {twice[0]} (or one "
                               "listed twice); give each once, in folders of different names")
    return out


def searched(s: SearchConfig) -> dict[str, tuple[str, list]]:
    """Each setting a trial draws (its name in a trial's params): the search key that lists
    its values, and those values."""
    return {"temperature": ("temperatures", s.temperatures),
            "alpha_distill": ("alpha_distill", s.alpha_distill),
            "match_loss": ("match_losses", s.match_losses)}


def recipe_settings(recipe: Recipe) -> dict:
    """The recipe's own distill settings, as a trial's params."""
    d = recipe.distill
    return {"temperature": d.temperature, "alpha_distill": d.alpha_distill,
            "match_loss": d.matches[0].loss if len(d.matches) == 1 else NO_MATCH}


def distill_settings(recipe: Recipe, params: dict, epochs: float | None = None) -> DistillConfig:
    """The recipe's distill block with a trial's settings (``params``: temperature,
    alpha_distill, match_loss); ``epochs``: a trial's shorter training."""
    loss, alpha = params["match_loss"], params["alpha_distill"]
    d = replace(recipe.distill, temperature=params["temperature"], alpha_distill=alpha,
                alpha_ce=round(1 - alpha, 6),
                matches=[] if loss == NO_MATCH else [MatchConfig(loss=loss)])
    # a trial is a short float distillation: the int8-aware phase is the full run's
    return replace(d, epochs=epochs, qat_epochs=0.0) if epochs else d


def chosen_blocks(record: dict) -> tuple[StudentConfig, DistillConfig]:
    """The student and distill blocks a finished search chose (from its stage record)."""
    chosen = record["chosen"]
    distill = dict(chosen["distill"])
    distill["matches"] = [MatchConfig(**m) for m in distill["matches"]]
    return StudentConfig(**chosen["student"]), DistillConfig(**distill)


def check(recipe: Recipe, teacher_path: Path, teacher_config, task, out: Path,
          labels: list[str] | None = None) -> None:
    """Preflight: the budget model is a saved model outside the run's output folder ``out``,
    the task can take the selection rule and every searched setting, every candidate can be
    built and trained under the recipe's settings (a pretrained one with its tokenizer and
    head, for the data's ``labels``), and every loss of search.match_losses can match it to
    the teacher."""
    s = recipe.search
    if s.budget_model is not None:
        check_budget_model(Path(s.budget_model), out)
    if s.selection == "one_se" and not task.per_row_validation:
        raise EdgeDistillError(f"search.selection: one_se resamples per-row validation "
                               f"predictions, which the {task.name} task does not give; "
                               "use best")
    # each searched setting as a trial would train it, refused now rather than in the trial
    # that draws it, after minutes of timing shapes (task.check says what a task refuses)
    own = recipe_settings(recipe)
    for param, (key, values) in searched(s).items():
        for value in [v for v in values if v != own[param]]:  # the recipe's own passed it
            trial = replace(recipe, distill=distill_settings(recipe, {**own, param: value}))
            try:
                task.check(trial)
            except EdgeDistillError as e:
                raise EdgeDistillError(f"search.{key}: a trial with {value} would be refused "
                                       f"({e}); leave {value} out") from None
    teacher_tokenizer = AutoTokenizer.from_pretrained(
        teacher_path, trust_remote_code=recipe.teacher.trust_remote_code) \
        if s.student_models else None
    tokenizers = {}  # each pretrained model's own, read once for all its depths
    # the logits alone first: a model refused with them is refused whatever the loss
    losses = [NO_MATCH] + [m for m in s.match_losses if m != NO_MATCH]
    for c in candidates(recipe, teacher_config):
        config, kept = plan_student(teacher_path, teacher_config, c.student)
        # a pretrained model's head, tokenizer, pooling and architecture are the same at every
        # depth: task.check_student judges them at the first of its depths
        first_depth = bool(c.student.model) and c.student.model not in tokenizers
        if c.student.model:
            where = f"search.student_models ({c.name})"
            # a shape has the teacher's positions, checked as the teacher's
            check_positions(config, f"student {c.name}", recipe.data.max_length,
                            recipe.bench.sequence_length)
            if first_depth:
                tokenizers[c.student.model] = student_tokenizer(teacher_tokenizer, c.student)
        for loss in losses:
            if first_depth:  # its head and tokenizer under this loss
                trial = replace(recipe, student=c.student,
                                distill=distill_settings(recipe, {**own, "match_loss": loss}))
                try:
                    task.check_student(trial, config, teacher_tokenizer,
                                       tokenizers[c.student.model], labels)
                except EdgeDistillError as e:
                    with_loss = f"a trial with match loss {loss}" if loss != NO_MATCH else "it"
                    fix = ("leave the model or that loss out of the search"
                           if loss != NO_MATCH else "leave the model out")
                    raise EdgeDistillError(f"{where}: {with_loss} would be refused ({e}); "
                                           f"{fix}") from None
            if loss != NO_MATCH:
                resolve_matches([asdict(MatchConfig(loss=loss))], config, teacher_config, kept,
                                f"search.match_losses ({loss}, student {c.name})")


# ------------------------------------------------------------------------------ training

class ReportEpochs(TrainerCallback):
    """Tells Optuna a trial's validation score after each epoch, and stops a trial its pruner
    finds weak (the kept epoch's evaluation after training is not reported again)."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric, self.done = trial, metric, False
        self.epochs = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(f"eval_{self.metric}")
        if self.done or value is None:
            return
        self.epochs = round(state.epoch or 0)
        self.trial.report(value, step=self.epochs)
        # after the last epoch there is nothing left to save: the trial finishes
        if self.epochs < args.num_train_epochs and self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} {value:.4f} after epoch {self.epochs}")

    def on_train_end(self, args, state, control, **kwargs):
        self.done = True


def _resume(study: optuna.Study) -> None:
    """A trial still marked running was cut off by a killed search (one process drives the
    study): mark it failed and queue its settings again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params)
        log.warning("search: trial %d was interrupted; it runs again", t.number)


def _earlier(study: optuna.Study, trial: optuna.Trial):
    """A finished trial of ``study`` with the settings of ``trial``, or None."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.params == trial.params and "repeat_of" not in t.user_attrs:
            return t
    return None


def first_trials(recipe: Recipe, fitting: list[Candidate], costs: dict[str, dict]) -> list[dict]:
    """The trials a fresh study runs before its sampler: the widest shape of each depth that
    fits (of the teacher, and of each of search.student_models), slowest first (at most
    ``search.trials``), each with the recipe's own distill settings where the search tries
    them (the sampler draws the others). Slowest, not most
    parameters: the measured p50 is the compute a shape spends per text, while a count of
    parameters is mostly the embedding table, which costs a lookup.

    Why: TPE samples at random until it has seen 10 trials (Optuna's default startup), so a
    search of a dozen trials is mostly a random one, and it may never try the shapes most
    likely to win: within a depth, more width is more capacity at a cost the budget allows.
    Trying them first with the recipe's settings also means the search compares its finds
    with the students a user would have trained by hand."""
    s, d = recipe.search, recipe.distill
    own = recipe_settings(recipe)
    # a setting is the recipe's only where a trial with it trains the recipe's block alike
    trained = distill_settings(recipe, own)
    if trained.alpha_ce != d.alpha_ce:
        own["alpha_distill"] = None
    if trained.matches != d.matches:
        own["match_loss"] = None
    settings = {k: v for k, v in own.items() if v in searched(s)[k][1]}
    widest = {}
    for c in fitting:  # candidates() lists each depth's widths widest first
        widest.setdefault((c.student.model, c.student.num_layers), c)
    slowest = sorted(widest.values(), key=lambda c: -costs[c.name]["p50_ms"])
    return [{"student": c.name, **settings} for c in slowest[:s.trials]]


def finished(trials: list[dict]) -> list[dict]:
    """The trials that trained to the end, each setting once (a repeat only copies a score)."""
    return [t for t in trials if t["state"] == "COMPLETE" and "repeat_of" not in t]


def pareto(trials: list[dict], greater_is_better: bool) -> list[int]:
    """Numbers of the finished trials no other beats on both score and p50."""
    sign = 1 if greater_is_better else -1
    done = finished(trials)
    return [t["number"] for t in done
            if not any(sign * o["value"] >= sign * t["value"] and o["p50_ms"] <= t["p50_ms"]
                       and (sign * o["value"] > sign * t["value"] or o["p50_ms"] < t["p50_ms"])
                       for o in done)]


def choose(trials: list[dict], rule: str, greater: bool,
           scores: dict | None = None) -> tuple[dict, dict]:
    """The winning trial among the finished ones, and how it was picked.

    ``best``: the highest validation score (of equal scores, the faster student). ``one_se``:
    of the trials whose gap to the best is at most one standard error of that gap, the one
    whose student is slowest (the highest measured p50), then the better score. The standard
    error is of the paired difference over ``scores`` (trial number -> the score on each
    bootstrap resample of the validation rows, the same resamples for every trial), so the
    shared difficulty of the rows cancels. Why the slowest student: the budget is met by every
    candidate, and a short trial's small lead on a few validation rows is not worth giving up
    capacity for the full distillation. Capacity is measured as compute per text, as in
    :func:`first_trials`: a count of parameters would rank the students of a wide vocabulary
    first (search.student_models mixes model families), whatever their blocks."""
    sign = 1 if greater else -1
    done = finished(trials)
    best = max(done, key=lambda t: (sign * t["value"], -t["p50_ms"]))
    if rule == "best":
        return best, {"rule": rule, "best_trial": best["number"]}
    within = []
    for t in done:
        gap = sign * (best["value"] - t["value"])
        se = float(np.std(sign * (scores[best["number"]] - scores[t["number"]]), ddof=1))
        if gap <= se:
            within.append({"trial": t["number"], "gap": round(gap, 6), "se": round(se, 6)})
    near = {w["trial"] for w in within}
    chosen = max((t for t in done if t["number"] in near),
                 key=lambda t: (t["p50_ms"], sign * t["value"]))
    return chosen, {"rule": rule, "best_trial": best["number"], "within": within,
                    "draws": len(next(iter(scores.values())))}


def select(task, trials: list[dict], rule: str, greater: bool, data, metric: str,
           seed: int) -> tuple[dict, dict]:
    """:func:`choose` under ``rule``, with one_se's bootstrap scores of the finished trials'
    validation predictions on ``data`` (seeded) computed here."""
    scores = None
    if rule == "one_se":
        scores = task.resampled_scores({t["number"]: t["predictions"] for t in finished(trials)},
                                       data, metric, BOOTSTRAP_DRAWS, seed)
    return choose(trials, rule, greater, scores)


def search(run, teacher_dir: Path, out: Path, cache_file: Path) -> dict:
    """The search stage's work (see the module docstring); ``out`` is its partial folder."""
    r, s = run.recipe, run.recipe.search
    if run.world.size > 1:  # a trial's Trainer would wait for processes that are not training
        raise EdgeDistillError("search: trials train in one process; run the search without a "
                               "launcher first (edgedistill search ...), then rerun with "
                               "--nproc: the finished search is reused")
    start = time.perf_counter()
    teacher_config = AutoConfig.from_pretrained(teacher_dir,
                                                trust_remote_code=r.teacher.trust_remote_code)
    shapes = candidates(r, teacher_config)
    if s.budget_model is None:
        costs, beside = measure(run, shapes, teacher_dir, teacher_config, cache_file), None
        budget_ms, key = s.budget_ms, "search.budget_ms"
    else:
        costs, beside = measure_beside(run, shapes, teacher_dir, teacher_config, out)
        budget_ms, key = beside["ms"], "search.budget_model"
    measured_s = time.perf_counter() - start
    fitting = [c for c in shapes if within_budget(costs[c.name], budget_ms, s.budget_mb)]
    if not fitting:
        fastest = min(shapes, key=lambda c: costs[c.name]["p50_ms"] or float("inf"))
        cost = costs[fastest.name]
        mb = f" and {s.budget_mb:g} MB" if s.budget_mb else ""
        if beside is None:
            given, raise_it = "", "raise the budget"
        else:
            given = f" ({beside['model_p50_ms']:.2f} ms p50 of {s.budget_model}, timed beside them)"
            raise_it = "raise search.budget_tolerance or give a slower search.budget_model"
        fastest_is = (f"the fastest, {fastest.name}, takes {cost['p50_ms']:.2f} ms p50 "
                      f"({cost['peak_rss_mb'] or 0:.0f} MB peak)" if cost["p50_ms"] is not None
                      else "every shape ran past the profile's memory budget")
        raise EdgeDistillError(
            f"{key}: no candidate meets {budget_ms:g} ms{mb}{given} on profile "
            f"{r.bench.profile}; {fastest_is}: {raise_it}, or add shallower or narrower shapes "
            "to search.layers / search.widths")
    selection = run.task.selection(r.distill, run.data)
    metric = selection["metric_for_best_model"]
    greater = selection.get("greater_is_better", not metric.endswith("loss"))
    by_name = {c.name: c for c in shapes}
    # no more trials than there are different settings to try
    space = len(fitting) * math.prod(len(set(v)) for _, v in searched(s).values())
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what a trial did
    study = optuna.create_study(
        study_name=STUDY, storage=f"sqlite:///{out / 'optuna.db'}", load_if_exists=True,
        direction="maximize" if greater else "minimize",
        # every setting once where the space is no larger than the trials, else TPE
        sampler=optuna.samplers.BruteForceSampler(seed=r.seed) if space <= s.trials
        else optuna.samplers.TPESampler(seed=r.seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    _resume(study)
    if space > s.trials and not study.trials:  # a fresh study under TPE (see first_trials)
        for params in first_trials(r, fitting, costs):
            study.enqueue_trial(params)

    def objective(trial: optuna.Trial) -> float:
        name = trial.suggest_categorical("student", [c.name for c in fitting])
        params = {p: trial.suggest_categorical(p, values)
                  for p, (_, values) in searched(s).items()}
        trial.set_user_attr("p50_ms", costs[name]["p50_ms"])
        same = _earlier(study, trial)
        if same is not None:  # the sampler proposed settings already tried: not trained twice
            trial.set_user_attr("repeat_of", same.number)
            if same.state == TrialState.PRUNED:
                raise optuna.TrialPruned(f"as trial {same.number}")
            return same.value
        progress.note(f"  trial {trial.number}: {name}, temperature {params['temperature']:g}, "
                      f"alpha_distill {params['alpha_distill']:g}, {params['match_loss']}")
        folder, reporter = out / "trials" / str(trial.number), ReportEpochs(trial, metric)
        began = time.perf_counter()
        try:
            record = distill_student(
                run.task, teacher_dir, by_name[name].student,
                distill_settings(r, params, s.trial_epochs), run.data, r.data, folder, r.seed,
                r.teacher.trust_remote_code, cache_dir=run.out / "teacher-cache",
                callbacks=[reporter])
            if run.task.per_row_validation:  # kept for one_se (and an audit of the rules)
                trial.set_user_attr("predictions", run.task.validation_predictions(
                    folder / "model", run.data, r.data.max_length))
        except optuna.TrialPruned:
            progress.note(f"  trial {trial.number}: stopped after epoch {reporter.epochs}, "
                          "behind the trials before it")
            raise
        finally:
            trial.set_user_attr("epochs", reporter.epochs)
            trial.set_user_attr("seconds", round(time.perf_counter() - began, 1))
            shutil.rmtree(folder, ignore_errors=True)  # the winner is distilled again in full
        value = record["validation"][metric]
        if not math.isfinite(value):  # Optuna fails the trial and goes on: say so here
            progress.note(f"  trial {trial.number}: validation {metric} is {value}; it does not "
                          "count")
        return value

    counted = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if counted < min(s.trials, space):
        # a trial that raises ends the search with that error's own line (the CLI's, or the
        # caller's exception), one without a score has its own note: Optuna's report of either,
        # traceback and all, says it again
        with progress.silenced("optuna.study._optimize", "failed with"):
            study.optimize(objective, n_trials=min(s.trials, space) - counted)
    trials = [{"number": t.number, "state": t.state.name, **t.params, "value": t.value,
               **t.user_attrs} for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not finished(trials):
        raise EdgeDistillError(f"search: no trial ended with a validation {metric} (see the "
                               "trials above); check the data's validation split and the "
                               "search's settings, then run it again")
    shutil.rmtree(out / "trials", ignore_errors=True)
    best, selection = select(run.task, trials, s.selection, greater, run.data, metric, r.seed)
    chosen = by_name[best["student"]]
    distill = distill_settings(r, best)
    record = {
        "budget_ms": budget_ms, "budget_mb": s.budget_mb, "budget_model": beside,
        "profile": r.bench.profile,
        "metric": metric, "greater_is_better": greater,
        "candidates": [{"name": c.name, "layers": c.student.num_layers, "width": c.width,
                        "config": c.student.config, **costs[c.name],
                        "within_budget": c in fitting} for c in shapes],
        "trials": trials, "pareto": pareto(trials, greater), "selection": selection,
        "chosen": {"trial": best["number"], "name": chosen.name, "value": best["value"],
                   "p50_ms": costs[chosen.name]["p50_ms"], "student": asdict(chosen.student),
                   "distill": asdict(distill)},
        "seconds": {"measuring": round(measured_s, 1),
                    "trials": round(sum(t.get("seconds", 0) for t in trials), 1)}}
    chosen_recipe = replace(r, student=chosen.student, distill=distill,
                            search=replace(s, budget_ms=None, budget_model=None))
    chosen_recipe.dump(out / "recipe.chosen.yaml")  # distils the chosen student, no search
    return record
