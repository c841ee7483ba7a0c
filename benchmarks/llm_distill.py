"""Does distillation beat plain language modelling for the SmolLM2 student? Same data, same steps.

Each variant trains the 8-of-30-layer student of the packaged ``smollm2-distill`` recipe with
the recipe's data, epochs, batch and learning rate, changing only the loss:

- ``lm``: next-token cross-entropy alone (alpha_ce 1, alpha_distill 0; no teacher);
- ``kd-forward``: the recipe as shipped (0.5 LM + 0.5 forward KL to the teacher's cached top-64);
- others given as ``name=key=value,key=value`` recipe overrides on the command line.

Then every student's perplexity on the held-out test blocks, the teacher's too, and each
variant's training wall-clock (the equal-steps comparison is not an equal-time one). Runs go to
``work/llm/<variant>`` and are reused when unchanged. Writes results/llm_distill.{json,md}.

    python benchmarks/llm_distill.py
    python benchmarks/llm_distill.py --extra "kd-jsd=distill.distill_loss=generalized_jsd"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgedistill.host import environment
from edgedistill.evaluation import evaluate_lm
from edgedistill.pipeline import run
from edgedistill.recipe import load_recipe

HERE = Path(__file__).parent
RECIPE = "smollm2-distill"
VARIANTS = {
    "lm": ["distill.alpha_ce=1.0", "distill.alpha_distill=0.0", "distill.cache_teacher=false"],
    "kd-forward": [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[],
                        help="another variant: name=key=value,key=value")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "llm")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    for item in args.extra:
        name, _, sets = item.partition("=")
        variants[name] = sets.split(",")

    rows, teacher_dir, blocks = {}, None, None
    for name, overrides in variants.items():
        out = args.work / name
        run(RECIPE, out, overrides, until="distill")
        manifest = json.loads((out / "distill" / "manifest.json").read_text())
        record = manifest["record"]
        if blocks is None:
            from transformers import AutoTokenizer

            from edgedistill.data import lm_blocks, load_task_data

            teacher_dir = out / "teacher" / "model"
            recipe = load_recipe(RECIPE)
            data = load_task_data(recipe.data, recipe.seed, labelled=False)
            tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
            blocks = np.asarray(lm_blocks(data.test, tokenizer, recipe.data.max_length)["input_ids"])
        metrics = evaluate_lm(out / "distill" / "model", blocks, 8)
        rows[name] = {"overrides": overrides, "perplexity": metrics["perplexity"],
                      "train_seconds": record["train_seconds"],
                      # the whole stage: training, plus building the teacher cache if it was
                      # not there (the kd variants' first run)
                      "stage_seconds": manifest["seconds"],
                      "validation_loss": record["validation"]["loss"],
                      "steps": record["log_history"][-1].get("step")}
        print(f"{name}: perplexity {metrics['perplexity']:.2f} "
              f"({record['train_seconds']:.0f} s training)", flush=True)
    teacher = evaluate_lm(teacher_dir, blocks, 8)["perplexity"]
    base = rows["lm"]
    for r in rows.values():
        r["perplexity_vs_lm"] = r["perplexity"] / base["perplexity"]
        r["train_time_vs_lm"] = r["train_seconds"] / base["train_seconds"]
    result = {"recipe": RECIPE, "test_tokens": int(blocks.size), "teacher_perplexity": teacher,
              "variants": rows, "environment": environment()}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "llm_distill.json").write_text(json.dumps(result, indent=2))
    lines = ["# SmolLM2 student: distillation against plain language modelling", "",
             f"Recipe `{RECIPE}` (8 of 30 layers, same data, epochs, batch and learning rate in "
             f"every variant); perplexity on {blocks.size} held-out test tokens; teacher "
             f"perplexity {teacher:.2f}. Goal (issue 4): distilled <= 0.8 x plain LM.", "",
             "| variant | overrides | perplexity | / plain LM | training s | / plain LM | "
             "stage s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {' '.join(r['overrides']) or '(recipe as shipped)'} | "
              f"{r['perplexity']:.2f} | {r['perplexity_vs_lm']:.3f} | {r['train_seconds']:.0f} | "
              f"{r['train_time_vs_lm']:.2f} | {r['stage_seconds']:.0f} |" for n, r in rows.items()]
    lines += ["", "Training s: the Trainer's own time. Stage s: the whole distill stage, which for a "
              "distilled variant also builds the teacher cache when it is missing (the teacher "
              "over every training block, once per teacher, data and settings)."]
    env = result["environment"]
    lines += ["", f"Environment: {env['cpu']}, {env['cpu_count']} cores, "
              f"torch {env['libraries']['torch']}", ""]
    (args.results / "llm_distill.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
