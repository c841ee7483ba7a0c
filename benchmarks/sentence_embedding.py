"""A distilled sentence embedder against what a user would ship without edgedistill, over seeds.

For each seed the packaged recipe ``mpnet-embeddings`` runs whole (all-mpnet-base-v2 teaches
all-MiniLM-L6-v2 its similarities on tweets' text, ``embedding_similarity``, the student with
its own tokenizer and width, 384 against the teacher's 768; export with the pooling in the
graph; int8; evaluation on the seed's 1,000 test tweets). Beside it, on the same test texts:

- **peer**: sentence-transformers' own route for the teacher, its dynamic-int8 ONNX export
  (``SentenceTransformer(..., backend="onnx")`` then ``export_dynamic_quantized_onnx_model``)
  with the config of this host's instruction set (``avx2``, ``avx512``, ``avx512_vnni``; its
  documentation's example, ``avx512_vnni``, gives int8 weights whose products onnxruntime's
  AVX2 kernels saturate: on an AVX2-only host that model's embeddings are noise);
- **the same small model off the shelf**: all-MiniLM-L6-v2 (22.7M parameters) as it comes,
  what a user would take instead of distilling, through the same sentence-transformers int8
  route;
- **two of the teacher's own blocks** as the student (``embedding_cosine``), the recipe's
  student before December 2026; exported and quantized by the pipeline like the recipe's.

Quality is agreement with the fp32 teacher (Spearman of pairwise similarities, recall@10 of
its neighbours) and k-NN accuracy on the tweets' sentiment labels. Speed is measured in one
process per seed, one sentence a call, the models taking turns in blocks of sentences
(tokenizer included for all: ``encode`` for the sentence-transformers models, the tokenizer
and an onnxruntime session for ours, both on the same threads), so the ratios compare like
with like on a shared machine.

    python benchmarks/sentence_embedding.py --seeds 42 43 44 \
        [--try student-24000 data.max_train_samples=24000]

``--try NAME OVERRIDE...`` also distils the recipe's student with those settings (row
``NAME``), e.g. more text: ``data.max_train_samples=24000`` (in-domain tweets) or
``"transfer.unlabelled=[{source: movie-dialogs, max_samples: 18000}]"`` (other text).

Needs ./setup.sh --workloads and sentence-transformers (pip install --no-deps
sentence-transformers==5.7.0: it installs beside the pinned stack). Writes
benchmarks/results/sentence_embedding.{json,md}, keeping the recorded runs of other seeds
measured on a host like this one; finished runs stay in benchmarks/work/ (and are reused).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from edgedistill.evaluation import embed, embedding_metrics
from edgedistill.host import environment, host_isa
from edgedistill.pipeline import run
from edgedistill.sources import resolve_model

HERE = Path(__file__).parent
WORK = HERE / "work" / "embeddings"
RECIPE = HERE.parent / "recipes" / "mpnet-embeddings.yaml"
TEACHER = "sentence-transformers/all-mpnet-base-v2"
SMALL = "sentence-transformers/all-MiniLM-L6-v2"
# the recipe with the teacher's first and last blocks as its student (same width: its
# embedding can match the teacher's direction, and a fresh block learns at a higher rate)
BLOCKS_STUDENT = ["student.model=null", "distill.distill_loss=embedding_cosine",
                  "distill.learning_rate=1.0e-4"]
THREADS = 2
ISA = host_isa()  # sentence-transformers names its int8 configs as optimum does, as we do
# what its export writes: model_qint8_<isa>.onnx, or model_quint8_avx2.onnx (uint8 weights)
INT8_GLOB = f"onnx/model_q*int8_{ISA}.onnx"


def st_int8(model_id: str):
    """``model_id`` through sentence-transformers' dynamic-int8 ONNX route (exported once into
    a copy of its folder)."""
    from sentence_transformers import (
        SentenceTransformer,
        export_dynamic_quantized_onnx_model,
    )

    folder = WORK / "peer" / model_id.split("/")[-1]
    if not any(folder.glob(INT8_GLOB)):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(resolve_model(model_id), folder)
        fp32 = SentenceTransformer(str(folder), backend="onnx", device="cpu")
        export_dynamic_quantized_onnx_model(fp32, ISA, str(folder))
    int8 = next(folder.glob(INT8_GLOB)).relative_to(folder)
    return SentenceTransformer(str(folder), backend="onnx", device="cpu",
                               model_kwargs={"file_name": str(int8),
                                             "provider": "CPUExecutionProvider"})


class OnnxEmbedder:
    """Our exported student as an app runs it: its tokenizer, then one onnxruntime call."""

    def __init__(self, folder: Path, max_length: int):
        from transformers import AutoTokenizer

        from edgedistill.runtime.classifier import load_predictor

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.predictor = load_predictor(folder, threads=THREADS)
        self.max_length = max_length

    def encode(self, texts: list[str]) -> np.ndarray:
        enc = dict(self.tokenizer(texts, padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="np"))
        return self.predictor.logits(enc)


def timed_turns(models: dict, texts: list[str], rounds: int = 3) -> dict:
    """p50 ms per sentence of each model, one sentence a call. The models take turns in
    blocks: each encodes all ``texts`` in a row, then the next one does, the order rotated
    every round, so a slow spell of a shared machine falls on all of them. Not sentence by
    sentence: onnxruntime's worker threads keep spinning for a while after a call (its
    default, and what an app running one model gets), so a call made between two calls of
    another session competes with that session's threads. On 2 cores, MiniLM-L6 int8 measured
    6.3 ms a sentence when four sessions alternated sentence by sentence, 1.3 ms alone or in
    blocks (this file's results before December 2026 were timed sentence by sentence, which
    understated every small model's speed-up)."""
    for model in models.values():  # warm up every model before any timing
        for text in texts[:10]:
            model.encode([text])
    names = list(models)
    times = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            for text in texts:
                t0 = time.perf_counter()
                models[name].encode([text])
                times[name].append(time.perf_counter() - t0)
    return {name: {"p50_ms": 1000 * statistics.median(t), "samples": len(t)}
            for name, t in times.items()}


def one_seed(seed: int, sentences: int, tries: dict[str, list[str]]) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    out = WORK / f"seed-{seed}"
    report = run(RECIPE, out, overrides=[f"seed={seed}"])
    rows = {m["name"]: m for m in report["models"]}
    # two of the teacher's blocks as the student, then the recipe's student with the --try
    # settings
    variants = {name: (WORK / f"seed-{seed}-{name}", extra)
                for name, extra in {"blocks2": BLOCKS_STUDENT, **tries}.items()}
    other = {}
    for name, (folder, extra) in variants.items():
        ran = run(RECIPE, folder, overrides=[f"seed={seed}", *extra])
        other[name] = {m["name"]: m for m in ran["models"]}
    from edgedistill.recipe import load_recipe
    from edgedistill.tasks import get_task

    recipe = load_recipe(RECIPE, [f"seed={seed}"])
    data = get_task("sentence-embedding").load_data(recipe.data, seed)
    texts, labels = list(data.test["text"]), list(data.test["label"])
    reference = embed(out / "teacher" / "model", texts, 64, recipe.data.max_length)
    peers = {"teacher-st-int8": st_int8(TEACHER), "minilm-st-int8": st_int8(SMALL)}
    quality = {name: embedding_metrics(np.asarray(model.encode(texts, batch_size=64)),
                                       reference, labels)
               for name, model in peers.items()}
    for name in ("teacher", "student", "student-int8"):
        quality[name] = rows[name]["metrics"]
    ours = {"student-int8": OnnxEmbedder(out / "quantize" / "student-int8",
                                         recipe.data.max_length)}
    for name, (folder, _) in variants.items():
        quality[f"{name}-fp32"] = other[name]["student"]["metrics"]
        quality[f"{name}-int8"] = other[name]["student-int8"]["metrics"]
        ours[f"{name}-int8"] = OnnxEmbedder(folder / "quantize" / "student-int8",
                                            recipe.data.max_length)
    speed = timed_turns({**peers, **ours}, texts[:sentences])
    return {"seed": seed, "peer_int8_config": ISA, "tries": tries,
            "quality": quality, "speed": speed,
            "pipeline_bench": {n: {"p50_ms": rows[n]["latency"]["p50_ms"],
                                   "batch32_per_s": rows[n]["index"]["throughput_per_s"],
                                   "size_mb": rows[n].get("size_mb")}
                               for n in ("teacher", "teacher-onnx", "student", "student-int8")},
            "distill_seconds": report.get("stages", {}).get("distill", {}).get("seconds")}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def earlier_runs(seeds: list[int], stem: str) -> list[dict]:
    """The recorded runs of seeds other than ``seeds``, where they were measured on a host like
    this one (same processor and int8 instruction set): one seed's long variant
    (``--try``) and the others' runs can be measured in separate invocations."""
    try:
        recorded = json.loads((HERE / "results" / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return []
    here = environment()
    if any(recorded["environment"].get(k) != here[k] for k in ("cpu", "int8_isa")):
        return []
    return [r for r in recorded["runs"] if r["seed"] not in seeds]


def write_results(runs: list[dict], stem: str) -> None:
    names = list(dict.fromkeys(["teacher", "teacher-st-int8", "minilm-st-int8", "student",
                                "student-int8", *(n for r in runs for n in r["quality"])]))
    lines = ["# Sentence embeddings: MiniLM-L6 distilled from MPNet vs sentence-transformers' "
             "routes", "",
             (f"Recipe `mpnet-embeddings`, seeds {', '.join(str(r['seed']) for r in runs)}; "
              "1,000 test tweets per seed; mean ± sd over seeds. Agreement is with the fp32 "
              "teacher's embeddings (cosine similarity). sentence-transformers' int8 config: "
              f"{runs[0].get('peer_int8_config', '?')} (this host's)."), "",
             ("| model | Spearman vs teacher | recall@10 | k-NN accuracy | p50 ms / sentence "
              "(with tokenizer) | speed-up over teacher-st-int8 |"),
             "|---|---|---|---|---|---|"]
    for name in names:
        q = [r["quality"][name] for r in runs if name in r["quality"]]
        if not q:  # a run from before this model was added
            continue
        speed = [r["speed"][name]["p50_ms"] for r in runs if name in r["speed"]]
        ratio = [r["speed"]["teacher-st-int8"]["p50_ms"] / r["speed"][name]["p50_ms"]
                 for r in runs if name in r["speed"]]
        some = [r["seed"] for r in runs if name in r["quality"]]
        label = name if len(some) == len(runs) else f"{name} (seed {', '.join(map(str, some))})"
        lines.append(f"| {label} | {mean_sd([m['spearman'] for m in q])} | "
                     f"{mean_sd([m['recall_at_k'] for m in q])} | "
                     f"{mean_sd([m['knn_accuracy'] for m in q])} | "
                     f"{mean_sd(speed) if speed else '-'} | "
                     f"{mean_sd(ratio) if ratio else '-'} |")
    for name in (n for n in names if n.endswith("-int8") and "-st-" not in n):
        lines += ["", f"Per seed ({name}): " + "; ".join(
            f"seed {r['seed']}: Spearman {r['quality'][name]['spearman']:.3f}, "
            f"{r['speed']['teacher-st-int8']['p50_ms'] / r['speed'][name]['p50_ms']:.2f}x "
            "faster than teacher-st-int8" for r in runs if name in r["speed"])]
    lines += ["",
              "Pipeline's own benchmark (session only, padded to 48 tokens, one process per "
              "model): " + "; ".join(
                  f"seed {r['seed']}: teacher {r['pipeline_bench']['teacher']['p50_ms']:.1f} ms, "
                  f"student-int8 {r['pipeline_bench']['student-int8']['p50_ms']:.2f} ms, "
                  f"batch 32 {r['pipeline_bench']['student-int8']['batch32_per_s']:.0f} vs "
                  f"{r['pipeline_bench']['teacher']['batch32_per_s']:.0f} sentences/s"
                  for r in runs)]
    results = HERE / "results"
    (results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (results / f"{stem}.json").write_text(json.dumps(
        {"runs": runs, "environment": environment()}, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--sentences", type=int, default=200,
                        help="test sentences each model encodes per timing round")
    parser.add_argument("--try", dest="tries", nargs="+", action="append", default=[],
                        metavar=("NAME", "OVERRIDE"),
                        help="also distil the recipe's student with these settings (e.g. "
                             "student-24000 data.max_train_samples=24000: about 45 minutes a "
                             "seed on 2 cores)")
    parser.add_argument("--name", default="sentence_embedding",
                        help="the results files' name in benchmarks/results/ (another host's "
                             "runs go in files of their own)")
    args = parser.parse_args()
    tries = {}
    for name, *overrides in args.tries:
        if not overrides or "=" in name or name in ("blocks2", "student", "teacher"):
            parser.error(f"--try {name}: give a new variant's name, then its overrides")
        tries[name] = overrides
    runs = earlier_runs(args.seeds, args.name)
    for seed in args.seeds:
        runs = sorted([*runs, one_seed(seed, args.sentences, tries)],
                      key=lambda r: r["seed"])
        write_results(runs, args.name)
        print((HERE / "results" / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
