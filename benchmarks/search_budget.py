"""Does the search find a better student than the default recipe's for the same latency?
(issue: automated distillation for a budget.)

For each seed, on the default task (drug reviews, MiniLM-L6 teacher fine-tuned once per seed,
shared with the distillation-methods benchmark), or on another recipe (``--recipe``: its teacher
fine-tuned once, on the first seed, and shared by the seeds, as the workloads benchmark does):

- baseline: the default recipe's student (teacher blocks 0 and 5, logit loss) through every
  stage; its int8 model's p50 on the cpu profile, measured by the bench stage, is the budget;
- search: ``edgedistill search`` with that budget (depths 1-4, widths 1 / 0.75 / 0.5,
  temperatures, soft-target weights, feature and relation losses), then every stage on the
  chosen student;
- one_se: the search's own trials judged by ``search.selection: one_se`` instead of the
  highest validation score (their validation predictions are in its record), its pick
  distilled in full through every stage; the same row as search where both pick one trial;
- half: the same search with half that budget (on the first seed unless --half-seeds).

Reports each run's test macro-F1 of student-int8 and its p50 measured by its own bench stage
(so whether the chosen student really met the budget at the end), the chosen settings and what
the search cost. Every run after the first reads the shapes' measured costs from one shared
cache (same host, same settings). A rerun reuses every finished stage (the pipeline's own
skipping), so an interrupted benchmark goes on where it stopped.

    python benchmarks/search_budget.py --seeds 42 43 44 [--trials 12]
    python benchmarks/search_budget.py --seeds 42 43 44 --runs half

``--runs`` picks the runs beside the baseline (``search`` brings its one_se audit); a subset
is written under its own name (``search_budget_half`` for ``--runs half``, or ``--results``), so
the full table's record stays. ``--set KEY=VALUE`` changes every run's recipe alike; on the
tweets workload, for a 2-block student of the MPNet teacher, trials on logits alone and no
ONNX copy of the teacher (not compared here):

    python benchmarks/search_budget.py --recipe tweets-mpnet --seeds 42 --runs search \
        --set student.model=null --set student.num_layers=2 --set "transfer.unlabelled=[]" \
        --set "search.match_losses=[none]" --set export.export_teacher=false

``--budget-model`` (with ``--runs search``) gives the search the seed's baseline int8 model
itself as its budget (``search.budget_model``): the model is timed beside the untrained shapes in
one benchmark, so a slow spell of the host falls on both, where the p50 of the baseline's bench
stage and the shapes' cached p50s were measured at different times (on a shared host they
differed by tens of percent, which let shapes through that were slower than the baseline and kept
its own shape out). Each chosen student is then timed side by side with the baseline; its runs
live in folders ``search-beside`` and ``one_se-beside`` and its table in
``search_budget[_<recipe>]_search_beside``:

    python benchmarks/search_budget.py --seeds 42 43 44 --runs search --budget-model

``--set "search.student_models=[sentence-transformers/all-MiniLM-L6-v2]"`` adds a pretrained
model's own blocks to the shapes; ``--tag models`` keeps that variant's folders and table apart
(``search-beside-models``), and ``--no-one-se`` leaves out the one_se audit's extra run.

A seed added later to a recipe's table (``--seeds 44 --teacher-seed 42 --keep`` with the same
``--set``s) distils from the teacher of the same seed (the one in the work folder, or one
fine-tuned again on that seed where the folder is gone) and keeps the other seeds' rows.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from distill_methods import teacher_for
from transformers import AutoConfig
from workloads import shared_teacher

from edgedistill import run, search
from edgedistill.artifacts import write_atomic
from edgedistill.bench.runner import benchmark
from edgedistill.errors import EdgeDistillError
from edgedistill.host import environment
from edgedistill.profiles import resolve_target
from edgedistill.recipe import Recipe, load_recipe
from edgedistill.tasks import get_task
from edgedistill.tasks.base import bench_settings

HERE = Path(__file__).parent
BASELINE_SHAPE = "2L-w1"  # the default recipe's student among the search's candidates


def one_run(seed: int, name: str, work: Path, teacher: Path, extra: list[str],
            recipe: Recipe | str | None = None, folder: str | None = None) -> dict:
    out = work / f"seed-{seed}" / (folder or name)
    out.mkdir(parents=True, exist_ok=True)
    cache = work / "search-cache"  # the shapes' costs, measured once for every run
    cache.mkdir(parents=True, exist_ok=True)
    if not (out / "search-cache").exists():
        (out / "search-cache").symlink_to(cache.resolve())
    # the seed's fine-tuned teacher as it is: every run of a seed distils from the same one
    try:
        report = run(recipe, out, [f"seed={seed}", f"teacher.model={teacher}",
                                   "teacher.finetune=false", *extra])
    except EdgeDistillError as e:  # a budget no candidate meets: its one line is the result
        return {"seed": seed, "run": name, "error": str(e)}
    rows = {m["name"]: m for m in report["models"]}
    int8 = rows["student-int8"]
    result = {"seed": seed, "run": name, "macro_f1": int8["metrics"]["macro_f1"],
              "accuracy": int8["metrics"]["accuracy"], "p50_ms": int8["latency"]["p50_ms"],
              "teacher_macro_f1": rows["teacher"]["metrics"]["macro_f1"],
              "parameters": report["training"]["distill"]["parameters"]}
    found = report.get("search")
    if found:
        chosen = found["chosen"]
        result.update(budget_ms=found["budget_ms"], chosen=chosen["name"],
                      chosen_settings={k: chosen["distill"][k] for k in
                                       ("temperature", "alpha_distill")}
                      | {"matches": [m["loss"] for m in chosen["distill"]["matches"]]},
                      validation=chosen["value"], trials=len(found["trials"]),
                      stopped_early=sum(t["state"] == "PRUNED" for t in found["trials"]),
                      fitting=[c["name"] for c in found["candidates"] if c["within_budget"]],
                      search_seconds=found["seconds"],
                      within_budget_at_bench=int8["latency"]["p50_ms"] <= found["budget_ms"])
        if found.get("budget_model"):  # a control: the baseline's own shape beside its model
            result["own_shape_over_model"] = own_shape_over_model(found)
    return result


def own_shape_over_model(found: dict) -> float:
    """In a search under the baseline's int8 model (--budget-model): the p50 of the baseline's
    own shape (2 kept blocks, full width), built untrained, over the model's, both from the
    search's one benchmark. Ideally 1: how far it is not is the timing noise of the host."""
    twin = next(c for c in found["candidates"] if c["name"] == BASELINE_SHAPE)
    return round(twin["p50_ms"] / found["budget_model"]["model_p50_ms"], 4)


def int8_of(run_dir: Path) -> Path:
    return run_dir / "quantize" / "student-int8"


def side_by_side(baseline: Path, chosen: Path, recipe: Recipe) -> float:
    """The chosen student's int8 p50 over the baseline's, the two timed in one benchmark on
    the recipe's profile, taking turns (as the search timed its shapes beside the baseline)."""
    target = resolve_target(recipe.bench.profile)
    b = replace(recipe.bench, real_length_samples=0)
    b.fill_shape(target.batch_size, target.sequence_length)  # as the run's bench stage does
    timed = benchmark([int8_of(baseline), int8_of(chosen)], target,
                      settings=bench_settings(replace(recipe, bench=b)))
    return timed[1]["latency"]["p50_ms"] / timed[0]["latency"]["p50_ms"]


def one_se_recipe(seed: int, searched: Path, teacher: Path, source: str | None,
                  changes: list[str]) -> tuple[Recipe | None, dict]:
    """The finished search's own trials judged by search.selection one_se instead of best
    (their validation predictions are in its record; the test split is never read): the
    recipe that distils one_se's pick in full, or None where it is best's pick too."""
    found = json.loads((searched / "report.json").read_text())["search"]
    recipe = load_recipe(source, [f"seed={seed}", *changes])
    task = get_task(recipe.task)
    chosen, how = search.select(task, found["trials"], "one_se", found["greater_is_better"],
                                task.load_data(recipe.data, seed), found["metric"], seed)
    distill = search.distill_settings(recipe, chosen)
    how.update(chosen_trial=chosen["number"], chosen=chosen["student"],
               validation=chosen["value"],
               chosen_settings={"temperature": distill.temperature,
                                "alpha_distill": distill.alpha_distill,
                                "matches": [m.loss for m in distill.matches]})
    if chosen["number"] == found["chosen"]["trial"]:
        return None, how
    shapes = {c.name: c for c in search.candidates(recipe, AutoConfig.from_pretrained(teacher))}
    return replace(recipe, student=shapes[chosen["student"]].student, distill=distill), how


def one_se_row(result: dict, searched: dict, how: dict) -> dict:
    """The row of one_se's own pick: its run's test scores, the search's budget and cost."""
    return dict(result, **{k: searched[k] for k in ("budget_ms", "trials", "stopped_early",
                                                    "search_seconds")},
                **{k: how[k] for k in ("chosen", "chosen_settings", "validation")},
                # a run judged side by side with the baseline (--budget-model) says it already
                within_budget_at_bench=result.get("within_budget_at_bench",
                                                  result["p50_ms"] <= searched["budget_ms"]))


def summary(rows: list[dict], name: str, baseline: dict[int, dict]) -> dict:
    mine = [r for r in rows if r["run"] == name and "error" not in r]
    if not mine:
        return {"run": name, "seeds": []}
    f1 = [r["macro_f1"] for r in mine]
    return {"run": name, "seeds": [r["seed"] for r in mine], "macro_f1": statistics.mean(f1),
            "macro_f1_stdev": statistics.stdev(f1) if len(f1) > 1 else 0.0,
            "minus_baseline_by_seed": [round(r["macro_f1"] - baseline[r["seed"]]["macro_f1"], 4)
                                       for r in mine],
            "kept_of_teacher": statistics.mean(r["macro_f1"] / r["teacher_macro_f1"]
                                               for r in mine),
            # p50s of one seed are measured on one host; seeds may differ (--keep); a row
            # timed beside its baseline (--budget-model) has that ratio
            "faster_by_seed": [round(1 / r["p50_over_baseline_side_by_side"], 2)
                               if "p50_over_baseline_side_by_side" in r else
                               round(baseline[r["seed"]]["p50_ms"] / r["p50_ms"], 2)
                               for r in mine],
            "p50_ms": statistics.mean(r["p50_ms"] for r in mine)}


def markdown(rows: list[dict], sums: list[dict], env: dict, trials: int, commands: list[str],
             source: str) -> str:
    seeds_on = {}  # cpu -> its seeds
    for r in rows:
        seeds_on.setdefault(r["cpu"], set()).add(r["seed"])
    where = "; ".join(f"{cpu} (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, sorted(seeds)))})"
                      for cpu, seeds in seeds_on.items()) if len(seeds_on) > 1 else env["cpu"]
    lines = [f"# Student search under a latency budget ({source})", "",
             (f"{where}, {env['cpu_count']} cores, profile cpu, {trials} trials per "
              f"search; " + ", then ".join(f"`{c}`" for c in commands)), "",
             ("| seed | run | budget ms | chosen | settings | trials (stopped early) | "
              "val macro-F1 | test macro-F1 int8 | p50 ms at bench | within budget | "
              "search s (measure + trials) |"), "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seed']} | {r['run']} | {r['error']} |" + " |" * 9)
        elif "chosen" in r:
            s = r["chosen_settings"]
            settings = (f"T {s['temperature']:g}, alpha {s['alpha_distill']:g}, "
                        f"{'+'.join(s['matches']) or 'logits'}")
            cost = r["search_seconds"]
            lines.append(f"| {r['seed']} | {r['run']} | {r['budget_ms']:.2f} | {r['chosen']} | "
                         f"{settings} | {r['trials']} ({r['stopped_early']}) | "
                         f"{r['validation']:.3f} | {r['macro_f1']:.3f} | {r['p50_ms']:.2f} | "
                         f"{'yes' if r['within_budget_at_bench'] else 'NO'} | "
                         f"{cost['measuring']:.0f} + {cost['trials']:.0f} |")
        else:
            lines.append(f"| {r['seed']} | {r['run']} ({BASELINE_SHAPE}, defaults) | | | | | | "
                         f"{r['macro_f1']:.3f} | {r['p50_ms']:.2f} | | |")
    for r in rows:
        if r["run"] == "one_se" and "selection" in r:
            how = r["selection"]
            lines.append(f"\nSeed {r['seed']}, one_se on the search's own trials: trial "
                         f"{how['chosen_trial']} ({r.get('chosen', '?')}), of "
                         f"{len(how['within'])} within one bootstrap SE of the best, trial "
                         f"{how['best_trial']}"
                         + (" (the same pick as best)" if r.get("same_as_best") else "") + ".")
    paired = any("p50_over_baseline_side_by_side" in r for r in rows)
    controls = [r for r in rows if r["run"] == "search" and "own_shape_over_model" in r]
    if controls:
        ratios = ", ".join(f"{r['own_shape_over_model']:.3f}" for r in controls)
        lines.append(f"\nThe baseline's own shape, built untrained and timed in the search's "
                     f"benchmark beside the baseline's int8 model, took {ratios} times its p50 "
                     f"(seeds {', '.join(str(r['seed']) for r in controls)}): the host's timing "
                     "noise, which the budget's tolerance has to cover.")
    lines += ["", ("| run | test macro-F1 int8 (mean ± sd) | minus baseline, by seed | "
                   "of the teacher's macro-F1 | p50 ms at bench | times faster than baseline, "
                   f"by seed{' (timed side by side)' if paired else ''} |"),
              "|---|---|---|---|---|---|"]
    lines += [f"| {s['run']} | {s['macro_f1']:.3f} ± {s['macro_f1_stdev']:.3f} | "
              f"{', '.join(f'{d:+.3f}' for d in s['minus_baseline_by_seed'])} | "
              f"{s['kept_of_teacher']:.1%} | {s['p50_ms']:.2f} | "
              f"{', '.join(f'{x:.2f}' for x in s['faster_by_seed'])} |"
              for s in sums if s["seeds"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--half-seeds", type=int, nargs="*", default=None,
                        help="seeds of the half-budget run (default: the first seed; every "
                             "seed when --runs is half alone)")
    parser.add_argument("--runs", nargs="+", choices=("search", "half"),
                        default=["search", "half"], help="the runs beside the baseline")
    parser.add_argument("--results", default=None,
                        help="stem of the results files in benchmarks/results/ (default: "
                             "search_budget, with _half or _search for one run alone)")
    parser.add_argument("--recipe", default=None,
                        help="a packaged recipe's name or a recipe file (default: the default "
                             "recipe, with a teacher fine-tuned per seed)")
    parser.add_argument("--set", dest="changes", action="append", default=[],
                        metavar="KEY=VALUE", help="a recipe setting for every run (repeatable)")
    parser.add_argument("--work", type=Path, default=None,
                        help="default: benchmarks/work/search (with --recipe: search-<name>)")
    parser.add_argument("--teacher-seed", type=int, default=None,
                        help="with --recipe: the seed its shared teacher is fine-tuned on "
                             "(default: the first of --seeds)")
    parser.add_argument("--budget-model", action="store_true",
                        help="the search's budget is the seed's baseline int8 model itself, "
                             "timed beside the shapes (search.budget_model), not the p50 of "
                             "the baseline's bench stage; its speed is then judged side by "
                             "side with the baseline (--runs search only; folders search-beside)")
    parser.add_argument("--tag", default="",
                        help="a variant's name (e.g. with --set search.student_models=...): "
                             "its search folders and results file end in it, so an earlier "
                             "variant's stay")
    parser.add_argument("--no-one-se", dest="one_se", action="store_false",
                        help="leave out one_se's audit of the search's trials (its pick is "
                             "distilled in full when it differs: one more run per seed)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the other seeds' rows of the results file, so one seed can "
                             "be added (or run again) without the others")
    args = parser.parse_args()
    runs = set(args.runs)
    if args.budget_model and "half" in runs:
        parser.error("--budget-model: half a model is no budget; use it with --runs search")
    name = Path(args.recipe).stem if args.recipe else None
    work = args.work or HERE / "work" / ("search" + (f"-{name}" if name else ""))
    # a lone run gets files of its own: the full table's record stays
    stem = args.results or "_".join(["search_budget", *([name] if name else []),
                                     *(sorted(runs) if len(runs) == 1 else []),
                                     *(["beside"] if args.budget_model else []),
                                     *([args.tag] if args.tag else [])])
    recipe = load_recipe(args.recipe, args.changes)
    # its runs' folders: the others' stay
    beside = ("-beside" if args.budget_model else "") + (f"-{args.tag}" if args.tag else "")
    task = recipe.task
    if task != "classification":  # the rows are macro-F1 and accuracy
        parser.error(f"--recipe: a {task} recipe; this benchmark scores text classifiers")
    # another recipe's teacher is fine-tuned once and shared by the seeds
    teacher_seed = args.seeds[0] if args.teacher_seed is None else args.teacher_seed
    shared = shared_teacher(args.recipe, work, teacher_seed, args.changes) if name else None
    half = (args.half_seeds if args.half_seeds is not None else
            args.seeds if runs == {"half"} else args.seeds[:1])
    rows, commands = [], [shlex.join(["python", "benchmarks/search_budget.py", *sys.argv[1:]])]
    hosts = {}  # cpu -> the environment its rows were measured in
    if args.keep and (HERE / "results" / f"{stem}.json").exists():
        kept = json.loads((HERE / "results" / f"{stem}.json").read_text())
        old = kept["environment"]  # a file from before rows named their cpu: all ran there
        rows = [dict(r, cpu=r.get("cpu", old["cpu"])) for r in kept["rows"]
                if r["seed"] not in args.seeds]
        hosts = kept.get("environments", {old["cpu"]: old})
        commands = kept.get("commands", ["(an earlier run: see this file's history)"]) + commands
    baseline = {r["seed"]: r for r in rows if r["run"] == "baseline"}

    def judged(row: dict, folder: str) -> dict:
        """Under --budget-model, a run's speed judged side by side with its seed's baseline,
        as the search timed its shapes beside it."""
        if not args.budget_model or "error" in row:
            return row
        seed = work / f"seed-{row['seed']}"
        ratio = side_by_side(seed / "baseline", seed / folder, recipe)
        return dict(row, p50_over_baseline_side_by_side=round(ratio, 4),
                    within_budget_at_bench=ratio <= 1 + recipe.search.budget_tolerance)

    for seed in args.seeds:
        # the default recipe's teacher is the seed's, shared with distill_methods.py
        teacher = shared or teacher_for(seed, HERE / "work" / "methods")
        common = ["bench.real_length_samples=0", *args.changes]
        baseline[seed] = one_run(seed, "baseline", work, teacher, common, args.recipe)
        if "error" in baseline[seed]:  # no budget to search under
            sys.exit(f"seed {seed}, baseline: {baseline[seed]['error']}")
        rows.append(baseline[seed])
        budget = baseline[seed]["p50_ms"]
        for run_name, factor in (("search", 1.0), ("half", 0.5)):
            if run_name not in runs or (run_name == "half" and seed not in half):
                continue
            given = (f"search.budget_model={int8_of(work / f'seed-{seed}' / 'baseline')}"
                     if args.budget_model else f"search.budget_ms={budget * factor:.4f}")
            rows.append(judged(one_run(seed, run_name, work, teacher,
                                       [*common, given, f"search.trials={args.trials}"],
                                       args.recipe, run_name + beside), run_name + beside))
            if run_name == "search" and args.one_se and "error" not in rows[-1]:  # by one_se
                picked, how = one_se_recipe(seed, work / f"seed-{seed}" / f"search{beside}",
                                            teacher, args.recipe, args.changes)
                same = rows[-1]  # the search row just made
                row = (dict(same, same_as_best=True) if picked is None else
                       one_se_row(judged(one_run(seed, "one_se", work, teacher,
                                                 ["bench.real_length_samples=0"], picked,
                                                 f"one_se{beside}"), f"one_se{beside}"),
                                  same, how))
                rows.append(dict(row, run="one_se", selection=how))
        print(json.dumps(rows[-1], indent=1))
        # after each seed: a long run keeps its part
        write_results(rows, baseline, args.trials, stem, name or "default task", commands,
                      hosts)


def write_results(rows: list[dict], baseline: dict[int, dict], trials: int, stem: str,
                  source: str, commands: list[str], hosts: dict[str, dict]) -> None:
    env = environment()
    # this run's rows were measured here; kept ones (--keep) name their own host
    rows = sorted((dict(r, cpu=r.get("cpu", env["cpu"])) for r in rows),
                  key=lambda r: r["seed"])  # stable: a seed's runs keep their order
    sums = [summary(rows, name, baseline) for name in ("baseline", "search", "one_se", "half")]
    hosts = {**hosts, env["cpu"]: env}
    results = HERE / "results"
    write_atomic(results / f"{stem}.json", json.dumps(
        {"rows": rows, "summary": sums, "environment": env, "environments": hosts,
         "commands": commands}, indent=2))
    text = markdown(rows, sums, env, trials, commands, source)
    write_atomic(results / f"{stem}.md", text)
    print(text)


if __name__ == "__main__":
    main()
