"""Whole-graph steps around quantization: refusing a graph that is already quantized, fusing
an encoder's graph with onnxruntime's transformer optimizer, converting to fp16 for a GPU."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import onnx

from ..artifacts import copy_sidecars, onnx_file
from ..errors import EdgeDistillError

# Operators that only appear in a graph that is already quantized.
QUANTIZED_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
                 "MatMulNBits", "QAttention", "DynamicQuantizeMatMul"}


def fp32_graph(model_file: Path) -> onnx.GraphProto:
    """The graph of ``model_file`` (weights not loaded), refused when unreadable or already
    quantized: quantizing again would stack a second rounding on the first."""
    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception as e:
        raise EdgeDistillError(f"{model_file}: not a readable ONNX model ({str(e)[:150]}); re-export it")
    already = sorted({node.op_type for node in graph.node} & QUANTIZED_OPS)
    if already:
        raise EdgeDistillError(
            f"{model_file}: already quantized (has {', '.join(already)}); quantize the fp32 export")
    return graph


# Decoders are left unfused: the fusions for them target GPUs, and a fused KV-cache graph was
# not validated here (int4 is the decoders' CPU path).
def fuse_graph(onnx_dir: Path, model_file: Path, out: Path) -> dict | None:
    """Fuse an encoder's graph with onnxruntime's transformer optimizer (through optimum's
    ORTOptimizer: attention, skip + layer norm, bias + GELU, embedding + layer norm) into
    ``out``, then run onnxruntime's symbolic shape inference: the fused operators live in the
    com.microsoft domain, which ONNX's own shape inference cannot see through, and the
    quantizer needs every tensor's type. Returns the fused operator counts, or None when the
    model type has no fusions (the graph is then quantized as exported)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig
    from optimum.onnxruntime.utils import ORTConfigManager

    config = json.loads((onnx_dir / "config.json").read_text())
    decoder = any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])
    try:
        ORTConfigManager.check_supported_model(config.get("model_type"))
    except KeyError:
        return None
    if decoder:
        return None
    shutil.rmtree(out, ignore_errors=True)
    optimizer = ORTOptimizer.from_pretrained(onnx_dir, file_names=[model_file.name])
    # level 2: onnxruntime's basic and extended rewrites plus the transformer fusions; exact
    # (level 3 would also swap GELU for its tanh approximation)
    optimizer.optimize(save_dir=out, optimization_config=OptimizationConfig(
        optimization_level=2, optimize_for_gpu=False))
    fused_file = onnx_file(out)
    model = SymbolicShapeInference.infer_shapes(onnx.load(str(fused_file)), auto_merge=True)
    onnx.save(model, str(fused_file))
    return _fused_ops(model.graph)


def _fused_ops(graph: onnx.GraphProto) -> dict[str, int]:
    """How many of each fused operator (onnxruntime's com.microsoft domain) ``graph`` holds."""
    counts = collections.Counter(n.op_type for n in graph.node if n.domain == "com.microsoft")
    return dict(sorted(counts.items()))


def to_fp16(onnx_dir: str | Path, output_dir: str | Path) -> dict:
    """The fp16 model a GPU profile asks for: the graph fused for a GPU and its weights and
    arithmetic in float16 (optimum's ORTOptimizer, onnxruntime's float16 converter), inputs and
    outputs kept in their types so callers feed and read it as before. Built on any host;
    fast only on a GPU (onnxruntime's CPU provider runs few fp16 kernels)."""
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    model_file = onnx_file(onnx_dir)
    if model_file is None:
        raise EdgeDistillError(f"{onnx_dir}: no .onnx file to convert; run the export first")
    fp32_graph(model_file)
    ORTOptimizer.from_pretrained(onnx_dir, file_names=[model_file.name]).optimize(
        save_dir=output_dir, optimization_config=OptimizationConfig(
            optimization_level=2, optimize_for_gpu=True, fp16=True))
    copy_sidecars(onnx_dir, output_dir)
    graph = onnx.load(str(onnx_file(output_dir)), load_external_data=False).graph
    halves = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    return {"precision": "fp16", "fp16_initializers": halves,
            "fused": _fused_ops(graph)}
