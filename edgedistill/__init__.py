"""edgedistill: teacher -> distilled student -> ONNX -> int8 -> evaluated and benchmarked.

The public API. Names are imported on first use, so a light process (the benchmark worker of
an ONNX model) does not pay for importing torch and transformers.
"""

import importlib

__version__ = "0.2.0"

_API = {
    "DistillationTrainer": "distill", "DistillationTrainingArguments": "distill",
    "make_student": "distill", "EdgeDistillError": "errors", "evaluate": "evaluation",
    "export_onnx": "export", "quantize": "quantization", "quantize_int4": "quantization",
    "build_genai_package": "quantization.genai",
    "benchmark": "bench", "benchmark_generation": "bench", "evaluate_lm": "evaluation",
    "load_causal_lm": "runtime.causal_lm", "Recipe": "recipe",
    "load_recipe": "recipe", "run": "pipeline", "register_loss": "distill.losses",
    "register_task": "tasks", "resolve_target": "profiles",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'edgedistill' has no attribute {name!r}")
