"""Headline numbers of the default recipe, over several seeds, in one sitting.

For each seed: the default recipe end to end (teacher fine-tuning, 2-layer distilled student,
ONNX, int8, evaluation, benchmark), then the same student trained on the labels alone from the
same initialisation and the same teacher checkpoint (the baseline distillation has to beat).
Writes benchmarks/results/drug_reviews.{json,md}: mean and spread over seeds of every metric,
and the latency ratios of each run (ratios, since absolute times on a shared machine drift).

    python benchmarks/drug_reviews.py --seeds 42 43 44
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from edgedistill.host import environment
from edgedistill.pipeline import run
from edgedistill.recipe import load_recipe

HERE = Path(__file__).parent
LABELS_ONLY = ["distill.alpha_distill=0", "distill.alpha_ce=1", "distill.matches=[]"]


def by_name(report: dict) -> dict:
    return {m["name"]: m for m in report["models"]}


def one_seed(seed: int, work: Path) -> dict:
    kd_dir, base_dir = work / f"seed-{seed}", work / f"seed-{seed}-labels-only"
    kd = run(None, kd_dir, [f"seed={seed}"])
    # Same teacher checkpoint for the baseline: copying the finished stage makes it a cache hit.
    if not (base_dir / "teacher").exists():
        base_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(kd_dir / "teacher", base_dir / "teacher")
    base = run(None, base_dir, [f"seed={seed}", *LABELS_ONLY])
    k, b = by_name(kd), by_name(base)
    row = {"seed": seed,
           "teacher_f1": k["teacher"]["metrics"]["macro_f1"],
           "teacher_accuracy": k["teacher"]["metrics"]["accuracy"]}
    for prefix, models in (("kd", k), ("labels_only", b)):
        for name in ("student", "student-int8"):
            key = f"{prefix}_{name.replace('-', '_')}"
            row[f"{key}_f1"] = models[name]["metrics"]["macro_f1"]
            row[f"{key}_accuracy"] = models[name]["metrics"]["accuracy"]
    row["targets"] = {t["target"]: t["measured"] for t in kd["targets"]}
    row["p50_ms"] = {n: m["latency"]["p50_ms"] for n, m in k.items()}
    row["size_mb"] = {n: m["size_mb"] for n, m in k.items()}
    row["distill_seconds"] = kd["training"]["distill"]["train_seconds"]
    row["labels_only_seconds"] = base["training"]["distill"]["train_seconds"]
    return row


def summarise(rows: list[dict]) -> dict:
    def stats(values):
        return {"mean": statistics.mean(values),
                "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values)}

    scalar = [k for k, v in rows[0].items() if isinstance(v, float)]
    out = {k: stats([r[k] for r in rows]) for k in scalar}
    out["targets"] = {t: stats([r["targets"][t] for r in rows]) for t in rows[0]["targets"]}
    return out


def to_markdown(result: dict) -> str:
    s, rows = result["summary"], result["runs"]
    fmt = lambda d: f"{d['mean']:.3f} ± {d['stdev']:.3f} (min {d['min']:.3f}, max {d['max']:.3f})"  # noqa: E731
    lines = ["# Default recipe (drug reviews, MiniLM-L6 -> 2 layers), "
             f"seeds {[r['seed'] for r in rows]}", "",
             f"{result['environment']['cpu']}, {result['environment']['cpu_count']} cores; "
             "p50 latency at batch 1, sequence 128, every model in its own process.", "",
             "| metric (test split, 379 rows) | mean ± stdev over seeds |", "|---|---|"]
    for key in ("teacher_f1", "kd_student_f1", "kd_student_int8_f1", "labels_only_student_f1",
                "labels_only_student_int8_f1", "teacher_accuracy", "kd_student_int8_accuracy",
                "labels_only_student_int8_accuracy"):
        lines.append(f"| {key} | {fmt(s[key])} |")
    lines += ["", "| target | goal | measured, mean ± stdev over seeds |", "|---|---|---|"]
    goals = {t.label: t.goal for t in load_recipe().report.targets}
    for name, d in s["targets"].items():
        lines.append(f"| {name} | {goals.get(name, '')} | {fmt(d)} |")
    lines += ["", "Per run p50 (ms):", ""]
    names = list(rows[0]["p50_ms"])
    lines += ["| seed | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {r['seed']} | " + " | ".join(f"{r['p50_ms'][n]:.2f}" for n in names) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rows = [one_seed(seed, args.work) for seed in args.seeds]
    result = {"benchmark": "drug_reviews", "recipe": load_recipe().to_dict(),
              "environment": environment(), "runs": rows, "summary": summarise(rows)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "drug_reviews.json").write_text(json.dumps(result, indent=2))
    (args.results / "drug_reviews.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
