"""int4 weight-only quantization of an exported ONNX model with onnxruntime's MatMulNBits.

A causal LM's decode step reads every weight once per token, so its speed is bound by memory
traffic: 4-bit weights (one scale per ``block_size`` weights) read about a seventh of the bytes
of fp32 ones. Activations stay float, so unlike int8 no calibration is needed. onnxruntime's
``MatMulNBitsQuantizer`` turns each MatMul whose weight is an initializer into a
``com.microsoft.MatMulNBits`` node; the quantized folder keeps ``quantize_config.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx
from onnx import numpy_helper

from ..errors import EdgeDistillError
from ..export import copy_sidecars
from ..runtime import onnx_file, size_on_disk_mb

log = logging.getLogger(__name__)

ALGORITHMS = ("rtn",)  # gptq (calibrated, slower) needs a calibration reader: not yet
ACCURACY_LEVELS = (None, 0, 1, 2, 3, 4)  # MatMulNBits compute type: unset, fp32, fp16, bf16, int8
LM_HEAD_BITS = (4, 8, 32)
OUTPUT_NAME = "model_int4.onnx"
PROTOBUF_LIMIT = 2**31  # a single-file ONNX model is one protobuf message, at most 2 GB


def quantize_int4(onnx_dir: str | Path, output_dir: str | Path, block_size: int = 32,
                  accuracy_level: int | None = None, symmetric: bool = False,
                  algorithm: str = "rtn", lm_head_bits: int = 8) -> dict:
    """Quantize the MatMul weights of the fp32 ONNX model in ``onnx_dir`` to 4 bits.

    Round to nearest, block by block: ``block_size`` weights along the input axis share one
    scale (smaller: closer to fp32, bigger file) and, unless ``symmetric``, a zero point.
    ``accuracy_level`` is MatMulNBits' compute type (4 = int8 activations, the fast path on
    x86/ARM CPUs). ``lm_head_bits`` is what the output projection gets: 8 (default), 4, or 32
    (left float, and tied to the embedding if it was).

    Defaults from the SmolLM2 student (perplexity 103.8 in fp32, 40 test blocks): symmetric
    blocks 119.8, asymmetric 112.6; the lm_head in 4 bits as well 125.2, in 8 bits 112.6. The
    lm_head maps to 49k logits and is the most sensitive matrix; 8 bits keep its accuracy at a
    quarter of its float size.

    Returns the settings and what they did: MatMuls quantized out of all, sizes, and what the
    lm_head became.
    """
    from . import fp32_graph

    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    if algorithm not in ALGORITHMS:
        raise EdgeDistillError(f"quantize.algorithm: '{algorithm}' is not supported yet; "
                               f"valid: {', '.join(ALGORITHMS)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size & (block_size - 1):
        raise EdgeDistillError(f"quantize.block_size: {block_size!r} is not a power of two "
                               ">= 16 (MatMulNBits' blocks); try 32, 64 or 128")
    if accuracy_level not in ACCURACY_LEVELS or isinstance(accuracy_level, bool):
        raise EdgeDistillError(f"quantize.accuracy_level: {accuracy_level!r} is unknown; valid: "
                               "none, 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16), 4 (int8)")
    if lm_head_bits not in LM_HEAD_BITS or isinstance(lm_head_bits, bool):
        raise EdgeDistillError(f"quantize.lm_head_bits: {lm_head_bits!r} is unknown; valid: "
                               "4, 8, 32 (float)")
    model_file = onnx_file(onnx_dir)
    if model_file is None:
        raise EdgeDistillError(f"{onnx_dir}: no .onnx file to quantize; run the export first")
    if output_dir.resolve() == onnx_dir.resolve():
        raise EdgeDistillError(f"{output_dir}: write the int4 model to another folder than its "
                               "fp32 export (a folder holds one model)")
    graph = fp32_graph(model_file)
    total = sum(node.op_type == "MatMul" for node in graph.node)
    model = onnx.load(str(model_file))  # with its external data, if any
    untied = _untie(model.graph) if lm_head_bits != 32 else []
    head = _head_matmul(model.graph)
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head]
    settings = dict(block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level)
    if head and lm_head_bits == 8:  # first the head alone in 8 bits, then the rest in 4
        model = _blockwise(model, 8, exclude=others, **settings)
    model = _blockwise(model, 4, exclude=[head] if head and lm_head_bits != 4 else [],
                       **settings)
    output_dir.mkdir(parents=True, exist_ok=True)
    large = sum(t.ByteSize() for t in model.graph.initializer) >= PROTOBUF_LIMIT
    onnx.save_model(model, str(output_dir / OUTPUT_NAME), save_as_external_data=large,
                    all_tensors_to_one_file=True, location=OUTPUT_NAME + "_data")
    copy_sidecars(onnx_dir, output_dir)
    quantized = sum(node.op_type == "MatMulNBits" for node in model.graph.node)
    record = {"algorithm": algorithm, "bits": 4, "block_size": block_size,
              "accuracy_level": accuracy_level, "symmetric": symmetric,
              "lm_head_bits": lm_head_bits, "matmuls_quantized": quantized,
              "matmuls_total": total, "untied": untied, "lm_head": _lm_head(model.graph),
              "size_mb_before": round(size_on_disk_mb(onnx_dir), 3),
              "size_mb_after": round(size_on_disk_mb(output_dir), 3)}
    (output_dir / "quantize_config.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("int4: %d of %d MatMuls quantized, %.1f -> %.1f MB", quantized, total,
             record["size_mb_before"], record["size_mb_after"])
    return record


def _blockwise(model: onnx.ModelProto, bits: int, block_size: int, symmetric: bool,
               accuracy_level: int | None, exclude: list[str]) -> onnx.ModelProto:
    """onnxruntime's blockwise round-to-nearest quantizer (its C++ kernel) on every MatMul
    with a constant weight, except ``exclude``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  MatMulNBitsQuantizer)

    # the module logs every node it looks at, at INFO, through a handler it installs itself
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                          accuracy_level=accuracy_level, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size,
                                     is_symmetric=symmetric, accuracy_level=accuracy_level,
                                     nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _head_matmul(graph: onnx.GraphProto) -> str | None:
    """The name of the MatMul producing ``logits`` if its weight is an initializer."""
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name for t in graph.initializer}
    head = producers.get("logits")
    if head is not None and head.op_type == "MatMul" and head.input[1] in inits:
        return head.name
    return None


def _untie(graph: onnx.GraphProto) -> list[str]:
    """Turn each ``MatMul(x, Transpose(initializer))`` into a MatMul on a transposed initializer.

    That is how optimum exports a tied lm_head: one float embedding, read by the Gather and,
    transposed, by the lm_head MatMul. MatMulNBits only quantizes a weight that is an
    initializer, so the tied lm_head would stay float, and onnxruntime folds the Transpose
    into a second float copy of the embedding when it loads the model anyway. Untied, the
    lm_head (the largest matrix of a small LM) runs in 4 bits and that copy is int4; the
    Gather keeps the float embedding. Returns the names of the weights untied.
    """
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    untied = []
    for node in graph.node:
        source = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in inits:
            continue
        weight = numpy_helper.to_array(inits[source.input[0]])
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), [1, 0])
        if weight.ndim != 2 or perm != [1, 0]:
            continue
        # the Transpose's output becomes an initializer; every reader of it reads that instead
        graph.initializer.append(numpy_helper.from_array(weight.T.copy(), source.output[0]))
        graph.node.remove(source)
        producers.pop(source.output[0])
        untied.append(source.output[0])
    return untied


def _lm_head(graph: onnx.GraphProto) -> str:
    """What became of the node computing ``logits``, the largest matrix of a small LM.

    With tied embeddings optimum's export keeps one copy of the weight and feeds the lm_head
    MatMul ``Transpose(embedding)``; that input is no initializer, so MatMulNBits leaves it
    float (and onnxruntime folds the Transpose into a second float copy when it loads).
    """
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name for t in graph.initializer}
    head = producers.get("logits")
    if head is None:
        return "none (no logits output)"
    if head.op_type == "MatMulNBits":
        return f"int{next(a.i for a in head.attribute if a.name == 'bits')}"
    weight = head.input[1] if len(head.input) > 1 else ""
    source = producers.get(weight)
    if head.op_type == "MatMul" and source is not None and source.op_type == "Transpose" \
            and source.input[0] in inits:
        return f"float (tied: Transpose of {source.input[0]}, not an initializer)"
    return f"float ({head.op_type})"
