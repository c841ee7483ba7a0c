"""int4 weight-only quantization of an exported ONNX model with onnxruntime's MatMulNBits.

A causal LM's decode step reads every weight once per token, so its speed is bound by memory
traffic: 4-bit weights (one scale per ``block_size`` weights) read about a seventh of the bytes
of fp32 ones. Activations stay float. onnxruntime's ``MatMulNBitsQuantizer`` turns each MatMul
whose weight is an initializer into a ``com.microsoft.MatMulNBits`` node, its weight rounded
either to nearest (RTN, no data needed) or by GPTQ, which rounds one input row at a time and
moves the rows not yet rounded to cancel the error on real activations (calibration texts).
GPTQ is onnxruntime's own (no Intel Neural Compressor install) with its numeric core replaced,
see :mod:`.gptq`: as shipped it never propagates an error, so it rounds to nearest. The
quantized folder keeps ``quantize_config.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..artifacts import copy_sidecars, onnx_file, size_on_disk_mb
from ..errors import EdgeDistillError
from .gptq import GPTQ_SETTINGS, CalibrationReader, gptq
from .graph import fp32_graph

log = logging.getLogger(__name__)

ALGORITHMS = ("rtn", "gptq")
ACCURACY_LEVELS = (None, 0, 1, 2, 3, 4)  # MatMulNBits compute type: unset, fp32, fp16, bf16, int8
LM_HEAD_BITS = (4, 8, 32)
# 8-bit MatMulNBits (the output head) always compute with int8 activations, whatever the 4-bit
# ones do: onnxruntime has no fast float path for 8-bit weights (an onnxruntime-genai package
# whose 8-bit head computed in float decoded 40x slower: benchmarks/results/genai_package.md)
EIGHT_BIT_ACCURACY_LEVEL = 4
OUTPUT_NAME = "model_int4.onnx"
PROTOBUF_LIMIT = 2**31  # a single-file ONNX model is one protobuf message, at most 2 GB


def quantize_int4(onnx_dir: str | Path, output_dir: str | Path, block_size: int = 32,
                  accuracy_level: int | None = None, symmetric: bool = False,
                  algorithm: str = "rtn", lm_head_bits: int = 8,
                  calibration_texts: list[str] | None = None, calibration_samples: int = 128,
                  max_length: int = 128) -> dict:
    """Quantize the MatMul weights of the fp32 ONNX model in ``onnx_dir`` to 4 bits.

    Block by block: ``block_size`` weights along the input axis share one scale (smaller:
    closer to fp32, bigger file) and, unless ``symmetric``, a zero point. ``accuracy_level`` is
    MatMulNBits' compute type (4 = int8 activations, the fast path on x86/ARM CPUs).
    ``lm_head_bits`` is what the output projection gets: 8 (default), 4, or 32 (left float,
    and tied to the embedding if it was).

    Defaults from the SmolLM2 student (perplexity 103.8 in fp32, 40 test blocks): symmetric
    blocks 119.8, asymmetric 112.6; the lm_head in 4 bits as well 125.2, in 8 bits 112.6. The
    lm_head maps to 49k logits and is the most sensitive matrix; 8 bits keep its accuracy at a
    quarter of its float size.

    ``algorithm`` ``rtn`` rounds each weight to nearest; ``gptq`` rounds so as to keep each
    MatMul's output on the activations of the first ``calibration_samples`` of
    ``calibration_texts`` (each text one sample of up to ``max_length`` tokens, fed with an
    empty KV cache). Give it training texts, never test text. It takes minutes where RTN takes
    seconds: onnxruntime's driver runs the whole model once per distinct MatMul input per text.
    It needs torch (onnxruntime's GPTQ imports it). GPTQ follows ``block_size``, ``symmetric``
    and ``accuracy_level`` as RTN does, but cannot store zero points for a weight whose input
    size makes an odd number of blocks (refused: pick symmetric or another block size). Its
    8-bit path only simulates 8 bits in float weights, so an 8-bit lm_head is rounded to
    nearest by RTN first (the last MatMul: no other layer reads its output, so GPTQ sees the
    same activations either way); a 4-bit lm_head goes through GPTQ too.

    Returns the settings and what they did: MatMuls quantized out of all, sizes, what the
    lm_head became and, for GPTQ, the calibration texts and tokens used.
    """
    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    if algorithm not in ALGORITHMS:
        raise EdgeDistillError(f"quantize.int4_algorithm: '{algorithm}' is unknown; "
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
    if algorithm == "gptq":
        if isinstance(calibration_samples, bool) or not isinstance(calibration_samples, int) \
                or calibration_samples <= 0:
            raise EdgeDistillError(f"quantize.calibration_samples: {calibration_samples!r} must "
                                   "be a whole number > 0 (texts GPTQ calibrates on)")
        texts = [t for t in islice(calibration_texts or (), calibration_samples)
                 if isinstance(t, str) and t.strip()]
        if not texts:
            raise EdgeDistillError("quantize.int4_algorithm gptq needs calibration texts (the "
                                   "pipeline passes training texts); pass calibration_texts=[...]"
                                   " or use rtn")
    model_file = onnx_file(onnx_dir)
    if model_file is None:
        raise EdgeDistillError(f"{onnx_dir}: no .onnx file to quantize; run the export first")
    if output_dir.resolve() == onnx_dir.resolve():
        raise EdgeDistillError(f"{output_dir}: write the int4 model to another folder than its "
                               "fp32 export (a folder holds one model)")
    graph = fp32_graph(model_file)
    total = sum(node.op_type == "MatMul" for node in graph.node)
    model = onnx.load(str(model_file))  # with its external data, if any
    untied = _untie(model.graph) if lm_head_bits != 32 else {}
    head = _head_matmul(model.graph)
    # the embedding table the head was untied from, if the model was tied
    table = untied.get(next((n.input[1] for n in model.graph.node if n.name == head), ""))
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head]
    settings = dict(block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level)
    if head and lm_head_bits == 8:  # first the head alone in 8 bits, then the rest in 4
        model = _blockwise(model, 8, exclude=others,
                           **dict(settings, accuracy_level=EIGHT_BIT_ACCURACY_LEVEL))
    exclude = [head] if head and lm_head_bits != 4 else []
    calibration = {}
    if algorithm == "gptq":
        if sum(t.ByteSize() for t in model.graph.initializer) >= PROTOBUF_LIMIT:
            raise EdgeDistillError(f"{model_file}: over 2 GB of weights, more than onnxruntime's "
                                   "GPTQ can run from memory; use int4_algorithm rtn")
        if not symmetric:
            _check_even_blocks(model.graph, block_size, exclude, model_file)
        reader = CalibrationReader(onnx_dir, texts, max_length)
        model = gptq(model, reader, exclude=exclude, **settings)
        calibration = {"calibration_samples": len(reader.feeds),
                       "calibration_tokens": reader.tokens, "gptq": dict(GPTQ_SETTINGS)}
    else:
        model = _blockwise(model, 4, exclude=exclude, **settings)
    embedding = _share_embedding(model.graph, table) if table else "float"
    output_dir.mkdir(parents=True, exist_ok=True)
    large = sum(t.ByteSize() for t in model.graph.initializer) >= PROTOBUF_LIMIT
    onnx.save_model(model, str(output_dir / OUTPUT_NAME), save_as_external_data=large,
                    all_tensors_to_one_file=True, location=OUTPUT_NAME + "_data")
    copy_sidecars(onnx_dir, output_dir)
    quantized = sum(node.op_type == "MatMulNBits" for node in model.graph.node)
    record = {"algorithm": algorithm, "bits": 4, "block_size": block_size,
              "accuracy_level": accuracy_level, "symmetric": symmetric,
              "lm_head_bits": lm_head_bits, "matmuls_quantized": quantized,
              "matmuls_total": total, "untied": list(untied), "lm_head": _lm_head(model.graph),
              "embedding": embedding,
              "size_mb_before": round(size_on_disk_mb(onnx_dir), 3),
              "size_mb_after": round(size_on_disk_mb(output_dir), 3), **calibration}
    (output_dir / "quantize_config.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("int4: %d of %d MatMuls quantized, %.1f -> %.1f MB", quantized, total,
             record["size_mb_before"], record["size_mb_after"])
    return record


def float_compute_copy(folder: str | Path, out: str | Path) -> Path:
    """A copy of the int4 model in ``folder`` (a quantize-stage folder or an onnxruntime-genai
    package) whose MatMulNBits compute in float: their ``accuracy_level`` dropped, so the same
    4-bit weights meet float activations, not int8-rounded ones, whose rounding differs between
    CPU instruction sets. It tells a wrong graph from int8 arithmetic that rounds otherwise
    (benchmarks/arm64_check.py) and gives the perplexity the 4-bit weights alone cost
    (benchmarks/int4_gptq.py); it decodes slower on x86, the 8-bit head of an onnxruntime-genai
    package 40x so (benchmarks/results/genai_package.md). Kept if already written from the
    same source file (its path, size and time in ``float_compute_of.json``)."""
    folder, out = Path(folder), Path(out)
    source = onnx_file(folder)
    if source is None:
        raise EdgeDistillError(f"{folder}: no ONNX model to copy; give a quantize-stage int4 "
                               "folder or an onnxruntime-genai package")
    target, marker = out / source.name, out / "float_compute_of.json"
    stat = source.stat()
    origin = {"source": str(source.resolve()), "bytes": stat.st_size,
              "mtime_ns": stat.st_mtime_ns}
    if target.is_file() and marker.is_file() and json.loads(marker.read_text()) == origin:
        return out
    target.unlink(missing_ok=True)  # another model's copy: replaced, not kept
    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source))
    set_accuracy_level(model.graph, None)
    for sidecar in folder.iterdir():
        if sidecar.suffix in (".json", ".jinja"):  # configs, tokenizer, chat template
            shutil.copy(sidecar, out / sidecar.name)
    # the weights beside the graph where the source kept them so (a genai package does)
    external = any(f.suffix == ".data" for f in folder.iterdir())
    part = out / f"{source.name}.part"  # renamed once whole: a killed copy is not "kept"
    # onnx appends to a weights file that is there: a killed copy's would grow by a model
    (out / f"{source.name}.data").unlink(missing_ok=True)
    onnx.save_model(model, str(part), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=f"{source.name}.data")
    os.replace(part, target)
    marker.write_text(json.dumps(origin) + "\n")
    return out


def matmul_bits(node: onnx.NodeProto) -> int:
    """The weight bits of a MatMulNBits node."""
    return next(a.i for a in node.attribute if a.name == "bits")


def set_accuracy_level(graph: onnx.GraphProto, level: int | None, bits: int | None = None) -> int:
    """Set the compute type of the graph's MatMulNBits with ``bits``-bit weights (all when
    None) to ``level``; None or 0 removes it (float, the input's type). Returns how many."""
    changed = 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or (bits is not None and matmul_bits(node) != bits):
            continue
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        if level:
            kept.append(onnx.helper.make_attribute("accuracy_level", level))
        del node.attribute[:]
        node.attribute.extend(kept)
        changed += 1
    return changed


def _blockwise(model: onnx.ModelProto, bits: int, block_size: int, symmetric: bool,
               accuracy_level: int | None, exclude: list[str]) -> onnx.ModelProto:
    """onnxruntime's blockwise round-to-nearest quantizer (its C++ kernel) on every MatMul
    with a constant weight, except ``exclude``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # the module logs every node it looks at, at INFO, through a handler it installs itself
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                          accuracy_level=accuracy_level, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size,
                                     is_symmetric=symmetric, accuracy_level=accuracy_level,
                                     nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _check_even_blocks(graph: onnx.GraphProto, block_size: int, exclude: list[str],
                       model_file: Path) -> None:
    """Refuse what onnxruntime's GPTQ would crash on, deep in its numpy code: it packs two
    4-bit zero points a byte across the whole weight instead of row by row, which fails for an
    asymmetric weight whose input size makes an odd number of blocks (RTN's packer pads each
    row and has no such limit)."""
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or node.name in exclude:
            continue
        blocks = -(-weight.dims[0] // block_size)
        if blocks % 2:
            raise EdgeDistillError(
                f"{model_file}: MatMul {node.name} has {weight.dims[0]} inputs, {blocks} blocks "
                f"of {block_size}, an odd count onnxruntime's GPTQ cannot store with zero points;"
                " use symmetric blocks or a block size that splits it into an even count")


def _head_matmul(graph: onnx.GraphProto) -> str | None:
    """The name of the MatMul producing ``logits`` if its weight is an initializer."""
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name for t in graph.initializer}
    head = producers.get("logits")
    if head is not None and head.op_type == "MatMul" and head.input[1] in inits:
        return head.name
    return None


def _untie(graph: onnx.GraphProto) -> dict[str, str]:
    """Turn each ``MatMul(x, Transpose(initializer))`` into a MatMul on a transposed initializer.

    That is how optimum exports a tied lm_head: one float embedding, read by the Gather and,
    transposed, by the lm_head MatMul. MatMulNBits only quantizes a weight that is an
    initializer, so the tied lm_head would stay float, and onnxruntime folds the Transpose
    into a second float copy of the embedding when it loads the model anyway. Untied, the
    lm_head (the largest matrix of a small LM) runs in 4 bits and that copy is int4; the
    Gather keeps the float embedding until ``_share_embedding`` points it at the quantized
    head. Returns each weight untied, with the initializer it was transposed from.
    """
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    untied = {}
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
        untied[source.output[0]] = source.input[0]
    return untied


def _share_embedding(graph: onnx.GraphProto, table: str) -> str:
    """Let the token embedding read its rows out of the quantized lm_head; returns what the
    embedding became.

    In a tied model the lm_head is the embedding ``table`` transposed, so once MatMulNBits has
    quantized the head, its weight holds every embedding row in blocks along the hidden axis:
    the layout onnxruntime's ``GatherBlockQuantized`` gathers rows from (MatMulNBits stores a
    row as (blocks, bytes per block); a Reshape lays it flat). The float Gather becomes that
    node over the head's blocks, scales and zero points, and the float table, a fifth of a
    small LM's parameters, leaves the file. Written here because neither library does it for
    this graph: onnxruntime's quantizer turns a Gather into GatherBlockQuantized only from
    opset 21 and then keeps a second table, and onnxruntime-genai's builder shares only
    symmetric 4-bit blocks (its 8-bit or zero-point variants write graphs onnxruntime cannot
    load, tried with 0.18).
    """
    producers = {out: node for node in graph.node for out in node.output}
    head = producers.get("logits")
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == table
               and all(a.i == 0 for a in n.attribute if a.name == "axis")]
    if head is None or head.op_type != "MatMulNBits" or len(gathers) != 1:
        return "float"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    if attrs["K"] % attrs["block_size"]:  # padded blocks: rows longer than the embedding's
        return "float"
    shape = f"{table}_rows_shape"
    graph.initializer.append(numpy_helper.from_array(
        np.array([attrs["N"], attrs["K"] * attrs["bits"] // 8], dtype=np.int64), shape))
    gather, rows = gathers[0], f"{table}_rows_quantized"
    nodes = [onnx.helper.make_node("Reshape", [head.input[1], shape], [rows],
                                   name=f"{gather.name}_rows"),
             onnx.helper.make_node("GatherBlockQuantized",
                                   [rows, gather.input[1], *head.input[2:4]], list(gather.output),
                                   name=f"{gather.name}_quantized", domain="com.microsoft",
                                   gather_axis=0, quantize_axis=1,
                                   block_size=attrs["block_size"], bits=attrs["bits"])]
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for node in reversed(nodes):
        graph.node.insert(at, node)
    if not any(table in n.input for n in graph.node):
        graph.initializer.remove(next(t for t in graph.initializer if t.name == table))
    return f"{attrs['bits']}-bit, shared with the lm_head"


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
