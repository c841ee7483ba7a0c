"""Soak: thousands of distillation steps on a tiny model; does the process's memory grow?

Trains a tiny random BERT student against a tiny teacher with every kind of loss the trainer
has (labels, logits, hidden states through a projection, attention maps, MiniLM relations,
whose forward hooks are added and removed every step) and samples the resident set size every
100 steps. Writes results/soak.{json,md}.

    python benchmarks/soak.py --steps 3000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # tests.conftest builds the tiny models

from edgedistill import DistillationTrainer, DistillationTrainingArguments, make_student  # noqa: E402
from edgedistill.host import environment  # noqa: E402
from tests.conftest import LABELS, make_bert, make_texts, make_tokenizer  # noqa: E402

MATCHES = [{"loss": "hidden_mse", "strategy": "uniform", "weight": 1.0},
           {"loss": "attention_kl", "strategy": "uniform", "weight": 1.0},
           {"loss": "minilm_relation", "weight": 1.0},
           {"loss": "rkd_distance", "weight": 1.0}]


def rss_mb() -> float:
    """Resident set size now, from /proc (the kernel's own count, no sampling library)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class SampleMemory(TrainerCallback):
    def __init__(self, every: int):
        self.every, self.samples = every, []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.samples.append((state.global_step, round(rss_mb(), 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    teacher = make_bert(num_layers=4, hidden=64)
    student = make_student(teacher, num_layers=2, init="random", hidden_size=32,
                           intermediate_size=64)
    tokenizer = make_tokenizer(work / "tok")
    texts, labels = make_texts(512, seed=1)
    data = Dataset.from_dict({"text": texts, "labels": [LABELS.index(x) for x in labels]})
    data = data.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    sampler = SampleMemory(every=100)
    training = DistillationTrainingArguments(
        output_dir=str(work / "out"), max_steps=args.steps, per_device_train_batch_size=16,
        learning_rate=1e-3, save_strategy="no", logging_steps=500, report_to="none",
        disable_tqdm=True, use_cpu=True, matches=MATCHES)
    trainer = DistillationTrainer(model=student, args=training, teacher_model=teacher,
                                  train_dataset=data, tokenizer=tokenizer, callbacks=[sampler])
    trainer.train()
    samples = sampler.samples
    # The first few hundred steps fill allocator pools; growth is judged after them.
    warm = min(500, args.steps // 4)
    settled_steps = [(step, mb) for step, mb in samples if step >= warm]
    (first_step, first), (last_step, last) = settled_steps[0], settled_steps[-1]
    settled = [mb for _, mb in settled_steps]
    growth = last - first
    result = {"steps": args.steps, "matches": MATCHES, "rss_mb_by_step": samples,
              "rss_mb_after_warmup": settled[0], "rss_mb_at_end": settled[-1],
              "growth_mb_after_warmup": round(growth, 2),
              "growth_mb_per_1000_steps": round(1000 * growth / max(last_step - first_step, 1), 3),
              "rss_mb_median": statistics.median(settled), "environment": environment()}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "soak.json").write_text(json.dumps(result, indent=2))
    (args.results / "soak.md").write_text(
        f"# Soak: {args.steps} distillation steps on a tiny BERT\n\n"
        f"Losses: labels, logits, {', '.join(m['loss'] for m in MATCHES)} (projection 32 -> 64).\n"
        f"{result['environment']['cpu']}, torch {result['environment']['libraries'].get('torch')}."
        f"\n\nRSS after {first_step} steps of warm-up: "
        f"{settled[0]:.1f} MB; at step {args.steps}: {settled[-1]:.1f} MB; growth "
        f"{growth:+.1f} MB ({result['growth_mb_per_1000_steps']:+.2f} MB per 1000 steps).\n\n"
        "| step | RSS MB |\n|---|---|\n" + "".join(f"| {s} | {m} |\n" for s, m in samples))
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
