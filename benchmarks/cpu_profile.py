"""The `cpu` profile's int8 path against optimum's default path, and how stable the latency
ratios are when the same benchmark is repeated.

One distilled 2-layer student of the default recipe (``work/seed-N``, made by drug_reviews.py)
goes two ways:

- **optimum's default path**: optimum's exporter (``main_export``), then ``ORTQuantizer`` with
  ``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)``;
- **edgedistill's cpu profile**: ``export_onnx`` (checked against PyTorch), then ``quantize``
  (the transformer fusions first, then dynamic int8 with the host's preset), and
  ``quantize_openvino`` (NNCF post-training int8 of the same fp32 export, calibrated on 128
  training texts as the pipeline picks them), run by OpenVINO in f32 as the profile sets it
  (``openvino-int8``) and, to show what the CPU plugin's own default would do on a CPU with
  AVX-512 BF16, in bf16 (``openvino-int8-bf16``, not a model the profile ships).

Both int8 models are evaluated on the 379 test reviews and benchmarked with the teacher
(PyTorch and ONNX) and the fp32 student in one harness (each model in a fresh process, models
taking turns), and the whole benchmark is repeated ``--repeats`` times: each repeat gives the
p50 ratios student/teacher and edgedistill/optimum, and their spread says how far one run's
ratio can be trusted. The goal checked: the fastest int8 student the profile ships
(onnxruntime's or OpenVINO's, whichever is faster in that repeat) at <= 0.85x optimum's
default int8 p50 in every repeat, at a macro-F1 within 1% of the fp32 student's. The default
recipe's run (``work/seed-N``, as drug_reviews.py makes it) is made first when it is missing.
Writes results/cpu_profile.{json,md}.

    python benchmarks/cpu_profile.py --seed 42 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from edgedistill.artifacts import OPENVINO_SETTINGS, onnx_file, openvino_file
from edgedistill.bench.runner import BenchSettings, benchmark
from edgedistill.data import load_task_data
from edgedistill.evaluation import evaluate
from edgedistill.export import export_onnx
from edgedistill.host import environment
from edgedistill.pipeline import run as run_recipe
from edgedistill.profiles import resolve_target
from edgedistill.quantization import quantize, quantize_openvino
from edgedistill.recipe import load_recipe

HERE = Path(__file__).parent
# (numerator, denominator) of the latency ratios tracked across repeats
RATIOS = (("student-int8", "teacher"), ("student-int8", "teacher-onnx"),
          ("student-onnx", "teacher-onnx"), ("student-int8", "optimum-int8"),
          ("openvino-int8", "optimum-int8"), ("openvino-int8", "student-int8"),
          ("openvino-int8-bf16", "openvino-int8"))
SHIPPED_INT8 = ("student-int8", "openvino-int8")  # what the cpu profile ships
GOAL_RATIO, GOAL_F1_LOSS = 0.85, 0.01


def optimum_default(student: Path, out: Path) -> Path:
    """optimum's own export and its documented dynamic int8 preset for AVX-512 VNNI."""
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    if onnx_file(out / "int8") is None:
        main_export(student, out / "onnx", task="text-classification", library_name="transformers")
        ORTQuantizer.from_pretrained(out / "onnx").quantize(
            save_dir=out / "int8",
            quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False,
                                                                   per_channel=True))
    return out / "int8"


def edgedistill_cpu(student: Path, out: Path, texts: list[str]) -> tuple[Path, Path, dict]:
    record_file = out / "quantize.json"
    if onnx_file(out / "int8") is None:
        export_onnx(student, out / "onnx", texts=texts)
        record_file.write_text(json.dumps(quantize(out / "onnx", out / "int8", profile="cpu")))
    return out / "onnx", out / "int8", json.loads(record_file.read_text())


def edgedistill_openvino(onnx_dir: Path, out: Path, texts: list[str]) -> tuple[Path, Path, dict]:
    """The profile's OpenVINO int8 student (f32), and a copy told to compute in bf16."""
    record_file = out / "quantize.json"
    if openvino_file(out / "int8") is None:
        record_file.write_text(json.dumps(quantize_openvino(onnx_dir, out / "int8", texts)))
    bf16 = out / "int8-bf16"
    if openvino_file(bf16) is None:
        shutil.copytree(out / "int8", bf16)
        settings = json.loads((bf16 / OPENVINO_SETTINGS).read_text())
        (bf16 / OPENVINO_SETTINGS).write_text(json.dumps({**settings,
                                                          "inference_precision": "bf16"}))
    return out / "int8", bf16, json.loads(record_file.read_text())


def goal(result: dict) -> dict:
    """Per repeat: the faster shipped int8 student, its ratio to optimum's default int8 and
    its macro-F1 loss against the fp32 student."""
    fp32 = result["macro_f1"]["student-onnx"]
    rows = []
    for r in result["repeats"]:
        fastest = min(SHIPPED_INT8, key=lambda n: r[n]["p50_ms"])
        loss = (fp32 - result["macro_f1"][fastest]) / fp32
        ratio = r[fastest]["p50_ms"] / r["optimum-int8"]["p50_ms"]
        rows.append({"fastest": fastest, "ratio_to_optimum": ratio, "macro_f1_loss": loss,
                     "met": ratio <= GOAL_RATIO and loss <= GOAL_F1_LOSS})
    return {"repeats": rows, "met": all(r["met"] for r in rows)}


def spread(values: list[float]) -> float:
    """max / min - 1: 0.1 means the largest repeat is 10% above the smallest."""
    return max(values) / min(values) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    run = HERE / "work" / f"seed-{args.seed}"
    work = HERE / "work" / "cpu-profile" / f"seed-{args.seed}"
    recipe = load_recipe(None, [f"seed={args.seed}"])
    if not (run / "bench" / "manifest.json").is_file():
        run_recipe(None, run, [f"seed={args.seed}"])
    data = load_task_data(recipe.data, args.seed)
    test_texts = list(data.test["text"])
    # calibration texts as the pipeline picks them
    calibration = data.calibration_texts(recipe.quantize.calibration_samples, args.seed)
    student = run / "distill" / "model"
    ours_fp32, ours_int8, record = edgedistill_cpu(student, work / "edgedistill",
                                                   test_texts[:16])
    ov_int8, ov_bf16, ov_record = edgedistill_openvino(ours_fp32, work / "openvino", calibration)
    models = {"teacher": run / "teacher" / "model", "teacher-onnx": run / "export" / "teacher",
              "student-onnx": ours_fp32, "student-int8": ours_int8,
              "optimum-int8": optimum_default(student, work / "optimum"),
              "openvino-int8": ov_int8, "openvino-int8-bf16": ov_bf16}
    quality = {name: evaluate(models[name], data.test, data.labels, 32, recipe.data.max_length)
               for name in ("student-onnx", "student-int8", "optimum-int8", "openvino-int8",
                            "openvino-int8-bf16")}
    b = recipe.bench  # the default recipe's benchmark settings
    target = resolve_target("cpu")
    b.fill_shape(target.batch_size, target.sequence_length)
    settings = BenchSettings(b.warmup, b.iterations, b.min_seconds, b.batch_size,
                             b.sequence_length, b.real_length_samples, recipe.data.max_length,
                             rounds=b.rounds)
    repeats = []
    for i in range(args.repeats):
        print(f"repeat {i + 1}/{args.repeats}")
        timed = benchmark(list(models.values()), "cpu", test_texts, settings)
        repeats.append({name: {"p50_ms": t["latency"]["p50_ms"],
                               "real_p50_ms": t["latency_real_lengths"]["p50_ms"],
                               "peak_rss_mb": t["peak_rss_mb"], "size_mb": t["size_mb"],
                               "host_roofline_fraction": t.get("roofline", {})
                               .get("host_efficiency")}
                        for name, t in zip(models, timed)})
    ratios = {}
    for num, den in RATIOS:
        for key in ("p50_ms", "real_p50_ms"):
            values = [r[num][key] / r[den][key] for r in repeats]
            ratios[f"{num} / {den} ({key})"] = {"repeats": values, "spread": spread(values)}
    result = {"seed": args.seed, "environment": environment(), "edgedistill_quantize": record,
              "openvino_quantize": ov_record,
              "inference_precision": {n: t.get("inference_precision")
                                      for n, t in zip(models, timed)},
              "models": {k: str(v) for k, v in models.items()},
              "macro_f1": {k: q["macro_f1"] for k, q in quality.items()},
              "accuracy": {k: q["accuracy"] for k, q in quality.items()},
              "repeats": repeats, "ratios": ratios}
    result["goal"] = goal(result)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "cpu_profile.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, args.results / "cpu_profile.md")


def write_markdown(result: dict, path: Path) -> None:
    env, last = result["environment"], result["repeats"][-1]
    lines = ["# cpu profile: edgedistill's int8 path vs optimum's default, and ratio stability",
             "", f"{env['cpu']}, {env['cpu_count']} cores, onnxruntime "
             f"{env['libraries'].get('onnxruntime')}, optimum {env['libraries'].get('optimum')}, "
             f"OpenVINO {env['libraries'].get('openvino')}, NNCF {env['libraries'].get('nncf')}; "
             f"seed {result['seed']}; batch 1, sequence 128 (and the test texts one by one at "
             f"their own lengths); each model in its own process, models taking turns; the "
             f"whole benchmark repeated {len(result['repeats'])} times.", "",
             f"edgedistill's quantization: {json.dumps(result['edgedistill_quantize'])}", "",
             f"OpenVINO's: {json.dumps(result['openvino_quantize'])}; computed in (read back "
             "from each compiled model): " + ", ".join(
                 f"{n} {p}" for n, p in result["inference_precision"].items() if p), "",
             "| model | macro-F1 | accuracy | p50 ms (each repeat) | p50 ms real lengths "
             "(each repeat) | share of host roofline | size MB |", "|---|---|---|---|---|---|---|"]
    for name in last:
        f1, acc = result["macro_f1"].get(name), result["accuracy"].get(name)
        p50 = ", ".join(f"{r[name]['p50_ms']:.2f}" for r in result["repeats"])
        real = ", ".join(f"{r[name]['real_p50_ms']:.2f}" for r in result["repeats"])
        share = last[name]["host_roofline_fraction"]
        lines.append(f"| {name} | {'-' if f1 is None else f'{f1:.3f}'} | "
                     f"{'-' if acc is None else f'{acc:.3f}'} | {p50} | {real} | "
                     f"{'-' if share is None else f'{100 * share:.0f}%'} | "
                     f"{last[name]['size_mb']:.1f} |")
    lines += ["", "| p50 ratio | each repeat | spread (max/min - 1) |", "|---|---|---|"]
    for name, r in result["ratios"].items():
        lines.append(f"| {name} | {', '.join(f'{v:.3f}' for v in r['repeats'])} | "
                     f"{100 * r['spread']:.1f}% |")
    g = result["goal"]
    lines += ["", f"Goal: the faster shipped int8 student at <= {GOAL_RATIO}x optimum's default "
              f"int8 p50 in every repeat, macro-F1 within {GOAL_F1_LOSS:.0%} of fp32: "
              f"**{'met' if g['met'] else 'NOT met'}**", "",
              "| repeat | faster shipped int8 | p50 / optimum-int8 | macro-F1 loss vs fp32 | met |",
              "|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['fastest']} | {r['ratio_to_optimum']:.3f} | "
              f"{100 * r['macro_f1_loss']:.1f}% | {'yes' if r['met'] else 'no'} |"
              for i, r in enumerate(g["repeats"])]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
