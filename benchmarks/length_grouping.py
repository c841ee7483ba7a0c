"""What batching rows of like length (``group_by_length``) saves in a training step, on tweets.

The tweets-mpnet recipe's labelled rows (seed 42), tokenized as its teacher and student read
them. For each model: the batches the Trainer feeds over an epoch with shuffled batches and
with transformers' length-grouped sampler; tokens per step (padding included; exact, from the
batches), and the mean seconds of a training step on evenly spaced batches of each epoch, the
two samplers taking turns (A B B A ...) so that a slower spell of this shared machine falls on
both. Labels only (no teacher): the step's cost is the model's forward and backward, which the
teacher's cached logits do not change.

    python benchmarks/length_grouping.py [--steps 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from edgedistill import DistillationTrainer, DistillationTrainingArguments
from edgedistill.host import environment
from edgedistill.recipe import load_recipe
from edgedistill.sources import resolve_model
from edgedistill.tasks import get_task

HERE = Path(__file__).parent
RECIPE = "tweets-mpnet"


def tokenized(model_path: Path, train, max_length: int):
    """The rows as this model reads them, and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ds = train.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
                   batched=True, remove_columns=["text"]).rename_column("label", "labels")
    return ds, tokenizer


def epoch_batches(model_path: Path, ds, tokenizer, labels: int, grouped: bool, batch: int,
                  out: Path):
    """A fresh model and the batches the Trainer feeds it over one epoch with this sampler."""
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=labels)
    args = DistillationTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, group_by_length=grouped,
        alpha_ce=1.0, alpha_distill=0.0, report_to="none", seed=42, data_seed=42,
        dataloader_pin_memory=False)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=ds,
                                  data_collator=DataCollatorWithPadding(tokenizer))
    return trainer, list(trainer.get_train_dataloader())


def timed_steps(trainer, batches: list) -> list[float]:
    """Seconds of a training step (forward, backward, optimizer) on each batch. The steps are
    timed here rather than by running the Trainer for a few steps: the grouped sampler feeds
    the longest batches first, so an epoch's first steps are not a fair sample of it."""
    model = trainer.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    seconds = []
    for batch in batches:
        start = time.perf_counter()
        trainer.compute_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    train = get_task(recipe.task).load_data(recipe.data, 42).train
    rows = {}
    for name in (recipe.student.model, recipe.teacher.model):
        path = resolve_model(name)
        ds, tokenizer = tokenized(path, train, recipe.data.max_length)
        loaded = {g: epoch_batches(path, ds, tokenizer, len(recipe.data.labels), g,
                                   recipe.distill.batch_size, HERE / "work" / "length_grouping")
                  for g in (False, True)}
        tokens = {g: statistics.mean(b["input_ids"].numel() for b in batches)
                  for g, (_, batches) in loaded.items()}
        # evenly spaced batches of each epoch, one warm-up step each, the samplers taking turns
        picked = {g: batches[::max(1, len(batches) // args.steps)][:args.steps]
                  for g, (_, batches) in loaded.items()}
        runs = {False: [], True: []}
        for grouped in (False, True):
            timed_steps(loaded[grouped][0], picked[grouped][:1])
        for i in range(args.rounds):
            for grouped in ((False, True) if i % 2 == 0 else (True, False)):
                runs[grouped] += timed_steps(loaded[grouped][0], picked[grouped])
        s = {g: statistics.mean(v) for g, v in runs.items()}
        rows[name] = {"tokens_per_step": {"shuffled": tokens[False], "grouped": tokens[True]},
                      "seconds_per_step": {"shuffled": s[False], "grouped": s[True]},
                      "steps_timed": len(runs[False]),
                      "token_ratio": tokens[True] / tokens[False], "time_ratio": s[True] / s[False]}
        print(name, json.dumps(rows[name]), flush=True)
    result = {"benchmark": "length_grouping", "recipe": RECIPE,
              "batch_size": recipe.distill.batch_size, "max_length": recipe.data.max_length,
              "environment": environment(), "models": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "length_grouping.json").write_text(json.dumps(result, indent=2))
    lines = ["# Length-grouped batches on the tweets (group_by_length)", "",
             f"{result['environment']['cpu']}, {result['environment']['cpu_count']} cores; "
             f"tweets-mpnet's labelled rows (seed 42), batch {result['batch_size']}, at most "
             f"{result['max_length']} tokens; mean seconds of a step over evenly spaced "
             "batches of an epoch, the two samplers taking turns.", "",
             "| model | tokens per step, shuffled | grouped | ratio | s per step, shuffled | "
             "grouped | ratio |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        t, s = r["tokens_per_step"], r["seconds_per_step"]
        lines.append(f"| {name} | {t['shuffled']:.0f} | {t['grouped']:.0f} | "
                     f"{r['token_ratio']:.2f} | {s['shuffled']:.2f} | {s['grouped']:.2f} | "
                     f"{r['time_ratio']:.2f} |")
    (args.results / "length_grouping.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
