"""int4 weight-only quantization of the SmolLM2 student: GPTQ against round-to-nearest.

The distilled 8-layer student of ``smollm2-distill`` (``work/llm/kd-forward``, made by
llm_distill.py) is exported to ONNX once (``work/int4/fp32``), then quantized with the same
MatMulNBits settings (block size 32, asymmetric, lm_head in 8 bits, the recipe's accuracy level
4) by:

- ``rtn``: round to nearest (onnxruntime's blockwise quantizer);
- ``gptq-N``: GPTQ calibrated on N training texts (shuffled with the recipe's seed, as the
  pipeline picks calibration texts; never test text), through ``quantize_int4``;
- ``ort-gptq-as-shipped-N``: onnxruntime's GPTQ exactly as it ships, without the two fixes
  ``quantize_int4`` applies (see ``edgedistill.quantization.gptq.exact_gptq``).

- ``inc-rtn``, ``inc-gptq-N``, ``inc-awq-N``: the PyTorch backend (Intel Neural Compressor's
  weight-only algorithms through ``quantize_weight_only``, 4 bits, groups of 32, asymmetric, the
  lm_head left float), run on the student's PyTorch weights and evaluated through PyTorch.

Every model's perplexity on the recipe's held-out test blocks (as the pipeline's evaluation
prepares them), next-token agreement with fp32, and the quantization wall-clock. Each int4
model is evaluated twice: as written (accuracy level 4: int8 activations inside MatMulNBits)
and with the accuracy level unset (float compute), which isolates the weights' rounding.
Models go to ``work/int4/`` and are reused. Writes results/int4_gptq.{json,md}.

    python benchmarks/int4_gptq.py --samples 32 128 --inc rtn gptq awq
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from pathlib import Path
from unittest import mock

import numpy as np

from edgedistill.data import lm_blocks, load_task_data
from edgedistill.host import environment
from edgedistill.evaluation import evaluate_lm
from edgedistill.export import export_onnx
from edgedistill.quantization import gptq, int4, quantize_int4
from edgedistill.quantization.weight_only import quantize_weight_only
from edgedistill.recipe import load_recipe
from edgedistill.artifacts import onnx_file, size_on_disk_mb

HERE = Path(__file__).parent
RECIPE = "smollm2-distill"
STUDENT = HERE / "work" / "llm" / "kd-forward" / "distill" / "model"


def export(recipe, data, out: Path) -> Path:
    if onnx_file(out) is None:
        print("exporting the student to ONNX ...", flush=True)
        export_onnx(STUDENT, out, recipe.export.opset, recipe.export.atol,
                    list(data.test["text"])[:16], recipe.data.max_length)
    return out


def quantized(fp32: Path, out: Path, **kwargs) -> tuple[dict, float]:
    """The int4 model in ``out`` (made unless there) and the seconds its quantization took."""
    timing = out / "seconds.json"
    if not timing.is_file():
        shutil.rmtree(out, ignore_errors=True)
        print(f"quantizing {out.name} ...", flush=True)
        start = time.perf_counter()
        quantize_int4(fp32, out, **kwargs)
        timing.parent.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps(time.perf_counter() - start))
    return json.loads((out / "quantize_config.json").read_text()), json.loads(timing.read_text())


def inc_quantized(out: Path, algorithm: str, texts: list[str], max_length: int) -> dict:
    """INC's weight-only model in ``out`` (made unless there) and its record."""
    record_file = out / "benchmark-record.json"
    if not record_file.is_file():
        print(f"quantizing {out.name} ...", flush=True)
        record = quantize_weight_only(STUDENT, out, algorithm, bits=4, group_size=32,
                                      calibration_texts=texts, max_length=max_length,
                                      calibration_samples=max(1, len(texts)))
        record_file.write_text(json.dumps(record))
    return json.loads(record_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 128],
                        help="calibration texts per GPTQ run")
    parser.add_argument("--as-shipped", type=int, default=32,
                        help="calibration texts for onnxruntime's unfixed GPTQ (0: skip)")
    parser.add_argument("--inc", nargs="*", default=["rtn", "gptq", "awq"],
                        choices=["rtn", "gptq", "awq"],
                        help="Intel Neural Compressor's PyTorch weight-only algorithms to add")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "int4")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not (STUDENT / "config.json").is_file():
        raise SystemExit(f"{STUDENT}: no distilled student; run benchmarks/llm_distill.py first")

    recipe = load_recipe(RECIPE)
    q = recipe.quantize
    data = load_task_data(recipe.data, recipe.seed, labelled=False)
    fp32 = export(recipe, data, args.work / "fp32")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fp32)
    blocks = np.asarray(lm_blocks(data.test, tokenizer, recipe.data.max_length)["input_ids"])
    train = data.train.shuffle(seed=recipe.seed)
    settings = dict(block_size=q.int4_block_size, accuracy_level=q.int4_accuracy_level,
                    symmetric=False, lm_head_bits=8, max_length=recipe.data.max_length)

    def texts(n: int) -> list[str]:
        return list(train.select(range(min(n, len(train))))["text"])

    variants = {"rtn": quantized(fp32, args.work / "rtn", algorithm="rtn", **settings)}
    for n in args.samples:
        variants[f"gptq-{n}"] = quantized(fp32, args.work / f"gptq-{n}", algorithm="gptq",
                                          calibration_texts=texts(n), calibration_samples=n,
                                          **settings)
    if args.as_shipped:
        n = args.as_shipped
        with mock.patch.object(gptq, "exact_gptq", contextlib.nullcontext):
            variants[f"ort-gptq-as-shipped-{n}"] = quantized(
                fp32, args.work / f"ort-gptq-as-shipped-{n}", algorithm="gptq",
                calibration_texts=texts(n), calibration_samples=n, **settings)

    batch = recipe.evaluate.batch_size
    reference = evaluate_lm(fp32, blocks, batch)
    rows = {"fp32": {"perplexity": reference["perplexity"], "perplexity_float_compute": None,
                     "next_token_agreement": 1.0, "quantize_seconds": None,
                     "size_mb": size_on_disk_mb(fp32),
                     "calibration_samples": None}}
    print(f"fp32: perplexity {reference['perplexity']:.2f}", flush=True)
    for name, (record, seconds) in variants.items():
        folder = args.work / name
        metrics = evaluate_lm(folder, blocks, batch, reference["predictions"])
        copy = int4.float_compute_copy(folder, args.work / f"{name}-float-compute")
        exact = evaluate_lm(copy, blocks, batch)
        rows[name] = {"perplexity": metrics["perplexity"],
                      "perplexity_float_compute": exact["perplexity"],
                      "next_token_agreement": metrics["next_token_agreement"],
                      "quantize_seconds": seconds, "size_mb": record["size_mb_after"],
                      "calibration_samples": record.get("calibration_samples"),
                      "calibration_tokens": record.get("calibration_tokens"), "record": record}
        print(f"{name}: perplexity {metrics['perplexity']:.2f} (float compute "
              f"{exact['perplexity']:.2f}), {seconds:.0f} s", flush=True)

    n = args.samples[0]
    for algorithm in args.inc:
        name = "inc-rtn" if algorithm == "rtn" else f"inc-{algorithm}-{n}"
        record = inc_quantized(args.work / name, algorithm, [] if algorithm == "rtn" else
                               texts(n), recipe.data.max_length)
        metrics = evaluate_lm(args.work / name, blocks, batch, reference["predictions"])
        rows[name] = {"perplexity": metrics["perplexity"], "perplexity_float_compute": None,
                      "next_token_agreement": metrics["next_token_agreement"],
                      "quantize_seconds": record["seconds"], "size_mb": record["size_mb"],
                      "calibration_samples": record.get("calibration_texts") or None,
                      "calibration_tokens": None, "record": record}
        print(f"{name}: perplexity {metrics['perplexity']:.2f}, {record['seconds']:.0f} s",
              flush=True)

    rtn = rows["rtn"]["perplexity"]
    for r in rows.values():
        r["perplexity_vs_rtn"] = r["perplexity"] / rtn
        r["perplexity_vs_fp32"] = r["perplexity"] / reference["perplexity"]
    result = {"recipe": RECIPE, "student": str(STUDENT.relative_to(HERE)),
              "test_blocks": len(blocks), "test_tokens": int(blocks.size),
              "settings": {k: v for k, v in settings.items()}, "models": rows,
              "environment": environment()}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "int4_gptq.json").write_text(json.dumps(result, indent=2) + "\n")

    env = result["environment"]
    lines = ["# int4 weight-only on the SmolLM2 student: GPTQ against round-to-nearest", "",
             f"Recipe `{RECIPE}`, distilled 8-layer student exported to ONNX; MatMulNBits, "
             f"block size {settings['block_size']}, asymmetric, lm_head in 8 bits, accuracy "
             f"level {settings['accuracy_level']} (int8 activations). Perplexity on "
             f"{blocks.size} held-out test tokens ({len(blocks)} blocks of "
             f"{recipe.data.max_length}); GPTQ calibrated on the first N training texts "
             "(never test text), each text one sample of up to "
             f"{recipe.data.max_length} tokens. Goal: GPTQ perplexity <= RTN's.", "",
             "| model | calibration texts (tokens) | perplexity | / RTN | / fp32 | "
             "perplexity, float compute | next-token agreement with fp32 | quantize s | "
             "size MB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        cal = ("" if r["calibration_samples"] is None else f"{r['calibration_samples']}"
               + (f" ({r['calibration_tokens']})" if r["calibration_tokens"] else ""))
        exact = "" if r["perplexity_float_compute"] is None \
            else f"{r['perplexity_float_compute']:.2f}"
        secs = "" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.0f}"
        lines.append(f"| {name} | {cal} | {r['perplexity']:.2f} | {r['perplexity_vs_rtn']:.3f} | "
                     f"{r['perplexity_vs_fp32']:.3f} | {exact} | "
                     f"{r['next_token_agreement']:.3f} | {secs} | {r['size_mb']:.1f} |")
    lines += ["", "`ort-gptq-as-shipped`: onnxruntime's GPTQ without the fixes `quantize_int4` "
              "applies. Its error propagation reads the zero triangle of the inverse-Hessian "
              "factor, so it rounds to nearest (its weights equal RTN's up to float rounding of "
              "the scales), and it then re-quantizes that result on a new grid when packing.",
              "", "`inc-*`: Intel Neural Compressor's PyTorch weight-only algorithms on the "
              "student's PyTorch weights (4 bits, groups of 32, asymmetric, the lm_head left "
              "float and tied to the embeddings, hence the smaller file), evaluated through "
              "PyTorch; quantize s is INC's own time (calibration included, loading and saving "
              "not). INC has no CPU int4 kernel: its layers unpack to float on the first call, "
              "so these models run at fp32 speed; they save download and disk, not time.",
              "", "Quantize s: wall-clock of `quantize_int4` (load, quantize, save). GPTQ's is "
              "mostly onnxruntime's driver, which runs the whole model once per distinct MatMul "
              "input (33 here) per calibration text, then inverts one Hessian per weight.", "",
              f"Environment: {env['cpu']}, {env['cpu_count']} cores, onnxruntime "
              f"{env['libraries'].get('onnxruntime')}, numpy {env['libraries'].get('numpy')}", ""]
    (args.results / "int4_gptq.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
