"""What the packaged teacher -> student pairs gain on an NVIDIA GPU (the `gpu-cuda` profile's
target), measured side by side in one process.

The CPU benchmarks time the PyTorch teacher against the int8 ONNX student on this host's cores.
On a GPU the question is different: at batch 1 a small transformer is bound by kernel launches,
not arithmetic, so a student with 6x fewer FLOPs need not be 6x faster. This script times, for
each pair, the PyTorch teacher and student on the GPU:

- encoder classifiers (3 labels): all-mpnet-base-v2 -> all-MiniLM-L6-v2 (tweets-mpnet) and
  all-MiniLM-L6-v2 -> its 2-block student (the default recipe), at batch x tokens 1 x 48,
  1 x 128, 32 x 48, 32 x 128 and 256 x 128, fp32 and fp16, eager and replayed as a CUDA graph
  (launch overhead removed);
- the causal LM pair: SmolLM2-135M (30 blocks) -> its 8-block student, greedy generation of 64
  tokens after a 32-token prompt, batch 1, fp32 and fp16, with the KV cache;
- onnxruntime: whether this onnxruntime build has the CUDA execution provider the `gpu-cuda`
  profile needs; where it has, the exported student fp32 and dynamic int8 on it.

Latency does not depend on the weights' values, so the models are built from the packaged
models' configs with random weights: the script needs torch and transformers only, and runs on
a GPU machine without the offline model packages. Timing: wall clock up to the GPU's last
kernel (launches included), warm-up first, the median of the timed repeats; teacher and student
alternate in rounds so both see the same clocks. Memory: each model's weights, and what one
call allocates on top of what is resident (torch's max_memory_allocated).

    python benchmarks/gpu_profile.py --save-configs configs/   # here: the pairs' configs
    python benchmarks/gpu_profile.py --configs configs/        # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
# config folder name -> the packaged model whose config it holds
CONFIGS = {"mpnet": "sentence-transformers/all-mpnet-base-v2",
           "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
           "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# (pair, teacher config, student config, student depth: None keeps the config's)
ENCODER_PAIRS = (("tweets-mpnet", "mpnet", "minilm-l6", None),
                 ("drug-reviews-minilm", "minilm-l6", "minilm-l6", 2))
LM_PAIR = ("smollm2-distill", "smollm2", "smollm2", 8)
SHAPES = ((1, 48), (1, 128), (32, 48), (32, 128), (256, 128))
DTYPES = ("float32", "float16")
NEW_TOKENS = 64  # generated per call by the LM pair, after a 32-token prompt
DEVICE = "cuda"  # --device cpu: a smoke run of the script itself, no numbers to keep


def save_configs(out: Path) -> None:
    """Copy each packaged model's config.json (resolved offline, as a run resolves it)."""
    import shutil

    from edgedistill.sources import resolve_model
    for name, ref in CONFIGS.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(resolve_model(ref) / "config.json", out / name / "config.json")
    print(f"configs written to {out}")


def build(configs: Path, name: str, layers: int | None, causal: bool, dtype):
    """A model of the config ``name`` (``layers`` blocks kept) with random weights, on the
    device in ``dtype``, and its parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(configs / name)
    if layers is not None:
        config.num_hidden_layers = layers
    if causal:
        model = AutoModelForCausalLM.from_config(config)
    else:
        config.num_labels = 3
        model = AutoModelForSequenceClassification.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    return model.to(DEVICE, dtype).eval(), params


def timed(fn, repeats: int, warmup: int) -> list[float]:
    """Milliseconds per call, wall clock up to the GPU's last kernel: what a caller waits,
    launches included."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return times


def alternating(calls: dict, rounds: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median ms per call of each of ``calls`` (name -> function), timed in turns: every
    round times each once more, so all see the same clocks."""
    times = {who: [] for who in calls}
    for _ in range(rounds):
        for who, fn in calls.items():
            times[who] += timed(fn, repeats, warmup)
    return {who: statistics.median(t) for who, t in times.items()}


def sync() -> None:
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def graphed(model, ids):
    """The forward pass captured once as a CUDA graph; replaying it launches one graph."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            model(input_ids=ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(input_ids=ids)
    return graph.replay


def free() -> None:
    import torch
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def memory_mb(model, fn) -> dict:
    """The model's weights and the memory one call takes on top of what is resident (its
    activations, the KV cache), in MB; both models of a pair stay loaded, so torch's raw peak
    would count the other one too."""
    import torch
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if DEVICE != "cuda":
        return {"weights_mb": weights}
    sync()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return {"weights_mb": weights,
            "working_mb": (torch.cuda.max_memory_allocated() - resident) / 2**20}


def encoder_rows(configs: Path, repeats: int, rounds: int) -> list[dict]:
    import torch
    rows = []
    for pair, t_name, s_name, s_layers in ENCODER_PAIRS:
        for dtype in (getattr(torch, d) for d in DTYPES):
            teacher, t_params = build(configs, t_name, None, False, dtype)
            student, s_params = build(configs, s_name, s_layers, False, dtype)
            vocab = min(teacher.config.vocab_size, student.config.vocab_size)
            for batch, seq in SHAPES:
                ids = torch.randint(5, vocab, (batch, seq), device=DEVICE)
                row = {"pair": pair, "dtype": str(dtype).split(".")[-1], "batch": batch,
                       "tokens": seq, "teacher_params": t_params, "student_params": s_params}
                for mode in ("eager", "cuda_graph") if DEVICE == "cuda" else ("eager",):
                    calls = {}
                    for who, model in (("teacher", teacher), ("student", student)):
                        try:
                            calls[who] = (graphed(model, ids) if mode == "cuda_graph"
                                          else _eager(model, ids))
                        except Exception as e:  # noqa: BLE001 - recorded, the rest goes on
                            row[f"{mode}_error"] = f"{who}: {type(e).__name__}: {e}"[:300]
                    if len(calls) < 2:
                        continue
                    for who, ms in alternating(calls, rounds, repeats, warmup=5).items():
                        row[f"{who}_{mode}_ms"] = ms
                    row[f"speedup_{mode}"] = (row[f"teacher_{mode}_ms"]
                                              / row[f"student_{mode}_ms"])
                for who, model in (("teacher", teacher), ("student", student)):
                    row.update({f"{who}_{k}": v for k, v in
                                memory_mb(model, _eager(model, ids)).items()})
                rows.append(row)
                print(json.dumps(row), flush=True)
            del teacher, student
            free()
    return rows


def _eager(model, ids):
    import torch

    def call():
        with torch.no_grad():
            model(input_ids=ids)
    return call


def lm_rows(configs: Path, new_tokens: int, repeats: int) -> list[dict]:
    import torch
    pair, t_name, s_name, s_layers = LM_PAIR
    rows = []
    for dtype in (getattr(torch, d) for d in DTYPES):
        teacher, t_params = build(configs, t_name, None, True, dtype)
        student, s_params = build(configs, s_name, s_layers, True, dtype)
        prompt = torch.randint(5, teacher.config.vocab_size, (1, 32), device=DEVICE)
        row = {"pair": pair, "dtype": str(dtype).split(".")[-1], "batch": 1, "prompt": 32,
               "new_tokens": new_tokens, "teacher_params": t_params, "student_params": s_params}
        calls = {}
        for who, model in (("teacher", teacher), ("student", student)):
            def call(model=model):
                with torch.no_grad():
                    out = model.generate(prompt, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False,
                                         pad_token_id=0)
                assert out.shape[1] == 32 + new_tokens, out.shape
            calls[who] = call
        for who, ms in alternating(calls, 3, repeats, warmup=2).items():
            row[f"{who}_ms"] = ms
            row[f"{who}_ms_per_token"] = ms / new_tokens
        for who, model in (("teacher", teacher), ("student", student)):
            row.update({f"{who}_{k}": v for k, v in memory_mb(model, calls[who]).items()})
        row["speedup"] = row["teacher_ms"] / row["student_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del teacher, student
        free()
    return rows


def onnxruntime_rows(configs: Path, repeats: int) -> dict:
    """The gpu-cuda profile runs ONNX models through onnxruntime's CUDA execution provider:
    say whether this build has it, and where it has, time the student fp32 and int8 on it."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"error": f"onnxruntime not importable: {e}"}
    result = {"version": ort.__version__, "providers": ort.get_available_providers()}
    if "CUDAExecutionProvider" not in result["providers"]:
        result["cuda"] = False
        return result
    result["cuda"] = True
    import numpy as np
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    student, _ = build(configs, "minilm-l6", 2, False, torch.float32)
    folder = Path(tempfile.mkdtemp())
    ids = torch.randint(5, 30000, (1, 128), device=DEVICE)
    try:
        torch.onnx.export(student, (ids,), folder / "fp32.onnx", input_names=["input_ids"],
                          output_names=["logits"], dynamo=False, opset_version=17,
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}})
        quantize_dynamic(folder / "fp32.onnx", folder / "int8.onnx", weight_type=QuantType.QInt8)
    except Exception as e:  # noqa: BLE001 - recorded
        result["export_error"] = f"{type(e).__name__}: {e}"[:300]
        return result
    for name in ("fp32", "int8"):
        session = ort.InferenceSession(str(folder / f"{name}.onnx"),
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        feed = {"input_ids": ids.cpu().numpy().astype(np.int64)}
        result[f"student_{name}_ms"] = statistics.median(
            timed(lambda: session.run(None, feed), repeats, warmup=10))
    return result


def environment() -> dict:
    import torch
    import transformers
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout
    except OSError:
        smi = "no nvidia-smi"
    return {"gpu": smi.strip(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def rows(result: dict, part: str) -> list[dict]:
    """A part's rows; a part that failed as a whole has none (its error is in the JSON)."""
    found = result.get(part)
    return found if isinstance(found, list) else []


def mb(row: dict, who: str, what: str) -> str:
    value = row.get(f"{who}_{what}_mb")
    return "-" if value is None else f"{value:.0f}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# The packaged pairs on an NVIDIA GPU (PyTorch, random weights of the real shapes)",
             "", f"{env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}), transformers "
             f"{env['transformers']}; `python benchmarks/gpu_profile.py --configs DIR`. "
             "Median wall-clock time to the last kernel (launches included), teacher and student "
             "alternating.", "",
             "Memory: the model's weights, and what one call takes on top of what is resident "
             "(activations; the KV cache for generation).", "",
             "| pair | dtype | batch x tokens | teacher eager ms | student eager ms | speedup "
             "eager | speedup CUDA graph | weights MB teacher / student | call MB teacher / "
             "student |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows(result, "encoders"):
        graph = (f"{r['speedup_cuda_graph']:.1f}x" if "speedup_cuda_graph" in r
                 else "failed" if "cuda_graph_error" in r else "-")
        lines.append(f"| {r['pair']} | {r['dtype']} | {r['batch']} x {r['tokens']} | "
                     f"{r.get('teacher_eager_ms', float('nan')):.2f} | "
                     f"{r.get('student_eager_ms', float('nan')):.2f} | "
                     f"{r.get('speedup_eager', float('nan')):.1f}x | {graph} | "
                     f"{mb(r, 'teacher', 'weights')} / {mb(r, 'student', 'weights')} | "
                     f"{mb(r, 'teacher', 'working')} / {mb(r, 'student', 'working')} |")
    failed = sorted({r["cuda_graph_error"] for r in rows(result, "encoders")
                     if "cuda_graph_error" in r})
    lines += [f"\nCUDA graph not captured: {e}" for e in failed]
    lines += ["", "| pair | dtype | teacher ms per token | student ms per token | speedup | "
              "weights MB teacher / student | call MB teacher / student |",
              "|---|---|---|---|---|---|---|"]
    for r in rows(result, "lm"):
        lines.append(f"| {r['pair']} ({r['new_tokens']} new tokens, batch 1) | {r['dtype']} | "
                     f"{r['teacher_ms_per_token']:.2f} | {r['student_ms_per_token']:.2f} | "
                     f"{r['speedup']:.1f}x | {mb(r, 'teacher', 'weights')} / "
                     f"{mb(r, 'student', 'weights')} | {mb(r, 'teacher', 'working')} / "
                     f"{mb(r, 'student', 'working')} |")
    ort = result["onnxruntime"]
    lines += ["", f"onnxruntime {ort.get('version')}: providers {ort.get('providers')}."]
    if ort.get("cuda"):
        lines.append(f"2-block student on the CUDA provider, batch 1 x 128: fp32 "
                     f"{ort.get('student_fp32_ms', float('nan')):.2f} ms, dynamic int8 "
                     f"{ort.get('student_int8_ms', float('nan')):.2f} ms. "
                     f"{ort.get('export_error', '')}")
    return "\n".join(lines) + "\n"


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save-configs", type=Path, help="write the pairs' configs here, stop")
    parser.add_argument("--configs", type=Path, help="folder written by --save-configs")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a quick smoke run of this script (writes no results)")
    args = parser.parse_args()
    if args.save_configs:
        save_configs(args.save_configs)
        return
    import torch
    DEVICE = args.device
    if DEVICE == "cpu":  # the smoke run: the smallest shape, fp32, a few tokens
        global SHAPES, DTYPES, NEW_TOKENS
        SHAPES, DTYPES, NEW_TOKENS = SHAPES[:1], DTYPES[:1], 4
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_profile.py: no CUDA device is visible to torch; run it on a "
                         "machine with an NVIDIA GPU and a CUDA build of torch")
    result = {"environment": environment()}
    parts = (("encoders", lambda: encoder_rows(args.configs, args.repeats, rounds=3)),
             ("lm", lambda: lm_rows(args.configs, new_tokens=NEW_TOKENS, repeats=3)),
             ("onnxruntime", lambda: onnxruntime_rows(args.configs, args.repeats)))
    for name, part in parts:  # each part kept as soon as it is measured
        try:
            result[name] = part()
        except Exception as e:  # noqa: BLE001 - one part's failure is its result
            result[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{name}: {result[name]['error']}", flush=True)
        if DEVICE == "cuda":
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_profile.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))
    if DEVICE == "cuda":
        (args.out / "gpu_profile.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
