"""Memory and time of one causal-LM distillation step against a plain language-model step.

The SmolLM2-135M teacher (packaged GGUF) and its 8-of-30-layer student, batch 8 x 128 tokens
of review text. Each mode runs in its own fresh process (so one mode's allocations never
colour another's peak), taking turns over rounds:

- ``plain``: the student alone, next-token loss (the baseline);
- ``kd``: next-token loss + forward KL to the live teacher, chunked over tokens (256 at a time,
  the default);
- ``kd-unchunked``: the same with one chunk holding every token (what chunking saves);
- ``cached``: next-token loss + forward KL to the teacher's stored top-64 (no teacher in memory).

Peak RSS is the kernel's high-water mark of the process (VmHWM), which includes loading the
models; the issue's goal compares KD against the plain step plus the teacher's weights.
Writes results/llm_kd_step.{json,md}.

    python benchmarks/llm_kd_step.py --rounds 2 --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
MODES = ("plain", "kd", "kd-unchunked", "cached")
TEACHER = "HuggingFaceTB/SmolLM2-135M-Instruct"


def high_water_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def one_mode(mode: str, steps: int, batch: int, length: int) -> dict:
    """Runs inside the child process: build the models, time ``steps`` training steps."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, TrainerCallback,
                              default_data_collator)

    from edgedistill import DistillationTrainer, DistillationTrainingArguments, make_student
    from edgedistill.data import lm_blocks, load_task_data
    from edgedistill.distill.teacher_cache import TeacherCacheDataset, decoder_of
    from edgedistill.distill.token_kd import teacher_topk
    from edgedistill.recipe import load_recipe
    from edgedistill.sources import resolve_model

    torch.manual_seed(0)
    path = resolve_model(TEACHER)
    recipe = load_recipe("smollm2-distill")
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_task_data(recipe.data, recipe.seed, labelled=False)
    rows = list(lm_blocks(data.train, tokenizer, length).select(range(batch * steps)))
    teacher = AutoModelForCausalLM.from_pretrained(path).eval()
    student = make_student(teacher, "uniform", 8)
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    if mode == "cached":
        ids = torch.tensor([r["input_ids"] for r in rows])
        with torch.inference_mode():
            parts = [teacher_topk(decoder_of(teacher)(input_ids=chunk).last_hidden_state,
                                  teacher.get_output_embeddings(), 64) for chunk in ids.split(8)]
        rows = TeacherCacheDataset(rows, torch.cat([p[0] for p in parts]),
                                   torch.cat([p[1] for p in parts]))
    if mode in ("plain", "cached"):
        del teacher  # neither step runs the teacher: it must not count in their memory
        teacher = None
    args = DistillationTrainingArguments(
        output_dir="/tmp/llm-kd-step", report_to="none", use_cpu=True, save_strategy="no",
        per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
        distill_loss="forward_kl", temperature=1.0, alpha_ce=1.0 if mode == "plain" else 0.5,
        alpha_distill=0.0 if mode == "plain" else 0.5, disable_tqdm=True,
        kd_chunk_tokens=batch * length if mode == "kd-unchunked" else 256)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=rows,
                                  data_collator=default_data_collator, teacher_model=teacher)
    times = []

    class Timer(TrainerCallback):  # the Trainer's callbacks bracket each optimizer step
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Timer())
    trainer.train()
    return {"mode": mode, "step_s": times, "peak_rss_mb": high_water_mb(),
            "teacher_weights_mb": teacher_bytes / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_mode(args.child, args.steps, args.batch, args.length)))
        return
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps",
                                  str(args.steps), "--batch", str(args.batch), "--length",
                                  str(args.length)], capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {mode}: {runs[mode][-1]['peak_rss_mb']:.0f} MB", flush=True)
    summary = {}
    for mode, rs in runs.items():
        steps = [t for run in rs for t in run["step_s"][1:]]  # the first step warms up
        summary[mode] = {"median_step_s": statistics.median(steps),
                         "peak_rss_mb": max(run["peak_rss_mb"] for run in rs),
                         "round_median_step_s": [statistics.median(run["step_s"][1:]) for run in rs]}
    teacher_mb = runs["kd"][0]["teacher_weights_mb"]
    plain = summary["plain"]
    goals = {
        "kd peak RSS / (plain peak RSS + teacher weights)":
            (summary["kd"]["peak_rss_mb"] / (plain["peak_rss_mb"] + teacher_mb), "<= 1.3"),
        "cached step time / plain step time":
            (summary["cached"]["median_step_s"] / plain["median_step_s"], "<= 1.2"),
        "kd step time / plain step time":
            (summary["kd"]["median_step_s"] / plain["median_step_s"], "(no goal)"),
    }
    from edgedistill.host import environment

    result = {"settings": vars(args) | {"results": str(args.results)}, "modes": summary,
              "teacher_weights_mb": teacher_mb, "ratios": {k: v[0] for k, v in goals.items()},
              "environment": environment()}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "llm_kd_step.json").write_text(json.dumps(result, indent=2))
    lines = ["# Causal-LM distillation step: memory and time", "",
             f"SmolLM2-135M teacher, 8-layer student, batch {args.batch} x {args.length} tokens, "
             f"{args.steps} steps per process (first dropped), {args.rounds} rounds of fresh "
             f"processes taking turns. Teacher weights: {teacher_mb:.0f} MB.", "",
             "| mode | median step s | per-round median s | peak RSS MB |", "|---|---|---|---|"]
    lines += [f"| {m} | {s['median_step_s']:.2f} | "
              f"{', '.join(f'{x:.2f}' for x in s['round_median_step_s'])} | "
              f"{s['peak_rss_mb']:.0f} |" for m, s in summary.items()]
    lines += ["", "| ratio | measured | goal |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {g} |" for k, (v, g) in goals.items()]
    env = result["environment"]
    lines += ["", f"Environment: {env['cpu']}, {env['cpu_count']} cores, torch {env['libraries']['torch']}",
              ""]
    (args.results / "llm_kd_step.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
