"""Does quantization-aware distillation keep the int8 student's accuracy? Default recipe, seeds.

Per seed, the default recipe twice from the same teacher checkpoint: as shipped, and with
``distill.qat_epochs`` more epochs of distillation through onnxruntime's int8 rounding (fake
quantization). Each run's fp32 and int8 students are scored on the test split (379 reviews);
the quantize stage's check of the simulation against the real int8 model is kept. The
benchmark stage is cut short (one round, no real-length pass): only accuracy is compared here.
Goal (issue 6): with QAT, int8 macro-F1 >= the fp32 student's minus 0.5 points.

    python benchmarks/qat.py --seeds 42 43 44 [--teacher-from 'work/transfer/classifier/seed-{seed}/kd+transfer']
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from edgedistill.host import environment
from edgedistill.pipeline import run

HERE = Path(__file__).parent
QUICK_BENCH = ["bench.rounds=1", "bench.iterations=10", "bench.min_seconds=0.2",
               "bench.real_length_samples=0"]


def one_seed(seed: int, work: Path, epochs: float, teacher_from: str | None) -> dict:
    row = {"seed": seed}
    for name, extra in (("shipped", []), ("qat", [f"distill.qat_epochs={epochs}"])):
        out = work / f"seed-{seed}" / name
        source = Path(teacher_from.format(seed=seed)) if teacher_from else None
        if source is None and name == "qat":
            source = work / f"seed-{seed}" / "shipped"
        if source is not None and not (out / "teacher").exists():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source / "teacher", out / "teacher")
        report = run(None, out, [f"seed={seed}", *QUICK_BENCH, *extra])
        models = {m["name"]: m["metrics"] for m in report["models"]}
        row[name] = {"fp32_f1": models["student"]["macro_f1"],
                     "int8_f1": models["student-int8"]["macro_f1"],
                     "fp32_accuracy": models["student"]["accuracy"],
                     "int8_accuracy": models["student-int8"]["accuracy"],
                     "qat_check": report["quantization"].get("qat_check"),
                     # the phase's own record: validation as int8 before and after, and
                     # whether its model replaced the float phase's
                     "qat_phase": {k: v for k, v in report["training"]["distill"].get(
                         "qat", {}).items() if k in ("before", "validation", "kept")}}
        print(f"seed {seed} {name}: fp32 {row[name]['fp32_f1']:.3f}, "
              f"int8 {row[name]['int8_f1']:.3f}", flush=True)
    return row


def _stats(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.2f} ± {spread:.2f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--epochs", type=float, default=2.0, help="distill.qat_epochs")
    parser.add_argument("--teacher-from", default=None,
                        help="a run folder per seed ('{seed}' in it) whose teacher stage to reuse")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "qat")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rows = [one_seed(s, args.work, args.epochs, args.teacher_from) for s in args.seeds]
    points = lambda a, b: [100 * (a(r) - b(r)) for r in rows]  # noqa: E731
    lines = [f"# Quantization-aware distillation ({args.epochs:g} epochs), seeds {args.seeds}", "",
             "Default recipe; macro-F1 on the test split (379 reviews); differences in points "
             "(mean ± stdev over seeds).", "",
             "| seed | shipped fp32 | shipped int8 | qat fp32 | qat int8 | qat check: max logit "
             "diff fake-quant / float vs int8 | phase: validation as int8 before → after "
             "(model kept?) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c, phase = r["qat"]["qat_check"] or {}, r["qat"]["qat_phase"]
        lines.append(f"| {r['seed']} | {r['shipped']['fp32_f1']:.3f} | "
                     f"{r['shipped']['int8_f1']:.3f} | {r['qat']['fp32_f1']:.3f} | "
                     f"{r['qat']['int8_f1']:.3f} | {c.get('fake_quant_max_abs_diff', 0):.2g} / "
                     f"{c.get('fp32_max_abs_diff', 0):.2g} | "
                     f"{phase['before']['macro_f1']:.3f} → {phase['validation']['macro_f1']:.3f} "
                     f"({'yes' if phase['kept'] else 'no'}) |")
    lines += ["",
              "- shipped: int8 - fp32, points: " + _stats(points(
                  lambda r: r["shipped"]["int8_f1"], lambda r: r["shipped"]["fp32_f1"])),
              "- qat: int8 - its own fp32, points: " + _stats(points(
                  lambda r: r["qat"]["int8_f1"], lambda r: r["qat"]["fp32_f1"])),
              "- qat int8 - shipped fp32 (the goal: >= -0.5), points: " + _stats(points(
                  lambda r: r["qat"]["int8_f1"], lambda r: r["shipped"]["fp32_f1"])),
              "- qat int8 - shipped int8, points: " + _stats(points(
                  lambda r: r["qat"]["int8_f1"], lambda r: r["shipped"]["int8_f1"]))]
    env = environment()
    lines += ["", f"Environment: {env['cpu']}, {env['cpu_count']} cores, "
              f"torch {env['libraries']['torch']}, onnxruntime {env['libraries'].get('onnxruntime')}",
              ""]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "qat.json").write_text(json.dumps(
        {"settings": {"seeds": args.seeds, "epochs": args.epochs}, "runs": rows,
         "environment": env}, indent=2))
    (args.results / "qat.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
