"""A narrower embedding student's two ways to its teacher, over seeds: its own width against a
projection onto the teacher's.

The packaged recipe ``mpnet-embeddings`` (all-mpnet-base-v2, 768 wide, teaches
all-MiniLM-L6-v2, 384 wide, on 6,000 tweets) runs twice per seed:

- **similarity**: the recipe as it is, ``embedding_similarity``: the student learns the
  teacher's cosine similarities between texts in its own 384 dimensions;
- **projection**: ``embedding_cosine``: the trainer adds a linear Dense layer onto the teacher's
  768 dimensions (started at the least-squares map from the student's untrained embeddings of
  the training texts to the teacher's), trained with the student and exported in the graph.

Quality comes from each run's own report (1,000 test tweets, agreement with the fp32 teacher):
Spearman of pairwise similarities, recall@10 of the teacher's neighbours in the model's own
index, and, for the projection only, recall@10 when the student's embedding of a text searches
the teacher's index of the others (a phone encoding queries against an index a server built
with the teacher). Speed: both int8 students timed side by side by ``edgedistill bench``
(models taking turns, one process each), since the projection adds a 384 x 768 product.

    python benchmarks/embedding_projection.py --seeds 42 43 44

About 16 minutes a run on 2 cores (12 when the teacher's embeddings of that seed's texts are
kept from an earlier run). Needs ./setup.sh --workloads. Writes
benchmarks/results/embedding_projection.{json,md}; finished runs stay in
benchmarks/work/embedding-projection/ and are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from edgedistill.host import environment
from edgedistill.pipeline import run

HERE = Path(__file__).parent
WORK = HERE / "work" / "embedding-projection"
RECIPE = "mpnet-embeddings"
VARIANTS = {"similarity": [], "projection": ["distill.distill_loss=embedding_cosine"]}
METRICS = ("spearman", "recall_at_k", "index_recall_at_k", "cosine", "knn_accuracy")


def one_seed(seed: int, rounds: int) -> dict:
    rows = {}
    for name, overrides in VARIANTS.items():
        report = run(RECIPE, WORK / f"{name}-{seed}", overrides=[f"seed={seed}", *overrides])
        models = {m["name"]: m for m in report["models"]}
        rows[name] = {model: {k: models[model]["metrics"].get(k) for k in METRICS}
                      for model in ("student", "student-int8")}
        rows[name]["distill_seconds"] = report.get("stages", {}).get("distill", {}).get("seconds")
    timing = WORK / f"bench-{seed}.json"
    subprocess.run([sys.executable, "-m", "edgedistill", "bench", "--quiet", "--profile", "cpu",
                    "--rounds", str(rounds), "--sequence-length", "48", "--json", str(timing),
                    *(str(WORK / f"{name}-{seed}" / "quantize" / "student-int8")
                      for name in VARIANTS)], check=True)
    p50 = [m["latency"]["p50_ms"] for m in json.loads(timing.read_text())]
    return {"seed": seed, "quality": rows, "p50_ms": dict(zip(VARIANTS, p50))}


def mean_sd(values: list) -> str:
    if any(v is None for v in values):
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def write_results(runs: list[dict]) -> None:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = ["# A narrower embedding student: its own width or a projection onto the teacher's",
             "", f"Recipe `{RECIPE}` (all-mpnet-base-v2 teaches all-MiniLM-L6-v2), seeds "
             f"{seeds}; 1,000 test tweets per seed; mean ± sd over seeds; agreement with the "
             "fp32 teacher.", "",
             "| variant | model | Spearman vs teacher | recall@10 (own index) | recall@10 on the "
             "teacher's index | cosine to the teacher | k-NN accuracy |",
             "|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        for model in ("student", "student-int8"):
            q = [r["quality"][name][model] for r in runs]
            lines.append(f"| {name} | {model} | " + " | ".join(
                mean_sd([m[k] for m in q]) for k in METRICS) + " |")
    lines += ["", "Per seed, int8: " + "; ".join(
        f"seed {r['seed']}: Spearman " + " vs ".join(
            f"{r['quality'][n]['student-int8']['spearman']:.3f} ({n})" for n in VARIANTS)
        for r in runs)]
    ratios = [r["p50_ms"]["projection"] / r["p50_ms"]["similarity"] for r in runs]
    lines += ["", "Speed, int8, side by side (`edgedistill bench`, profile cpu, 48 tokens): "
              "projection / similarity p50 " + ", ".join(f"{x:.3f}" for x in ratios)
              + " (" + "; ".join(f"seed {r['seed']}: " + ", ".join(
                  f"{n} {r['p50_ms'][n]:.2f} ms" for n in VARIANTS) for r in runs) + ")."]
    results = HERE / "results"
    (results / "embedding_projection.md").write_text("\n".join(lines) + "\n")
    (results / "embedding_projection.json").write_text(json.dumps(
        {"runs": runs, "environment": environment()}, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--rounds", type=int, default=6, help="timing turns per model")
    args = parser.parse_args()
    write_results([one_seed(seed, args.rounds) for seed in args.seeds])


if __name__ == "__main__":
    main()
