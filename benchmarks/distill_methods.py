"""Which distillation losses help on the default task? One table, same student, data and steps.

For each seed: the default recipe's teacher (fine-tuned once per seed and shared), then the same
2-layer student (teacher blocks 0 and 5) trained for the same 8 epochs with each loss set below.
Reports test accuracy and macro-F1 of the PyTorch student (mean and spread over seeds) and the
training time per step relative to labels-only, measured in the same sitting.

Match weights follow one rule instead of a per-loss search: each term starts near 1 on this
task (its value on the first training batches, measured once), so no loss wins by its scale.

    python benchmarks/distill_methods.py --seeds 42 43 44
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from edgedistill.data import load_task_data
from edgedistill.environment import environment
from edgedistill.evaluation import evaluate
from edgedistill.recipe import load_recipe
from edgedistill.sources import resolve_model
from edgedistill.training import distil_student, finetune_teacher

HERE = Path(__file__).parent
HIDDEN = "{loss: hidden_mse, strategy: uniform, weight: 5}"
ATTENTION = "{loss: attention_kl, strategy: uniform, weight: 1.5}"
METHODS = {  # name -> recipe overrides
    "labels only": ["distill.alpha_ce=1", "distill.alpha_distil=0"],
    "logits": [],
    "logits + hidden": [f"distill.matches=[{HIDDEN}]"],
    "logits + hidden + attention": [f"distill.matches=[{HIDDEN}, {ATTENTION}]"],
    "logits + RKD": ["distill.matches=[{loss: rkd_distance, weight: 10}, "
                     "{loss: rkd_angle, weight: 20}]"],
    "logits + similarity-preserving": ["distill.matches=[{loss: similarity_preserving, weight: 10}]"],
    "logits + MiniLM relations": ["distill.matches=[{loss: minilm_relation, weight: 0.5}]"],
    "logits + contrastive relations": ["distill.matches=[{loss: contrastive_relation, weight: 0.25}]"],
}


def teacher_for(seed: int, work: Path) -> Path:
    """The default recipe's fine-tuned teacher for ``seed``: the one the default-recipe
    benchmark trained when it is there, else fine-tuned here once."""
    for folder in (HERE / "work" / f"seed-{seed}" / "teacher", work / f"seed-{seed}" / "teacher"):
        if (folder / "model" / "config.json").is_file():
            return folder / "model"
    recipe = load_recipe(None, [f"seed={seed}"])
    data = load_task_data(recipe.data, seed)
    folder = work / f"seed-{seed}" / "teacher"
    finetune_teacher(resolve_model(recipe.teacher.model), recipe.teacher, data, recipe.data,
                     folder, seed)
    return folder / "model"


def one_run(seed: int, method: str, work: Path, teacher: Path) -> dict:
    out = work / f"seed-{seed}" / method.replace(" ", "").replace("+", "_")
    done = out / "result.json"
    if done.is_file():  # finished in an earlier sitting
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    recipe = load_recipe(None, [f"seed={seed}", *METHODS[method]])
    data = load_task_data(recipe.data, seed)
    start = time.perf_counter()
    record = distil_student(teacher, recipe.student, recipe.distill, data, recipe.data, out, seed)
    seconds = time.perf_counter() - start
    metrics = evaluate(out / "model", data.test, data.labels, 32, recipe.data.max_length)
    row = {"seed": seed, "method": method, "accuracy": metrics["accuracy"],
           "macro_f1": metrics["macro_f1"],
           "steps": max(h.get("step", 0) for h in record["log_history"]),
           "train_seconds": record["train_seconds"], "stage_seconds": round(seconds, 1)}
    done.write_text(json.dumps(row))
    return row


def summarise(rows: list[dict]) -> list[dict]:
    def spread(values):
        return statistics.stdev(values) if len(values) > 1 else 0.0

    base_step = {r["seed"]: r["train_seconds"] / r["steps"] for r in rows
                 if r["method"] == "labels only"}
    table = []
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        ratios = [(r["train_seconds"] / r["steps"]) / base_step[r["seed"]]
                  for r in mine if r["seed"] in base_step]
        table.append({
            "method": method, "seeds": [r["seed"] for r in mine],
            "accuracy": statistics.mean(r["accuracy"] for r in mine),
            "accuracy_stdev": spread([r["accuracy"] for r in mine]),
            "macro_f1": statistics.mean(r["macro_f1"] for r in mine),
            "macro_f1_stdev": spread([r["macro_f1"] for r in mine]),
            "step_time_vs_labels_only": statistics.mean(ratios) if ratios else None,
            "f1_minus_logits_by_seed": None,
        })
    logits = {r["seed"]: r["macro_f1"] for r in rows if r["method"] == "logits"}
    for row in table:
        mine = [r for r in rows if r["method"] == row["method"] and r["seed"] in logits]
        row["f1_minus_logits_by_seed"] = [round(r["macro_f1"] - logits[r["seed"]], 4) for r in mine]
    return table


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Distillation methods on drug reviews (MiniLM-L6 teacher -> 2 blocks), "
             f"seeds {result['seeds']}", "",
             f"{env['cpu']}, {env['cpu_count']} cores, torch {env['libraries'].get('torch')}. "
             "Same student (teacher blocks 0 and 5), data, 8 epochs, lr 2e-4, batch 16, "
             "alpha_ce = alpha_distil = 0.5 (labels only: 1 / 0); 379 test rows; PyTorch fp32.",
             "",
             "| method | accuracy | macro-F1 | macro-F1 minus logits-only, per seed | "
             "time per step vs labels only |", "|---|---|---|---|---|"]
    for row in result["table"]:
        ratio = row["step_time_vs_labels_only"]
        lines.append(
            f"| {row['method']} | {row['accuracy']:.3f} ± {row['accuracy_stdev']:.3f} | "
            f"{row['macro_f1']:.3f} ± {row['macro_f1_stdev']:.3f} | "
            f"{', '.join(f'{d:+.3f}' for d in row['f1_minus_logits_by_seed'])} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    lines += ["", "Time per step is the Trainer's train_runtime (which includes one validation "
              "pass per epoch) over its steps. 'logits' reads teacher logits computed once "
              "before training, so its steps cost what labels-only steps cost; every match "
              "needs the live teacher in each step.", "",
              "Match weights: " + "; ".join(f"{m}: {' '.join(o) or 'default recipe'}"
                                              for m, o in METHODS.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--work", type=Path, default=HERE / "work" / "methods")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rows: list[dict] = []
    for seed in args.seeds:  # seed by seed, so a cut-short sitting still has whole seeds
        teacher = teacher_for(seed, args.work)
        for method in args.methods:
            row = one_run(seed, method, args.work, teacher)
            rows.append(row)
            print(json.dumps(row), flush=True)
            result = {"seeds": args.seeds, "environment": environment(), "runs": rows,
                      "table": summarise(rows)}
            args.results.mkdir(parents=True, exist_ok=True)
            (args.results / "distill_methods.json").write_text(json.dumps(result, indent=2))
            (args.results / "distill_methods.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
