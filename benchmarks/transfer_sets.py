"""Do transfer sets pay off? Both default recipes, with and without one, several seeds.

classifier (drug reviews, MiniLM-L6 -> 2 layers; per seed one teacher checkpoint, one
teacher-initialised student, the recipe's batch and learning rate):

- ``kd+transfer``: the recipe's logit KD on the training rows plus ``--factor`` teacher-labelled
  variants of each training text (``transfer.augment``), for ``--epochs`` epochs;
- ``kd``: the same KD without the transfer set, for as many optimizer steps;
- ``labels-only``: cross-entropy on the labels alone, for as many steps.

Equal steps of equal batch size are equal training compute (the teacher's logits are computed
once, before training, in both KD variants); the measured seconds are listed beside them,
teacher labelling included.

lm (SmolLM2-135M -> 8 of 30 layers; per seed):

- ``kd+generations``: the recipe's token KD (cached top-64) on the training blocks plus
  ``--prompts`` teacher continuations of training-text prompts (``transfer.generate``), for
  ``--lm-epochs`` epochs;
- ``lm``: plain next-token loss on the training blocks, given the same wall-clock: as many
  steps as the kd+generations stage took seconds in all (generating, building the teacher cache
  and training) at its own measured seconds per step.

Scores: macro-F1 / accuracy on the test split (379 reviews), perplexity on the held-out test
blocks. Writes results/transfer_{classifier,lm}.{json,md}. Runs go to work/transfer/.

    python benchmarks/transfer_sets.py classifier --seeds 42 43 44
    python benchmarks/transfer_sets.py lm --seeds 42 43 44
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np

from edgedistill.data import lm_blocks, load_task_data
from edgedistill.host import environment
from edgedistill.evaluation import evaluate, evaluate_lm
from edgedistill.pipeline import run
from edgedistill.recipe import load_recipe

HERE = Path(__file__).parent
LABELS_ONLY = ["distill.alpha_distill=0", "distill.alpha_ce=1"]
PLAIN_LM = ["distill.alpha_ce=1.0", "distill.alpha_distill=0.0", "distill.cache_teacher=false"]


def _distill(recipe: str | None, out: Path, overrides: list[str], teacher_from: Path | None):
    """The distill stage of ``recipe`` into ``out`` (reusing ``teacher_from``'s teacher stage, so
    every variant of a seed starts from the same checkpoint); its manifest."""
    if teacher_from is not None and not (out / "teacher").exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(teacher_from / "teacher", out / "teacher")
    run(recipe, out, overrides, until="distill")
    return json.loads((out / "distill" / "manifest.json").read_text())


def _steps(record: dict) -> int:
    return max(h.get("step", 0) for h in record["log_history"])


def classifier_seed(seed: int, work: Path, factor: int, epochs: float) -> dict:
    recipe = load_recipe(None, [f"seed={seed}"])
    data = load_task_data(recipe.data, seed)
    base = [f"seed={seed}"]
    first = work / f"seed-{seed}" / "kd+transfer"
    variants = {"kd+transfer": base + [f"transfer.augment.factor={factor}",
                                       f"distill.epochs={epochs}"]}
    manifests = {"kd+transfer": _distill(None, first, variants["kd+transfer"], None)}
    steps = _steps(manifests["kd+transfer"]["record"])
    # the same optimizer steps over the training rows alone
    per_epoch = math.ceil(len(data.train) / recipe.distill.batch_size)
    same = [f"distill.epochs={steps / per_epoch:.4f}"]
    variants["kd"] = base + same
    variants["labels-only"] = base + LABELS_ONLY + same
    for name in ("kd", "labels-only"):
        manifests[name] = _distill(None, work / f"seed-{seed}" / name, variants[name], first)
    row = {"seed": seed}
    for name, manifest in manifests.items():
        record = manifest["record"]
        model = work / f"seed-{seed}" / name / "distill" / "model"
        metrics = evaluate(model, data.test, data.labels, max_length=recipe.data.max_length)
        transfer = record.get("transfer", {})
        row[name] = {"overrides": variants[name], "macro_f1": metrics["macro_f1"],
                     "accuracy": metrics["accuracy"], "steps": _steps(record),
                     "train_seconds": record["train_seconds"],
                     "teacher_seconds": transfer.get("teacher_seconds", 0.0),
                     "transfer_rows": transfer.get("size", 0)}
        print(f"seed {seed} {name}: macro-F1 {metrics['macro_f1']:.3f}, {_steps(record)} steps, "
              f"{record['train_seconds']:.0f} s", flush=True)
    return row


def lm_seed(seed: int, work: Path, prompts: int, epochs: float) -> dict:
    name = "smollm2-distill"
    recipe = load_recipe(name, [f"seed={seed}"])
    first = work / f"seed-{seed}" / "kd+generations"
    kd_sets = [f"seed={seed}", f"distill.epochs={epochs}",
               f"transfer.generate.prompts={prompts}"]
    # A rerun must pay the generations and the teacher cache again: read from an earlier run's
    # caches they would drop out of the stage's seconds, the plain LM's budget. (A stage that is
    # skipped as unchanged keeps the seconds of the run that made it.)
    for cache in ("transfer-cache", "teacher-cache"):
        shutil.rmtree(first / cache, ignore_errors=True)
    kd = _distill(name, first, kd_sets, None)
    steps = _steps(kd["record"])
    # the whole stage's seconds (generations, teacher cache, training) spent on plain LM steps
    # at the rate the kd run trained at
    lm_steps = round(kd["seconds"] / (kd["record"]["train_seconds"] / steps))
    data = load_task_data(recipe.data, seed, labelled=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(first / "teacher" / "model")
    per_epoch = math.ceil(len(lm_blocks(data.train, tokenizer, recipe.data.max_length))
                          / recipe.distill.batch_size)
    lm_sets = [f"seed={seed}", *PLAIN_LM, f"distill.epochs={lm_steps / per_epoch:.4f}"]
    lm = _distill(name, work / f"seed-{seed}" / "lm", lm_sets, first)
    test = np.asarray(lm_blocks(data.test, tokenizer, recipe.data.max_length)["input_ids"])
    row = {"seed": seed, "test_tokens": int(test.size)}
    for variant, manifest, sets in (("kd+generations", kd, kd_sets), ("lm", lm, lm_sets)):
        record = manifest["record"]
        model = work / f"seed-{seed}" / variant / "distill" / "model"
        ppl = evaluate_lm(model, test, 8)["perplexity"]
        transfer = record.get("transfer", {})
        row[variant] = {"overrides": sets, "perplexity": ppl, "steps": _steps(record),
                        "train_seconds": record["train_seconds"],
                        "stage_seconds": manifest["seconds"],
                        "teacher_seconds": transfer.get("teacher_seconds", 0.0),
                        "generated_rows": transfer.get("size", 0)}
        print(f"seed {seed} {variant}: perplexity {ppl:.2f}, {_steps(record)} steps, "
              f"stage {manifest['seconds']:.0f} s", flush=True)
    return row


def _stats(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def _table(rows: list[dict], variants: list[str], metrics: list[str]) -> list[str]:
    lines = ["| variant | " + " | ".join(f"{m} (mean ± stdev)" for m in metrics)
             + " | per seed | steps | training s | teacher s |",
             "|---|" + "---|" * (len(metrics) + 4)]
    for v in variants:
        cells = [_stats([r[v][m] for r in rows]) for m in metrics]
        seeds = ", ".join(f"{r[v][metrics[0]]:.3f}" for r in rows)
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {seeds} | "
                     + ", ".join(str(r[v]["steps"]) for r in rows) + " | "
                     + ", ".join(f"{r[v]['train_seconds']:.0f}" for r in rows) + " | "
                     + ", ".join(f"{r[v]['teacher_seconds']:.0f}" for r in rows) + " |")
    return lines


def _paired(rows: list[dict], a: str, b: str, metric: str) -> str:
    diffs = [r[a][metric] - r[b][metric] for r in rows]
    wins = sum(d > 0 for d in diffs)
    return (f"{a} - {b}, {metric}: {_stats(diffs)} (per seed "
            f"{', '.join(f'{d:+.3f}' for d in diffs)}; {a} higher in {wins} of {len(diffs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["classifier", "lm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--factor", type=int, default=4, help="classifier: variants per text")
    parser.add_argument("--epochs", type=float, default=2.0,
                        help="classifier: epochs of the kd+transfer run")
    parser.add_argument("--prompts", type=int, default=256, help="lm: teacher continuations")
    parser.add_argument("--lm-epochs", type=float, default=1.0,
                        help="lm: epochs of the kd+generations run")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "transfer")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:  # results are rewritten after every seed: a cut-short run keeps them
        if args.task == "classifier":
            rows.append(classifier_seed(seed, args.work / "classifier", args.factor, args.epochs))
        else:
            rows.append(lm_seed(seed, args.work / "lm", args.prompts, args.lm_epochs))
        write_results(args, rows)


def write_results(args, rows: list[dict]) -> None:
    env = environment()
    seeds = [r["seed"] for r in rows]
    if args.task == "classifier":
        variants, metrics = ["kd+transfer", "kd", "labels-only"], ["macro_f1", "accuracy"]
        head = [f"# Transfer set for the drug-review student (factor {args.factor}, "
                f"{args.epochs:g} epochs), seeds {seeds}", "",
                "Same teacher checkpoint and student initialisation per seed; kd and "
                "labels-only take as many optimizer steps (batch 16) as kd+transfer. Test split, "
                "379 reviews.", ""]
        paired = [_paired(rows, "kd+transfer", "labels-only", "macro_f1"),
                  _paired(rows, "kd+transfer", "kd", "macro_f1"),
                  _paired(rows, "kd", "labels-only", "macro_f1")]
    else:
        variants, metrics = ["kd+generations", "lm"], ["perplexity"]
        head = [f"# Teacher generations for the SmolLM2 student ({args.prompts} prompts, "
                f"{args.lm_epochs:g} epoch), seeds {seeds}", "",
                "lm gets the kd+generations stage's whole wall-clock (generating, teacher cache, "
                f"training) as plain LM steps. Perplexity on {rows[0]['test_tokens']} held-out "
                "test tokens (lower is better).", ""]
        paired = [_paired(rows, "lm", "kd+generations", "perplexity")]
    lines = head + _table(rows, variants, metrics) + [""] + [f"- {p}" for p in paired]
    if args.task == "lm":
        lines.append("- stage seconds (kd+generations / lm): " + ", ".join(
            f"{r['kd+generations']['stage_seconds']:.0f} / {r['lm']['stage_seconds']:.0f}"
            for r in rows))
    lines += ["", f"Environment: {env['cpu']}, {env['cpu_count']} cores, "
              f"torch {env['libraries']['torch']}", ""]
    result = {"task": args.task, "settings": vars(args) | {"work": str(args.work),
                                                           "results": str(args.results)},
              "runs": rows, "environment": env}
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"transfer_{args.task}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
