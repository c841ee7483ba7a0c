"""What distillation is worth on a packaged workload recipe, over several seeds.

The teacher is fine-tuned once (the recipe's teacher stage, first seed) and shared by every
student (``teacher.model`` pointed at it, ``teacher.finetune: false``). For each seed, three
students with the same initialisation, labelled rows and epochs:

- ``labels``: trained on the labels alone (``distill.alpha_distill: 0``, no transfer set);
- ``kd``: the teacher's soft targets and the labels, no transfer set;
- ``kd+transfer``: as ``kd``, plus the recipe's transfer set (unlabelled text the teacher
  labels).

Each student is exported, quantized and evaluated on the held-out test split (fp32 and int8,
agreement with the teacher; a text classifier by macro-F1, a tagger by entity F1, see
``SCORES``); latency is measured in every run, and the speed-up is the ratio
of the teacher's and the int8 student's p50 within one run (ratios, not times: the machines
are shared). Writes benchmarks/results/<recipe>.{json,md} after every run (what has run so
far); finished runs are kept in benchmarks/work/, so a rerun continues where one stopped.

    python benchmarks/workloads.py trec-speaker --seeds 42 43 44
    python benchmarks/workloads.py reviews-ner --seeds 42 43 44

A recipe without a transfer set (a tagger: transfer sets are built for text classifiers) runs
``kd`` and ``labels`` only.

``--try NAME OVERRIDE...`` adds a variant of ``kd+transfer`` (of ``kd`` without a transfer set)
with other settings, run after the others on the same seeds and compared with labels-only
like them; a rerun lists it only when given the same ``--try`` again:

    python benchmarks/workloads.py tweets-mpnet --try kd0.5+10k-transfer \
        distill.alpha_distill=0.5 distill.alpha_ce=0.5 \
        "transfer.unlabelled=[{source: tweets, max_samples: 10000}]"

``--teacher-set OVERRIDE...`` changes the shared teacher's fine-tuning alone, e.g. a teacher
trained on every labelled row while the students keep the recipe's labelled subset (what a
user with a big labelled set and a small-model budget has); ``--tag NAME`` keeps such a run's
folders and results apart (``work/<recipe>-NAME``, ``results/<recipe>-NAME.{json,md}``):

    python benchmarks/workloads.py tweets-mpnet --tag teacher-all \
        --teacher-set data.max_train_samples=null

``--keep`` keeps the rows of the results file this run does not make, and does not run them
again, so a seed (or a tried variant) can join a table whose other runs' folders are gone;
the shared teacher must be the same (each row's teacher scores are compared):

    python benchmarks/workloads.py tweets-mpnet --keep --seeds 45 --try kd0.5+10k-transfer ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from edgedistill.bench.runner import BenchSettings, benchmark
from edgedistill.host import environment
from edgedistill.pipeline import run
from edgedistill.profiles import resolve_target
from edgedistill.recipe import load_recipe

HERE = Path(__file__).parent
VARIANTS = {
    "kd": ["transfer.unlabelled=[]"],
    "labels": ["distill.alpha_distill=0", "distill.alpha_ce=1", "transfer.unlabelled=[]"],
    "kd+transfer": [],
}
# run in this order, seed by seed within a group: the pair that answers "is KD worth it" first
GROUPS = (("kd", "labels"), ("kd+transfer",))
# per task: the report's quality metric, its second metric and the quality's name in the table
# (the row keys stay "f1" / "accuracy" whatever the task)
SCORES = {"classification": ("macro_f1", "accuracy", "macro-F1"),
          "token-classification": ("entity_f1", "word_accuracy", "entity F1")}


def by_name(report: dict) -> dict:
    return {m["name"]: m for m in report["models"]}


def one_run(recipe: str, folder: Path, overrides: list[str]) -> dict:
    report = run(recipe, folder, overrides)
    quality, second, _ = SCORES[report["task"]]
    models = by_name(report)
    # the stages' own times (their manifests): a rerun that skips finished stages keeps them
    seconds = sum(json.loads(m.read_text())["seconds"] for m in folder.glob("*/manifest.json"))
    # a model over the profile's memory budget has no latency (on the smart speaker: every
    # PyTorch model, as torch alone takes about 500 MB)
    row = {"minutes": seconds / 60,
           "distill_seconds": report["training"]["distill"].get("train_seconds"),
           "transfer_rows": (report["training"]["distill"].get("transfer") or {}).get("size", 0),
           "p50_ms": {n: m["latency"]["p50_ms"] for n, m in models.items() if "latency" in m},
           "over_budget": [n for n, m in models.items() if "over_budget" in m]}
    for name in ("teacher", "student", "student-int8"):
        metrics = models[name]["metrics"]
        key = name.replace("-", "_")
        row[f"{key}_f1"], row[f"{key}_accuracy"] = metrics[quality], metrics[second]
        row[f"{key}_agreement"] = metrics["agreement"]
        if "entity_f1_vs_teacher" in metrics:  # a tagger: per word, and per entity
            row[f"{key}_entity_agreement"] = metrics["entity_f1_vs_teacher"]
    return row


def one_core_speedup(folder: Path, profile: str) -> dict:
    """The PyTorch teacher against the int8 student on the profile's threads and input shape
    but without its memory budget (which the teacher does not fit), side by side in one run."""
    target = replace(resolve_target(profile), memory_budget_mb=None)
    settings = BenchSettings(rounds=3, iterations=30, warmup=5, min_seconds=1.0,
                             sequence_length=target.sequence_length, batch_size=1,
                             real_length_samples=0)
    teacher, int8 = benchmark([folder / "teacher" / "model", folder / "quantize" / "student-int8"],
                              target, settings=settings, progress=False)
    t, s = teacher["latency"]["p50_ms"], int8["latency"]["p50_ms"]
    return {"threads": target.threads, "sequence_length": target.sequence_length,
            "teacher_pytorch_p50_ms": t, "student_int8_p50_ms": s, "speedup": t / s,
            "teacher_peak_rss_mb": teacher["peak_rss_mb"], "int8_peak_rss_mb": int8["peak_rss_mb"]}


def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def ran(runs: list[dict]) -> list[str]:
    """The variants in ``runs``: the standard ones first, then the tried ones as they came."""
    found = dict.fromkeys(v for r in runs for v in r if v != "seed")
    return sorted(found, key=lambda v: list(VARIANTS).index(v) if v in VARIANTS else len(VARIANTS))


def summarise(runs: list[dict]) -> dict:
    """Mean and spread of each variant over the seeds it ran, and the issue's comparisons
    where both sides ran on the same seeds."""
    out = {}
    for variant in ran(runs):
        rows = [r[variant] for r in runs if variant in r]  # never empty: ran() found it
        keys = [k for k, v in rows[0].items() if isinstance(v, float)]
        out[variant] = {k: stats([row[k] for row in rows]) for k in keys}
        out[f"{variant}_int8_over_teacher"] = stats(
            [row["student_int8_f1"] / row["teacher_f1"] for row in rows])
    # the test: KD beats labels-only by more than twice the seed spread, on every seed
    for variant in ran(runs):
        both = [r for r in runs if variant in r and "labels" in r and variant != "labels"]
        if not both:
            continue
        gains = [r[variant]["student_int8_f1"] - r["labels"]["student_int8_f1"] for r in both]
        # the spread over the same seeds: labels-only's stdev over seeds the variant did not
        # run would change the verdict with no new evidence about the variant
        spread = max(stats([r[v]["student_int8_f1"] for r in both])["stdev"]
                     for v in (variant, "labels"))
        out[f"{variant}_over_labels"] = {
            "seeds": [r["seed"] for r in both], "per_seed": gains, "spread": spread,
            "beats_by_twice_the_spread_on_every_seed": len(both) > 1
            and all(g > 2 * spread for g in gains)}
    return out


def to_markdown(result: dict) -> str:
    s, runs = result["summary"], result["runs"]
    _, _, score = SCORES[result["recipe"]["task"]]
    fmt = lambda d: f"{d['mean']:.4f} ± {d['stdev']:.4f}"  # noqa: E731
    teacher_set = result.get("teacher_set") or []  # absent from results written before it
    changed = f"; its own settings: {', '.join(teacher_set)}" if teacher_set else ""
    seed = f"seed {result['teacher_seed']}, " if "teacher_seed" in result else ""
    lines = [f"# {result['recipe']['name']}: what distillation is worth", "",
             f"{result['environment']['cpu']}, {result['environment']['cpu_count']} cores; "
             f"profile {result['recipe']['bench']['profile']}. Teacher fine-tuned once "
             f"({seed}{result['teacher_minutes']:.1f} min{changed}), shared by every student. "
             "Test split only; mean ± stdev over the seeds each variant ran.", "",
             f"| student | seeds | fp32 {score} | int8 {score} | int8 accuracy | int8 "
             f"agreement with teacher | int8 / teacher {score} | minutes per run |",
             "|---|---|---|---|---|---|---|---|"]
    for v in ran(runs):
        d, seeds = s[v], [r["seed"] for r in runs if v in r]
        lines.append(f"| {v} | {', '.join(map(str, seeds))} | {fmt(d['student_f1'])} | "
                     f"{fmt(d['student_int8_f1'])} | {fmt(d['student_int8_accuracy'])} | "
                     f"{fmt(d['student_int8_agreement'])} | {fmt(s[f'{v}_int8_over_teacher'])} "
                     f"| {d['minutes']['mean']:.1f} |")
    first = s[ran(runs)[0]]
    lines += ["", f"Teacher {score} {first['teacher_f1']['mean']:.4f}, accuracy "
              f"{first['teacher_accuracy']['mean']:.4f}.", ""]
    if "student_int8_entity_agreement" in first:  # a tagger's entities against the teacher's
        lines += ["| student | int8 entity F1 against the teacher's entities |", "|---|---|"]
        lines += [f"| {v} | {fmt(s[v]['student_int8_entity_agreement'])} |"
                  for v in ran(runs)]
        lines.append("")
    speed = result.get("one_core")
    if speed:
        lines += [f"Speed on {speed['threads']} thread(s), {speed['sequence_length']} tokens "
                  f"(the profile's shape, without its memory budget: the PyTorch teacher peaks "
                  f"at {speed['teacher_peak_rss_mb']:.0f} MB, the int8 student at "
                  f"{speed['int8_peak_rss_mb']:.0f} MB): teacher PyTorch p50 "
                  f"{speed['teacher_pytorch_p50_ms']:.2f} ms, student int8 "
                  f"{speed['student_int8_p50_ms']:.2f} ms, **{speed['speedup']:.1f}x**.", ""]
    lines += [
              f"| gain in int8 {score} over labels-only | seeds | per seed | spread (largest "
              "stdev on those seeds) | > 2x spread on every seed |", "|---|---|---|---|---|"]
    for v in ran(runs):
        g = s.get(f"{v}_over_labels")
        if g:
            lines.append(f"| {v} | {', '.join(map(str, g['seeds']))} | "
                         f"{', '.join(f'{x:+.4f}' for x in g['per_seed'])} | {g['spread']:.4f} "
                         f"| {g['beats_by_twice_the_spread_on_every_seed']} |")
    lines += ["", f"| seed | variant | int8 {score} | agreement | int8 p50 ms on the profile "
              "| PyTorch teacher p50 / int8 p50, same run | over the memory budget | transfer "
              "rows | minutes |",
              "|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in runs:
        for v in ran(runs):
            if v in r:
                x = r[v]
                int8, teacher = (x["p50_ms"].get(n, nan) for n in ("student-int8", "teacher"))
                ratio = f"{teacher / int8:.1f}x" if teacher == teacher else "-"  # nan: not timed
                lines.append(f"| {r['seed']} | {v} | {x['student_int8_f1']:.4f} | "
                             f"{x['student_int8_agreement']:.4f} | {int8:.2f} | {ratio} | "
                             f"{', '.join(x['over_budget']) or '-'} | {x['transfer_rows']} | "
                             f"{x['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def write(results: Path, stem: str, recipe: str, runs: list[dict], teacher_minutes: float,
          teacher_set: list[str], one_core: dict | None, variants: dict,
          teacher_seed: int) -> str:
    result = {"benchmark": f"workloads/{stem}", "recipe": load_recipe(recipe).to_dict(),
              "environment": environment(), "teacher_minutes": teacher_minutes,
              "teacher_seed": teacher_seed, "teacher_set": teacher_set, "one_core": one_core,
              "variants": variants,
              "runs": runs, "summary": summarise(runs)}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(result, indent=2))
    text = to_markdown(result)
    (results / f"{stem}.md").write_text(text)
    return text


def shared_teacher(recipe: str, work: Path, seed: int, overrides: list[str] = ()) -> Path:
    """The recipe's fine-tuned teacher, trained once into ``work``/teacher on ``seed`` (its
    teacher stage alone, skipped when finished) for every seed's students to learn from."""
    run(recipe, work / "teacher", [f"seed={seed}", *overrides], until="teacher")
    return work / "teacher" / "teacher" / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a packaged recipe name, e.g. trec-speaker")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--try", dest="tries", nargs="+", action="append", default=[],
                        metavar=("NAME", "OVERRIDE"),
                        help="a further variant: kd+transfer (kd without a transfer set) "
                             "with these --set overrides, e.g. distill.alpha_distill=0.9")
    parser.add_argument("--teacher-set", nargs="+", default=[], metavar="OVERRIDE",
                        help="settings of the shared teacher's fine-tuning alone, e.g. "
                             "data.max_train_samples=null; give a --tag with them")
    parser.add_argument("--tag", default="",
                        help="keeps this run apart: work/<recipe>-TAG, results/<recipe>-TAG")
    parser.add_argument("--keep", action="store_true",
                        help="keep the results file's rows this run does not make (and do not "
                             "run them again), e.g. to add a seed to a table")
    args = parser.parse_args()
    if args.teacher_set and not args.tag:  # its students would mix with the recipe teacher's
        parser.error("--teacher-set: give a --tag too, so the runs of that teacher stay apart")
    stem = f"{args.recipe}-{args.tag}" if args.tag else args.recipe
    work = args.work / stem
    kept_file = args.results / f"{stem}.json"
    kept = json.loads(kept_file.read_text()) if args.keep and kept_file.is_file() else None
    transfer = load_recipe(args.recipe).transfer.active
    variants = dict(VARIANTS if transfer else {k: VARIANTS[k] for k in GROUPS[0]})
    for name, *overrides in args.tries:
        if name in variants or not overrides:
            parser.error(f"--try {name}: give a new variant's name, then its overrides")
        variants[name] = [*VARIANTS["kd+transfer" if transfer else "kd"], *overrides]
    # the teacher is fine-tuned on the first seed; kept rows name theirs (files written before
    # they did: their first seed)
    teacher_seed = kept.get("teacher_seed", kept["runs"][0]["seed"]) if kept else args.seeds[0]
    if kept:  # checked before the teacher, which may take an hour
        for name, overrides in kept["variants"].items():
            if variants.setdefault(name, overrides) != overrides:
                parser.error(f"--keep: the kept {name} rows ran with {overrides}; give those "
                             "settings, or another name")
        if (kept.get("teacher_set") or []) != args.teacher_set:
            parser.error(f"--keep: the kept rows' teacher ran with --teacher-set "
                         f"{kept.get('teacher_set') or '(none)'}; give the same")
        if kept["environment"]["cpu"] != environment()["cpu"]:  # minutes and p50s would mix
            parser.error(f"--keep: the kept rows ran on {kept['environment']['cpu']}; run "
                         "this one there too, or without --keep")
    teacher = shared_teacher(args.recipe, work, teacher_seed, args.teacher_set)
    # kept rows: their teacher is this run's (checked below), with its fine-tuning time
    teacher_minutes = (kept["teacher_minutes"] if kept else
                       json.loads((teacher.parent / "manifest.json").read_text())["seconds"] / 60)
    # the teacher's ONNX copy is not compared here: leave its export out of the students' runs
    shared = [f"teacher.model={teacher}", "teacher.finetune=false", "export.export_teacher=false"]
    runs = {r["seed"]: r for r in kept["runs"]} if kept else {}
    for seed in args.seeds:
        runs.setdefault(seed, {"seed": seed})
    runs = dict(sorted(runs.items()))
    one_core = kept["one_core"] if kept else None  # the same shapes: measured once
    groups = [*(GROUPS if transfer else GROUPS[:1]), *([n] for n, *_ in args.tries)]
    plan = [(seed, variant) for group in groups for seed in args.seeds for variant in group
            if variant not in runs[seed]]  # a kept row is not run again
    # finished runs first (a rerun only reads them back), so the results show every one of
    # them while the others still train; the rest keep their order
    plan.sort(key=lambda run_: not (work / f"seed-{run_[0]}-{run_[1]}" / "report.json").is_file())
    kept_teacher = next((row["teacher_f1"] for r in runs.values() for v, row in r.items()
                         if v != "seed"), None)
    for seed, variant in plan:
        folder = work / f"seed-{seed}-{variant}"
        row = one_run(args.recipe, folder, [f"seed={seed}", *shared, *variants[variant]])
        if kept_teacher is not None and row["teacher_f1"] != kept_teacher:
            sys.exit(f"--keep: this run's teacher scores {row['teacher_f1']:.6f}, the kept "
                     f"rows' {kept_teacher:.6f}: another teacher; run without --keep")
        runs[seed][variant] = row
        if one_core is None:  # the same shapes in every run: measured once
            one_core = one_core_speedup(folder, load_recipe(args.recipe).bench.profile)
        print(f"seed {seed} {variant}: int8 score {row['student_int8_f1']:.4f}, "
              f"agreement {row['student_int8_agreement']:.4f}, {row['minutes']:.1f} min",
              flush=True)
        write(args.results, stem, args.recipe, list(runs.values()), teacher_minutes,
              args.teacher_set, one_core, variants, teacher_seed)
    print(write(args.results, stem, args.recipe, list(runs.values()), teacher_minutes,
                args.teacher_set, one_core, variants, teacher_seed))


if __name__ == "__main__":
    main()
