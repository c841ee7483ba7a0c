"""GPTQ for int4 weights (Frantar et al. 2022) through onnxruntime's own driver: its
calibration, Hessians and MatMulNBits nodes, with the two numeric steps that, as shipped, round
to nearest replaced by :func:`gptq_levels` (see :func:`exact_gptq`). Used by
:func:`edgedistill.quantization.int4.quantize_int4` (``int4_algorithm: gptq``)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import onnx

from ..errors import EdgeDistillError
from ..runtime.causal_lm import OnnxCausalLM

# onnxruntime's GPTQ defaults: dampening (share of the mean Hessian diagonal), rows rounded per
# lazy update, no reordering by activation size; kept as they are, recorded in the config
GPTQ_SETTINGS = {"percdamp": 0.01, "blocksize": 128, "actorder": False, "mse": False}


class CalibrationReader:
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


def gptq(model: onnx.ModelProto, reader: CalibrationReader, block_size: int, symmetric: bool,
         accuracy_level: int | None, exclude: list[str]) -> onnx.ModelProto:
    """onnxruntime's GPTQ on every MatMul with a constant weight, except ``exclude``, in 4 bits:
    its driver (calibration, Hessians, MatMulNBits nodes) with the two numeric steps of
    ``exact_gptq`` in place of its own."""
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
    with exact_gptq(), contextlib.redirect_stdout(io.StringIO()):
        quantizer.process()
    quantized = quantizer.model.model
    # the GPTQ path writes com.microsoft nodes without declaring the domain (RTN's does)
    if not any(o.domain == "com.microsoft" for o in quantized.opset_import):
        quantized.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return quantized


@contextlib.contextmanager
def exact_gptq():
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

    def exact(weight, hessian, num_bits=4, group_size=32, scheme="asym", blocksize=128,
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

    with mock.patch.object(weight_only, "gptq", exact), \
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
