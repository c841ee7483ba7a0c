"""The SmolLM2 student's two int4 routes side by side, in one pipeline run of the recipe:

- ``student-int4-ort``: edgedistill's optimum export + onnxruntime's MatMulNBits
  quantizer (GPTQ on 32 training texts, asymmetric blocks of 32, the token embedding read out
  of the tied 8-bit output head), run on plain onnxruntime;
- ``student-int4``, the one the recipe ships: onnxruntime-genai's package from the same
  distilled student (Intel Neural Compressor's GPTQ, fused attention, the embedding shared with
  the tied head in 8 bits), built by onnxruntime-genai's model builder and run by its Generator;

beside the fp32 ONNX student, the int8 student and the PyTorch teacher: file size, perplexity
on the recipe's held-out test blocks, greedy tokens against onnxruntime on the same graph,
first token and decode speed (each model in its own process, ``--rounds`` rounds taking
turns), peak RSS. The run goes to ``work/genai/`` and is resumed: a second call with another
``--rounds`` only benchmarks again.

Then what each of the package's choices buys, from the same distilled student: the builder's
round to nearest with the tied embedding and head in 4 bits, each of GPTQ and an 8-bit head
alone, both, both with the 4-bit weights computing in float (the 8-bit head in int8, as
always: ``int4_accuracy_level: 0``), and float compute everywhere (every MatMulNBits'
accuracy level unset), each with its perplexity and its decode speed timed beside the teacher
in one more side-by-side run; the row the recipe builds is marked. The packages are kept in
``work/genai/variants/`` and reused (remove it after changing how packages are built).
Writes results/genai_package.{json,md}.

    python benchmarks/genai_package.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgedistill.artifacts import size_on_disk_mb
from edgedistill.bench.generation import GenerationSettings, benchmark_generation
from edgedistill.data import lm_blocks, load_task_data
from edgedistill.evaluation import evaluate_lm
from edgedistill.host import environment
from edgedistill.pipeline import run
from edgedistill.quantization.genai import build_genai_package
from edgedistill.quantization.int4 import float_compute_copy
from edgedistill.recipe import load_recipe

HERE = Path(__file__).parent
RECIPE = "smollm2-distill"
MODELS = ("teacher", "student", "student-onnx", "student-int8", "student-int4-ort",
          "student-int4")
# the goals: (what, row, per row, key, at most / at least)
GOALS = (("int4 file <= 0.25x the fp32 ONNX file", "size_mb", "student-onnx", "at_most", 0.25),
         ("int4 perplexity <= 1.03x the fp32 student", "perplexity", "student", "at_most", 1.03),
         ("int4 decode tokens/s >= 8x the PyTorch teacher", "decode_tokens_per_s", "teacher",
          "at_least", 8.0))


# the package's choices, one at a time: (name, rounding, head bits, the 4-bit weights' compute
# type); the row the recipe's settings build is marked
VARIANTS = (("rtn, 4-bit head", "rtn", 4, 4), ("rtn, 8-bit head", "rtn", 8, 4),
            ("gptq, 4-bit head", "gptq", 4, 4), ("gptq, 8-bit head", "gptq", 8, 4),
            ("gptq, 8-bit head, 4-bit weights in float", "gptq", 8, 0))
EVERYTHING_IN_FLOAT = ("gptq, 8-bit head", "gptq, 4-bit head")  # copies, accuracy level unset


def figures(m: dict) -> dict:
    return {"size_mb": m["size_mb"], "perplexity": m["metrics"]["perplexity"],
            "next_token_agreement": m["metrics"]["next_token_agreement"],
            "same_tokens_as_onnxruntime": m["metrics"].get("same_tokens_as_onnxruntime"),
            "ttft_p50_ms": m["ttft_ms"]["p50_ms"], "tpot_p50_ms": m["tpot_ms"]["p50_ms"],
            "decode_tokens_per_s": m["decode_tokens_per_s"], "peak_rss_mb": m["peak_rss_mb"],
            "round_tpot_p50_ms": m["round_tpot_p50_ms"], "backend": m["backend"],
            "prompt_tokens": m.get("prompt_tokens"), "new_tokens": m.get("new_tokens"),
            "threads": m.get("threads")}


def markdown(rows: dict, goals: list[dict], result: dict, rounds: int) -> str:
    b, env = result["models"]["student-int4"], result["environment"]
    lines = [
        "# SmolLM2 student: optimum + MatMulNBits int4 vs onnxruntime-genai's package", "",
        f"Recipe `{RECIPE}` with `quantize.genai: true`; one run, {rounds} benchmark rounds "
        f"(each model in a fresh process per round, taking turns); prompt of "
        f"{b['prompt_tokens']} tokens, {b['new_tokens']} greedy tokens, batch 1, "
        f"{b['threads']} threads. Perplexity on {result['test_tokens']} held-out test tokens.",
        "",
        "| model | runtime | file MB | x fp32 ONNX | perplexity | x fp32 student | "
        "first token p50 ms | decode tokens/s | x teacher | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['backend']} | {r['size_mb']:.1f} | "
            f"{r['size_mb'] / rows['student-onnx']['size_mb']:.3f} | {r['perplexity']:.2f} | "
            f"{r['perplexity'] / rows['student']['perplexity']:.3f} | {r['ttft_p50_ms']:.1f} | "
            f"{r['decode_tokens_per_s']:.1f} | "
            f"{r['decode_tokens_per_s'] / rows['teacher']['decode_tokens_per_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} |")
    genai = rows["student-int4"]
    lines += ["", "Per round p50 ms per token: " + "; ".join(
        f"{n} {', '.join(f'{t:.2f}' for t in r['round_tpot_p50_ms'])}" for n, r in rows.items()),
        "", f"onnxruntime-genai's Generator picked the same greedy tokens as onnxruntime on the "
        f"same graph for {genai['same_tokens_as_onnxruntime']:.0%} of the report's prompts.", "",
        "Goals (issue: a language model a phone can hold):", ""]
    for g in goals:
        lines.append(f"- {g['goal']}: " + ", ".join(
            f"{n} {v:.3f} ({'met' if ok else 'missed'})" for n, v, ok in g["values"]))
    lines += ["", f"Host: {env['cpu']}, {env['cpu_count']} cores, {env['int8_isa']}; "
              f"onnxruntime {env['libraries'].get('onnxruntime')}, onnxruntime-genai "
              f"{env['libraries'].get('onnxruntime-genai')}."]
    return "\n".join(lines) + "\n"


def variants(work: Path, bench: dict, teacher: Path) -> dict:
    """Perplexity, size and decode speed of the package built each way (see VARIANTS) and of
    copies computing everything in float."""
    recipe = load_recipe(RECIPE, ["quantize.genai=true"])
    q, length = recipe.quantize, recipe.data.max_length
    data = load_task_data(recipe.data, recipe.seed, labelled=False)
    student = work / "distill" / "model"
    from transformers import AutoTokenizer

    blocks = np.asarray(lm_blocks(data.test, AutoTokenizer.from_pretrained(student),
                                  length)["input_ids"])
    texts = data.calibration_texts(q.calibration_samples, recipe.seed)  # as the pipeline's
    folders, shipped = {}, None
    for name, algorithm, head_bits, level in VARIANTS:
        folder = work / "variants" / name.replace(", ", "-").replace(" ", "-")
        if not folder.is_dir():
            build_genai_package(student, folder, q.int4_block_size, level,
                                algorithm=algorithm, head_bits=head_bits,
                                calibration_texts=texts,
                                calibration_samples=q.calibration_samples, max_length=length)
        folders[name] = folder
        if (algorithm, head_bits, level) == (q.int4_algorithm, 8, q.int4_accuracy_level or 0):
            shipped = name
    for name in EVERYTHING_IN_FLOAT:
        folders[f"{name}, everything in float"] = float_compute_copy(
            folders[name], work / "variants" / f"{folders[name].name}-float-compute")
    rows = {}
    for name, folder in folders.items():
        metrics = evaluate_lm(folder, blocks, recipe.evaluate.batch_size, desc=name)
        rows[name] = {"perplexity": metrics["perplexity"],
                      "size_mb": round(size_on_disk_mb(folder), 3), "folder": str(folder)}
    # decode speed side by side with the teacher, on the pipeline's benchmark prompt
    b = bench  # the run's, its shape filled in from the profile
    prompt = [t for row in blocks for t in row][:b["sequence_length"]]
    settings = GenerationSettings(prompt_tokens=b["sequence_length"], new_tokens=b["new_tokens"],
                                  warmup=b["warmup"], iterations=b["iterations"],
                                  rounds=b["rounds"])
    timed = benchmark_generation([teacher, *folders.values()], b["profile"], prompt, settings)
    teacher_speed = timed[0]["decode_tokens_per_s"]
    for (name, row), t in zip(rows.items(), timed[1:]):
        row.update(decode_tokens_per_s=t["decode_tokens_per_s"],
                   x_teacher=t["decode_tokens_per_s"] / teacher_speed,
                   ttft_p50_ms=t["ttft_ms"]["p50_ms"], peak_rss_mb=t["peak_rss_mb"])
    return {"teacher_decode_tokens_per_s": teacher_speed, "test_tokens": int(blocks.size),
            "rows": rows, "shipped": shipped}


def variants_markdown(v: dict, fp32_perplexity: float, fp32_size: float) -> list[str]:
    lines = ["", "## What each of the package's choices buys", "",
             f"The same distilled student built each way; perplexity on the same {v['test_tokens']} "
             "test tokens; decode timed in one more side-by-side run with the PyTorch teacher "
             f"({v['teacher_decode_tokens_per_s']:.1f} tokens/s there).", "",
             "| package | perplexity | x fp32 student | file MB | x fp32 ONNX | decode tokens/s "
             "| x teacher | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for name, r in v["rows"].items():
        name = f"**{name}** (the recipe's)" if name == v["shipped"] else name
        lines.append(f"| {name} | {r['perplexity']:.2f} | {r['perplexity'] / fp32_perplexity:.3f} "
                     f"| {r['size_mb']:.1f} | {r['size_mb'] / fp32_size:.3f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['x_teacher']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=HERE / "work" / "genai")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    report = run(RECIPE, args.work, ["quantize.genai=true", f"bench.rounds={args.rounds}"])
    by_name = {m["name"]: m for m in report["models"]}
    rows = {name: figures(by_name[name]) for name in MODELS}
    goals = []
    for goal, key, per, direction, bound in GOALS:
        values = []
        for name in ("student-int4-ort", "student-int4"):
            ratio = rows[name][key] / rows[per][key]
            values.append((name, ratio, ratio <= bound if direction == "at_most"
                           else ratio >= bound))
        goals.append({"goal": goal, "values": values})
    by_path = {m["name"]: m["path"] for m in report["models"]}
    built = variants(args.work, report["recipe"]["bench"], Path(by_path["teacher"]))
    args.results.mkdir(parents=True, exist_ok=True)
    result = {"recipe": RECIPE, "rounds": args.rounds, "models": rows, "goals": goals,
              "variants": built,
              "quantization": {k: report["quantization"].get(k) for k in ("int4", "genai")},
              "test_tokens": report["test_tokens"], "bench": report["recipe"]["bench"],
              "environment": environment()}
    (args.results / "genai_package.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(rows, goals, result, args.rounds) + "\n".join(variants_markdown(
        built, rows["student"]["perplexity"], rows["student-onnx"]["size_mb"])) + "\n"
    (args.results / "genai_package.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
