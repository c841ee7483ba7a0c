"""int4 weight-only quantization of an exported ONNX model with onnxruntime's MatMulNBits.

A causal LM's decode step reads every weight once per token, so its speed is bound by memory
traffic: 4-bit weights (one scale per ``block_size`` weights) read about a seventh of the bytes
of fp32 ones. Activations stay float. onnxruntime's ``MatMulNBitsQuantizer`` turns each MatMul
whose weight is an initializer into a ``com.microsoft.MatMulNBits`` node, its weight rounded
either to nearest (RTN, no data needed) or by GPTQ, which rounds one input row at a time and
moves the rows not yet rounded to cancel the error on real activations (calibration texts).
GPTQ is onnxruntime's own (no Intel Neural Compressor install) with its numeric core replaced,
see ``_exact_gptq``: as shipped it never propagates an error, so it rounds to nearest. The
quantized folder keeps ``quantize_config.json``.
"""

from __future__ import annotations

import contextlib
import io
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
from ..runtime.causal_lm import OnnxCausalLM
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
# onnxruntime's GPTQ defaults: dampening (share of the mean Hessian diagonal), rows rounded per
# lazy update, no reordering by activation size; kept as they are, recorded in the config
GPTQ_SETTINGS = {"percdamp": 0.01, "blocksize": 128, "actorder": False, "mse": False}


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
        reader = _CalibrationReader(onnx_dir, texts, max_length)
        model = _gptq(model, reader, exclude=exclude, **settings)
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


class _CalibrationReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over one feed per text: the tokens of
    the text (no padding, which would enter GPTQ's statistics) with an empty KV cache, built
    by :mod:`edgedistill.runtime.causal_lm` exactly as evaluation and generation feed the model."""

    def __init__(self, onnx_dir: Path, texts: list[str], max_length: int):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
        except (OSError, ValueError) as e:
            raise EdgeDistillError(f"{onnx_dir}: no tokenizer to read the calibration texts "
                                   f"({str(e).splitlines()[0][:120]}); re-export the model")
        lm = OnnxCausalLM(onnx_dir)
        rows = tokenizer(texts, add_special_tokens=False, truncation=True,
                         max_length=max_length)["input_ids"]
        rows = [np.asarray([row], dtype=np.int64) for row in rows if row]
        self.feeds = [lm._feed(ids, np.ones_like(ids), lm._empty_past(1)) for ids in rows]
        self.tokens = int(sum(ids.size for ids in rows))
        self.position = 0
        if not self.feeds:
            raise EdgeDistillError(f"{onnx_dir}: the calibration texts tokenize to nothing; "
                                   "pass non-empty training texts")

    def get_next(self) -> dict | None:
        if self.position == len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def __iter__(self):
        return iter(self.get_next, None)


def _gptq(model: onnx.ModelProto, reader: _CalibrationReader, block_size: int, symmetric: bool,
          accuracy_level: int | None, exclude: list[str]) -> onnx.ModelProto:
    """onnxruntime's GPTQ on every MatMul with a constant weight, except ``exclude``, in 4 bits:
    its driver (calibration, Hessians, MatMulNBits nodes) with the two numeric steps of
    ``_exact_gptq`` in place of its own."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    class Quantizer(MatMulNBitsQuantizer):
        # onnxruntime drops ``nodes_to_exclude`` on its GPTQ path (only RTN reads it); a node
        # set to "fp32" in the per-node config is what its GPTQ loop skips
        def _generate_q4_node_config(self):
            config = super()._generate_q4_node_config()
            config.update({name: "fp32" for name in self.nodes_to_exclude})
            return config

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader,
                                       percdamp=GPTQ_SETTINGS["percdamp"],
                                       block_size=GPTQ_SETTINGS["blocksize"],
                                       actorder=GPTQ_SETTINGS["actorder"],
                                       mse=GPTQ_SETTINGS["mse"])
    # the quantizer's block_size is the group sharing a scale; the config's is GPTQ's own
    quantizer = Quantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                          accuracy_level=accuracy_level, nodes_to_exclude=exclude,
                          algo_config=config)
    # its progress bar prints to stdout
    with _exact_gptq(), contextlib.redirect_stdout(io.StringIO()):
        quantizer.process()
    quantized = quantizer.model.model
    # the GPTQ path writes com.microsoft nodes without declaring the domain (RTN's does)
    if not any(o.domain == "com.microsoft" for o in quantized.opset_import):
        quantized.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return quantized


@contextlib.contextmanager
def _exact_gptq():
    """Swap the two numeric steps of onnxruntime's GPTQ (``neural_compressor.weight_only``,
    onnxruntime 1.32) for ``gptq_levels`` while its driver runs.

    Its ``gptq`` propagates each row's rounding error through the lower triangle of the
    upper-triangular inverse-Hessian factor (``Hinv1[i:, i]``, ``Hinv[i2:, i1:i2]``: zeros),
    so no error is ever propagated and its output is round to nearest, up to float rounding
    of the scales (``test_onnxruntime_gptq_alone_is_round_to_nearest`` shows it). Then its
    ``quant_tensor`` packs that result by quantizing it again, on a grid from each block's own
    min and max, which moves weights off the grid GPTQ chose. Here GPTQ's levels are computed
    by ``gptq_levels`` and packed as they are.
    """
    from unittest import mock

    from onnxruntime.quantization.neural_compressor import weight_only

    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def gptq(weight, hessian, num_bits=4, group_size=32, scheme="asym", blocksize=128,
             percdamp=0.01, actorder=False, mse=False, perchannel=True):
        if actorder or mse or not perchannel or num_bits != 4:
            raise RuntimeError("int4 GPTQ: only 4 bits, per channel, without act-order or mse "
                               "search, are implemented")
        levels, scale, zero = gptq_levels(weight, hessian, group_size, scheme == "sym",
                                          blocksize, percdamp)
        pending.append((levels, scale, zero))
        k = weight.shape[0]
        return ((levels - zero.repeat(group_size, 0)) * scale.repeat(group_size, 0))[:k]

    def quant_tensor(data, num_bits=4, group_size=32, scheme="asym", dtype="int", ratio=1.0):
        # called right after gptq on its result (transposed, padded to whole blocks)
        levels, scale, zero = pending.pop()
        if data.shape != levels.T.shape:
            raise RuntimeError(f"int4 GPTQ: packing a {data.shape} weight, expected "
                               f"{levels.T.shape}; onnxruntime's GPTQ driver changed")
        return (levels.T.reshape(-1, group_size), scale.T.reshape(-1, 1),
                zero.T.reshape(-1, 1).astype(np.uint8))

    with mock.patch.object(weight_only, "gptq", gptq), \
            mock.patch.object(weight_only, "quant_tensor", quant_tensor):
        yield
    if pending:
        raise RuntimeError("int4 GPTQ: a GPTQ result was never packed; onnxruntime's GPTQ "
                           "driver changed")


def gptq_levels(weight: np.ndarray, hessian: np.ndarray, group_size: int, symmetric: bool,
                blocksize: int = 128, percdamp: float = 0.01
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022) of a (K, N) MatMul weight into 4-bit levels, ``group_size``
    input rows sharing a scale and zero point per output column.

    Rows are rounded in order; each row's error, divided by its pivot of the Cholesky factor
    of the inverse Hessian ``hessian`` (K, K; the calibration activations' X^T X), is taken off
    the rows not yet rounded, weighted by that factor's row. A group's scale and zero point are
    set when its first row comes up, from the rows as the errors have left them; the min/max
    range includes 0, as onnxruntime's RTN does. Returns levels (K padded to whole groups, N;
    padding at the zero point), and per group and column the scale and zero point
    (K / group_size rounded up, N).
    """
    maxq = 15
    W = np.array(weight, dtype=np.float64)  # noqa: N806
    H = np.array(hessian, dtype=np.float64)  # noqa: N806
    k, n = W.shape
    blocks = -(-k // group_size)
    dead = np.diag(H) == 0  # inputs always 0: their weights never matter
    H[dead, dead] = 1
    W[dead, :] = 0
    H[np.diag_indices(k)] += percdamp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper triangular  # noqa: N806
    levels = np.zeros((blocks * group_size, n))
    scales, zeros = np.ones((blocks, n)), np.zeros((blocks, n))
    blocksize = max(group_size, blocksize - blocksize % group_size)  # whole groups per batch
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1, U1 = W[i1:i2].copy(), U[i1:i2, i1:i2]  # noqa: N806
        errors = np.zeros_like(W1)
        for i in range(i2 - i1):
            if (i1 + i) % group_size == 0:
                group = W1[i:i + group_size]
                low, high = np.minimum(group.min(0), 0), np.maximum(group.max(0), 0)
                if symmetric:
                    high = np.maximum(-low, high)
                    low = -high
                flat = (low == 0) & (high == 0)
                low[flat], high[flat] = -1, 1
                scale = (high - low) / maxq
                zero = np.full(n, 8.0) if symmetric else np.round(-low / scale)
                scales[(i1 + i) // group_size], zeros[(i1 + i) // group_size] = scale, zero
            q = np.clip(np.round(W1[i] / scale) + zero, 0, maxq)
            levels[i1 + i] = q
            errors[i] = (W1[i] - scale * (q - zero)) / U1[i, i]
            W1[i:] -= np.outer(U1[i, i:], errors[i])
        W[i2:] -= U[i1:i2, i2:].T @ errors
    levels[k:] = zeros[-1]
    return levels.astype(np.uint8), scales.astype(np.float32), zeros


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
