"""Which distillation losses help on the default task? One table, same student, data and steps.

For each seed: the default recipe's teacher (fine-tuned once per seed and shared), then the same
2-layer student (teacher blocks 0 and 5) trained for the same 8 epochs with each loss set below.
Reports test accuracy and macro-F1 of the PyTorch student (mean and spread over seeds) and the
training time per step relative to labels-only, timed side by side in one process.

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
from dataclasses import asdict
from pathlib import Path

import torch

from edgedistill.data import load_task_data
from edgedistill.distill import DistillationTrainer, DistillationTrainingArguments
from edgedistill.distill.training import distill_student, finetune_teacher
from edgedistill.evaluation import evaluate
from edgedistill.host import environment
from edgedistill.recipe import load_recipe
from edgedistill.sources import resolve_model
from edgedistill.tasks import get_task

HERE = Path(__file__).parent
HIDDEN = "{loss: hidden_mse, strategy: uniform, weight: 5}"
ATTENTION = "{loss: attention_kl, strategy: uniform, weight: 1.5}"
METHODS = {  # name -> recipe overrides
    "labels only": ["distill.alpha_ce=1", "distill.alpha_distill=0"],
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
    finetune_teacher(get_task(recipe.task), resolve_model(recipe.teacher.model), recipe.teacher,
                     data, recipe.data, folder, seed)
    return folder / "model"


def distil_and_test(seed: int, overrides: list[str], out: Path, teacher: Path) -> dict:
    """Distil the default recipe's student, changed by ``overrides``, from ``teacher`` into
    ``out`` and score the PyTorch student on the test split (a finished run is read back)."""
    done = out / "result.json"
    if done.is_file():  # finished in an earlier sitting
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    recipe = load_recipe(None, [f"seed={seed}", *overrides])
    data = load_task_data(recipe.data, seed)
    start = time.perf_counter()
    record = distill_student(get_task(recipe.task), teacher, recipe.student, recipe.distill, data,
                            recipe.data, out, seed)
    seconds = time.perf_counter() - start
    metrics = evaluate(out / "model", data.test, data.labels, 32, recipe.data.max_length)
    row = {"seed": seed, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
           "parameters": record["parameters"], "teacher_parameters": record["teacher_parameters"],
           "validation_per_epoch": record["selection"]["per_epoch"],
           "steps": max(h.get("step", 0) for h in record["log_history"]),
           "train_seconds": record["train_seconds"], "stage_seconds": round(seconds, 1)}
    done.write_text(json.dumps(row))
    return row


def one_run(seed: int, method: str, work: Path, teacher: Path) -> dict:
    out = work / f"seed-{seed}" / method.replace(" ", "").replace("+", "_")
    return {"method": method, **distil_and_test(seed, METHODS[method], out, teacher)}


def step_times(seed: int, teacher_dir: Path, methods: list[str], steps: int = 12,
               rounds: int = 3) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, optimizer) per method, timed
    side by side: the methods take turns for ``rounds`` rounds on the same batches, so a
    shared machine's drift hits them all alike. 'logits' reads precomputed teacher logits, as
    the pipeline does."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
    )

    from edgedistill.data import tokenize
    from edgedistill.distill.student import build_student
    from edgedistill.distill.teacher_outputs import add_teacher_logits

    recipe = load_recipe(None, [f"seed={seed}"])
    data = load_task_data(recipe.data, seed)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    collator = DataCollatorWithPadding(tokenizer)
    train = tokenize(data.train, tokenizer, recipe.data.max_length)
    train = add_teacher_logits(train.select(range(16 * (steps + 2))), teacher, collator)
    batches = [collator([train[i] for i in range(k, k + 16)]) for k in range(0, len(train), 16)]
    setups = {}
    for method in methods:
        cfg = load_recipe(None, [f"seed={seed}", *METHODS[method]])
        student = build_student(get_task(cfg.task), teacher, cfg.student).train()
        uses_teacher = cfg.distill.alpha_distill > 0 or cfg.distill.matches
        args = DistillationTrainingArguments(
            output_dir=str(HERE / "work" / "timing"), report_to="none", use_cpu=True,
            temperature=cfg.distill.temperature, alpha_ce=cfg.distill.alpha_ce,
            alpha_distill=cfg.distill.alpha_distill,
            matches=[asdict(m) for m in cfg.distill.matches])
        trainer = DistillationTrainer(model=student, args=args,
                                      teacher_model=teacher if uses_teacher else None)
        keep_cached = method == "logits"
        setups[method] = (trainer, student, torch.optim.AdamW(student.parameters(), lr=1e-5),
                          keep_cached)
    timings: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for method, (trainer, student, optimizer, keep_cached) in setups.items():
            for i, batch in enumerate(batches):
                batch = dict(batch)
                if not keep_cached:
                    batch.pop("teacher_logits")
                start = time.perf_counter()
                trainer.compute_loss(student, batch).backward()
                optimizer.step()
                optimizer.zero_grad()
                if i >= 2:  # the first steps warm caches and allocators up
                    timings[method].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in timings.items()}


def seed_summary(rows: list[dict], reference: dict[int, float]) -> dict:
    """Mean and spread over ``rows`` (one per seed) of test accuracy and macro-F1, and each
    seed's macro-F1 minus ``reference``'s (seed -> macro-F1)."""
    def spread(values):
        return statistics.stdev(values) if len(values) > 1 else 0.0

    return {"seeds": [r["seed"] for r in rows],
            "accuracy": statistics.mean(r["accuracy"] for r in rows),
            "accuracy_stdev": spread([r["accuracy"] for r in rows]),
            "macro_f1": statistics.mean(r["macro_f1"] for r in rows),
            "macro_f1_stdev": spread([r["macro_f1"] for r in rows]),
            "f1_minus_reference_by_seed": [round(r["macro_f1"] - reference[r["seed"]], 4)
                                           for r in rows if r["seed"] in reference]}


def summarise(rows: list[dict], step_seconds: dict[str, float] | None) -> list[dict]:
    logits = {r["seed"]: r["macro_f1"] for r in rows if r["method"] == "logits"}
    base = (step_seconds or {}).get("labels only")
    table = []
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        table.append({
            "method": method, **seed_summary(mine, logits),
            "step_seconds": (step_seconds or {}).get(method),
            "step_time_vs_labels_only": (step_seconds[method] / base
                                         if base and method in step_seconds else None),
        })
    return table


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Distillation methods on drug reviews (MiniLM-L6 teacher -> 2 blocks), "
             f"seeds {result['seeds']}", "",
             f"{env['cpu']}, {env['cpu_count']} cores, torch {env['libraries'].get('torch')}. "
             "Same student (teacher blocks 0 and 5), data, 8 epochs, lr 2e-4, batch 16, "
             "alpha_ce = alpha_distill = 0.5 (labels only: 1 / 0); 379 test rows; PyTorch fp32.",
             "",
             "| method | accuracy | macro-F1 | macro-F1 minus logits-only, per seed | "
             "time per step vs labels only |", "|---|---|---|---|---|"]
    for row in result["table"]:
        ratio = row["step_time_vs_labels_only"]
        lines.append(
            f"| {row['method']} | {row['accuracy']:.3f} ± {row['accuracy_stdev']:.3f} | "
            f"{row['macro_f1']:.3f} ± {row['macro_f1_stdev']:.3f} | "
            f"{', '.join(f'{d:+.3f}' for d in row['f1_minus_reference_by_seed'])} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    lines += ["", "Time per step: median of one training step (forward, backward, AdamW) on the "
              "same 16-review batches, the methods taking turns over 3 rounds in one process "
              "(step_times()). 'logits' reads teacher logits computed once before training, as "
              "the pipeline does, so its steps cost what labels-only steps cost; every match "
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
    for seed in args.seeds:  # seed by seed; finished runs are kept, so a rerun continues
        teacher = teacher_for(seed, args.work)
        for method in args.methods:
            rows.append(one_run(seed, method, args.work, teacher))
            print(json.dumps(rows[-1]), flush=True)
    step_seconds = step_times(args.seeds[0], teacher_for(args.seeds[0], args.work), args.methods)
    result = {"seeds": args.seeds, "environment": environment(), "runs": rows,
              "step_seconds": step_seconds, "table": summarise(rows, step_seconds)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "distill_methods.json").write_text(json.dumps(result, indent=2))
    (args.results / "distill_methods.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
