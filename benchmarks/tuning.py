"""Accuracy-aware int8 tuning on the default recipe's distilled students: how many trials it
takes to reach a setting within the tolerance, and what the tuned model scores on the test split.

For each seed whose default-recipe run exists in ``work/seed-N`` (made by drug_reviews.py):
tune the exported fp32 student on its validation split (macro-F1, the recipe's own split) at
each tolerance, then evaluate the chosen model on the 379 test reviews next to fp32. Writes
results/tuning.{json,md}.

    python benchmarks/tuning.py --seeds 42 43 44 --tolerances 0.01 0.002
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from edgedistill.data import load_task_data
from edgedistill.host import environment
from edgedistill.evaluation import evaluate
from edgedistill.quantization.tuning import tune
from edgedistill.recipe import load_recipe

HERE = Path(__file__).parent


def one(seed: int, tolerance: float, work: Path) -> dict:
    recipe = load_recipe(None, [f"seed={seed}"])
    data = load_task_data(recipe.data, seed)
    fp32 = HERE / "work" / f"seed-{seed}" / "export" / "student"
    out = work / f"seed-{seed}-tol-{tolerance}"
    shutil.rmtree(out, ignore_errors=True)
    calibration = list(data.train.shuffle(seed=seed).select(range(128))["text"])
    start = time.perf_counter()
    result = tune(fp32, out, list(data.validation["text"]), list(data.validation["label"]),
                  data.labels, tolerable_loss=tolerance, calibration_texts=calibration,
                  max_length=recipe.data.max_length)
    seconds = time.perf_counter() - start
    test = {"fp32": evaluate(fp32, data.test, data.labels, 32, recipe.data.max_length)}
    if result["passed"]:
        test["tuned"] = evaluate(out, data.test, data.labels, 32, recipe.data.max_length)
    return {"seed": seed, "tolerance": tolerance, "passed": result["passed"],
            "chosen": result["chosen"], "trials": result["trials"], "seconds": seconds,
            "validation_fp32": result["baseline"]["metric"],
            "validation_rows": len(data.validation),
            "test_macro_f1": {k: v["macro_f1"] for k, v in test.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.01, 0.002])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    work = HERE / "work" / "tuning"
    rows = [one(seed, tol, work) for tol in args.tolerances for seed in args.seeds]
    env = environment()
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "tuning.json").write_text(json.dumps(
        {"environment": env, "runs": rows}, indent=2))
    lines = ["# Accuracy-aware int8 tuning on the default recipe's students", "",
             f"{env['cpu']}, {env['cpu_count']} cores, onnxruntime "
             f"{env['libraries'].get('onnxruntime')}. Tuned on the validation split "
             f"({rows[0]['validation_rows']} reviews, macro-F1 relative to fp32); test "
             "macro-F1 on the 379 test reviews. "
             "Goal: a passing setting in <= 10 trials.", "",
             "| tolerance | seed | passed | trials | chosen setting (fp32 nodes) | validation "
             "macro-F1 fp32 -> chosen | test macro-F1 fp32 -> tuned | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        chosen = next((t for t in r["trials"] if t["passed"]), None)
        setting = f"{chosen['setting']} ({len(chosen['kept_fp32'])})" if chosen else "-"
        valid = f"{r['validation_fp32']:.3f} -> {chosen['metric']:.3f}" if chosen else "-"
        test = r["test_macro_f1"]
        tested = (f"{test['fp32']:.3f} -> {test['tuned']:.3f}" if "tuned" in test
                  else f"{test['fp32']:.3f} -> -")
        lines.append(f"| {r['tolerance']:.1%} | {r['seed']} | {'yes' if r['passed'] else 'NO'} "
                     f"| {len(r['trials'])} | {setting} | {valid} | {tested} | "
                     f"{r['seconds']:.0f} |")
    (args.results / "tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
