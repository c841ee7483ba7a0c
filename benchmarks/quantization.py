"""Static int8 (calibrated, QDQ) against dynamic int8 on the default recipe's distilled students.

For each seed whose default-recipe run exists in ``work/seed-N`` (made by drug_reviews.py):
quantize the exported fp32 student dynamically and statically (minmax, entropy, percentile
calibration on 128 training texts; the fused graph, its attention made QAttention by a dynamic
pass), and statically on the unfused graph (``static-minmax-unfused``, static mode before the
fused graph was used), evaluate every variant on the 379 test reviews against the fp32 ONNX
student, and time them side by side (interleaved rounds, each model in its own process) on the
first seed. Writes results/quantization.{json,md}.

    python benchmarks/quantization.py --seeds 42 43 44
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from edgedistill.bench.runner import BenchSettings, benchmark
from edgedistill.data import load_task_data
from edgedistill.host import environment
from edgedistill.evaluation import evaluate
from edgedistill.quantization import quantize
from edgedistill.recipe import load_recipe
from edgedistill.artifacts import onnx_file

HERE = Path(__file__).parent
VARIANTS = {"dynamic": {"mode": "dynamic"},
            "static-minmax": {"mode": "static", "calibration": "minmax"},
            "static-entropy": {"mode": "static", "calibration": "entropy"},
            "static-percentile": {"mode": "static", "calibration": "percentile"},
            "static-minmax-unfused": {"mode": "static", "calibration": "minmax", "fuse": False}}


def one_seed(seed: int, work: Path) -> dict:
    run = HERE / "work" / f"seed-{seed}"
    fp32 = run / "export" / "student"
    recipe = load_recipe(None, [f"seed={seed}"])
    data = load_task_data(recipe.data, seed)
    texts = list(data.train.shuffle(seed=seed).select(range(128))["text"])
    models = {"fp32": fp32}
    for name, settings in VARIANTS.items():
        out = work / f"seed-{seed}" / name
        if onnx_file(out) is None:
            quantize(fp32, out, calibration_texts=texts, max_length=recipe.data.max_length,
                     **settings)
        models[name] = out
    metrics = {name: evaluate(path, data.test, data.labels, 32, recipe.data.max_length)
               for name, path in models.items()}
    return {"seed": seed, "models": {k: str(v) for k, v in models.items()},
            "macro_f1": {k: m["macro_f1"] for k, m in metrics.items()},
            "accuracy": {k: m["accuracy"] for k, m in metrics.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--work", type=Path, default=HERE / "work" / "quantization")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rows = [one_seed(seed, args.work) for seed in args.seeds]
    first = rows[0]
    recipe = load_recipe()
    data = load_task_data(recipe.data, args.seeds[0])
    timed = benchmark(list(first["models"].values()), "cpu", list(data.test["text"]),
                      BenchSettings(warmup=5, iterations=50, min_seconds=1.0, rounds=3,
                                    real_length_samples=64))
    p50 = {name: t["latency"]["p50_ms"] for name, t in zip(first["models"], timed)}
    real = {name: t["latency_real_lengths"]["p50_ms"] if t.get("latency_real_lengths") else None
            for name, t in zip(first["models"], timed)}
    size = {name: t["size_mb"] for name, t in zip(first["models"], timed)}
    table = []
    for name in ["fp32", *VARIANTS]:
        ratios = [r["macro_f1"][name] / r["macro_f1"]["fp32"] for r in rows]
        table.append({"model": name,
                      "macro_f1": statistics.mean(r["macro_f1"][name] for r in rows),
                      "accuracy": statistics.mean(r["accuracy"][name] for r in rows),
                      "f1_vs_fp32": statistics.mean(ratios), "f1_vs_fp32_min": min(ratios),
                      "p50_ms": p50[name], "p50_vs_dynamic": p50[name] / p50["dynamic"],
                      "real_length_p50_ms": real[name], "size_mb": size[name]})
    result = {"seeds": args.seeds, "environment": environment(), "runs": rows, "table": table}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "quantization.json").write_text(json.dumps(result, indent=2))
    env = result["environment"]
    lines = [f"# Static vs dynamic int8, distilled 2-layer student, seeds {args.seeds}", "",
             f"{env['cpu']}, {env['cpu_count']} cores, onnxruntime "
             f"{env['libraries'].get('onnxruntime')}. Static: 128 training texts; QDQ MatMuls "
             "of the fused graph, its fused attention made QAttention by a dynamic pass "
             "(`-unfused`: QDQ MatMuls of the exported graph). Latency: seed {0}, batch 1, "
             "sequence 128, interleaved rounds, each model "
             "in its own process.".format(args.seeds[0]), "",
             "| model | macro-F1 (mean) | F1 / fp32 (mean, worst seed) | accuracy | p50 ms | "
             "p50 / dynamic | p50 ms at real lengths | size MB |",
             "|---|---|---|---|---|---|---|---|"]
    for t in table:
        real_ms = "" if t["real_length_p50_ms"] is None else f"{t['real_length_p50_ms']:.2f}"
        lines.append(f"| {t['model']} | {t['macro_f1']:.3f} | {t['f1_vs_fp32']:.3f}, "
                     f"{t['f1_vs_fp32_min']:.3f} | {t['accuracy']:.3f} | {t['p50_ms']:.2f} | "
                     f"{t['p50_vs_dynamic']:.2f} | {real_ms} | {t['size_mb']:.1f} |")
    (args.results / "quantization.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
