"""Chunked token-level distillation for causal LMs: dense (live teacher) and sparse (top-k cache).

The loss over a batch is ``T^2 * (1 / N) * sum_{i in mask} D(p_s(.|x_<i; T), p_t(.|x_<i; T))``,
with ``D`` a divergence of :data:`~edgedistill.distill.losses.token.TOKEN_LOSSES`, ``N`` the
number of masked-in positions and ``T^2`` keeping gradient magnitudes comparable across
temperatures (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network",
sec. 2). Teacher and student are compared at the *same* positions (both predict token ``i+1``
from ``x_<=i``); choosing the positions (e.g. ``labels != -100`` shifted by one) is the caller's.

Memory: a full-vocabulary distribution is ``positions x vocabulary`` floats (2048 tokens x 150k
vocabulary = 1.2 GB in float32, several of them per loss). The masked positions are processed
``chunk_tokens`` at a time, and each chunk's gradient with respect to the student's logits is
computed as soon as its loss is (:class:`_GradInForward`), so only one chunk's teacher logits,
log-probabilities and loss intermediates are ever alive, and nothing is recomputed in the
backward pass (activation checkpointing would run the teacher's head twice). The log-softmax
runs in float32 whatever the logits' dtype.

Sparse KD (:func:`sparse_token_kd`) compares *coarsened* distributions of ``k + 1`` bins: the
teacher's top-k tokens plus one tail bin holding the rest of the mass, for both models
(:func:`coarsen`). Every divergence then works from a cache of the teacher's top-k
log-probabilities (:mod:`edgedistill.distill.teacher_cache`) without renormalising the top-k
(which would overstate the teacher's confidence) or dropping the tail (which would let the
student put arbitrary mass outside the top-k).

Recipe block (dense with a live teacher; ``cache_teacher: true`` switches to the sparse path)::

    distill: {distill_loss: forward_kl, temperature: 1.0}
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgeDistillError
from .losses.token import get_token_loss

# Smallest tail mass. A top-k sum is accurate to a few float32 ulps (1.2e-7 each), so a computed
# tail under ~1e-6 is rounding noise (it can even come out negative, with k = the vocabulary);
# flooring it keeps log(tail) finite and d log(tail) / d tail <= 1e6. After the floor the bins
# are renormalised, so they always sum to 1. The floor moves at most 1e-6 of mass: far below
# the float16 rounding of the cached log-probabilities themselves (~5e-4 relative).
TAIL_FLOOR = 1e-6
_MAX_LOG_HEAD = math.log1p(-TAIL_FLOOR)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler 2012, "Accurately
    Computing log(1 - exp(-|a|))"). Both branches are finite for ``x <= log(1 - 1e-6)``, so
    ``torch.where`` passes no NaN gradient."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def add_tail_bin(head_logp: torch.Tensor) -> torch.Tensor:
    """``(..., k)`` log-probs of k tokens -> ``(..., k + 1)``: the k plus a tail bin
    ``log(1 - sum exp(head))``, the tail floored at :data:`TAIL_FLOOR`, then renormalised."""
    head_logp = head_logp.float()
    log_head_mass = torch.logsumexp(head_logp, dim=-1, keepdim=True).clamp(max=_MAX_LOG_HEAD)
    bins = torch.cat([head_logp, _log1mexp(log_head_mass)], dim=-1)
    return bins - torch.logsumexp(bins, dim=-1, keepdim=True)


def coarsen(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Coarsen full-vocabulary log-probs to ``k + 1`` bins: those of ``indices``, plus the tail.

    ``logp`` is ``(..., V)``, ``indices`` ``(..., k)`` (any integer dtype, distinct per row);
    the result is ``(..., k + 1)`` log-probs that sum to 1 (see :func:`add_tail_bin` for the
    tail's floor of :data:`TAIL_FLOOR`).
    """
    return add_tail_bin(logp.gather(-1, indices.long()))


# ----------------------------------------------------------------------------------- checks

def _check_common(where: str, student_logits, mask, temperature, chunk_tokens) -> torch.Tensor:
    if student_logits.dim() != 3:
        raise EdgeDistillError(
            f"{where}: student logits must be (batch, length, vocabulary), got shape "
            f"{tuple(student_logits.shape)}")
    if tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise EdgeDistillError(
            f"{where}: mask has shape {tuple(mask.shape)} but the logits are "
            f"{tuple(student_logits.shape)}; pass one bool per (batch, position)")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise EdgeDistillError(
            f"{where}: temperature = {temperature!r}; use a number > 0 (1.0 = none)")
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise EdgeDistillError(f"{where}: chunk_tokens = {chunk_tokens!r}; use an integer >= 1")
    return mask.to(device=student_logits.device, dtype=torch.bool).reshape(-1)


def _zero(student_logits: torch.Tensor) -> torch.Tensor:
    """0, connected to the student's graph (an empty sum: no NaN even if the logits hold some)."""
    return student_logits.reshape(-1)[:0].float().sum()


def _select(student_logits: torch.Tensor, flat_mask: torch.Tensor, n: int) -> torch.Tensor:
    """The (N, V) logits of the masked positions, in row-major order: a view when every position
    counts (and the logits are contiguous), else one copy of the N rows only (boolean indexing
    also copies only those from a non-contiguous view such as ``logits[:, :-1]``)."""
    if n == flat_mask.numel():
        return student_logits.reshape(-1, student_logits.shape[-1])
    return student_logits[flat_mask.view(student_logits.shape[:2])]


class _GradInForward(torch.autograd.Function):
    """``sum_chunks chunk_loss(rows, *extra rows)`` over ``chunk_tokens`` rows of ``s`` at a time.

    Each chunk's gradient with respect to its rows is taken right after its loss, inside the
    forward pass, and written into one buffer the size of ``s``; the chunk's intermediates are
    then freed. The backward pass only scales that buffer. The same idea as fused linear
    cross-entropy kernels (e.g. Liger Kernel's): the memory of one chunk plus the gradient,
    the compute of one forward and one local backward per chunk, no recomputation.
    """

    @staticmethod
    def forward(ctx, s, chunk_loss, chunk_tokens, *extras):
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        start = 0
        for rows, *parts in zip(s.split(chunk_tokens), *(e.split(chunk_tokens) for e in extras)):
            with torch.enable_grad():
                x = rows.detach().requires_grad_(grad is not None)
                loss = chunk_loss(x, *parts)
                if grad is not None:
                    grad[start:start + len(rows)] = torch.autograd.grad(loss, x)[0]
            total += loss.detach()
            start += len(rows)
        ctx.save_for_backward(grad)
        ctx.num_extras = len(extras)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype), None, None) + (None,) * (ctx.num_extras)


def _run(s_sel: torch.Tensor, divergence, extras: list[torch.Tensor], rows: torch.Tensor,
         temperature: float, chunk_tokens: int, targets, kd_weight: float, ce_weight: float,
         parts: dict | None) -> torch.Tensor:
    """``(kd_weight * T^2 * sum of divergence + ce_weight * sum of next-token NLL) / N`` over the
    selected rows, chunked (:class:`_GradInForward`).

    With ``ce_weight`` the next-token cross-entropy against ``targets`` comes from the same
    student log-softmax as the divergence (at T = 1; another T takes one more log-softmax of
    the chunk), so a step pays for the vocabulary-wide softmax once instead of twice.
    ``parts``, when given, receives the unweighted means ``distill`` (with T^2) and ``ce``.
    """
    n = rows.numel()
    if ce_weight and targets is None:
        raise EdgeDistillError("token KD: ce_weight needs the targets (the next tokens)")
    flat_targets = (targets.reshape(-1).to(s_sel.device).index_select(0, rows)
                    if targets is not None else torch.zeros(n, dtype=torch.long,
                                                             device=s_sel.device))
    if ce_weight and int(flat_targets.min()) < 0:
        raise EdgeDistillError("token KD: a position in the mask has no target (-100); mask "
                               "exactly the positions whose next token is known")
    sums = {"distill": torch.zeros(()), "ce": torch.zeros(())}

    def chunk_loss(x, target, *chunk_extras):
        s_logp = F.log_softmax(x.float() / temperature, dim=-1)
        kd = divergence(s_logp, *chunk_extras) * temperature ** 2
        sums["distill"] += kd.detach().cpu()
        if not ce_weight:
            return kd_weight * kd
        logp = s_logp if temperature == 1 else F.log_softmax(x.float(), dim=-1)
        ce = -logp.gather(-1, target[:, None]).sum()
        sums["ce"] += ce.detach().cpu()
        return kd_weight * kd + ce_weight * ce

    total = _GradInForward.apply(s_sel, chunk_loss, chunk_tokens, flat_targets, *extras)
    if parts is not None:
        parts.update({k: float(v) / n for k, v in sums.items()})
    return total / n


# ------------------------------------------------------------------------------------ dense

def _dense_divergence(s_logp, t_hidden, head, fn, temperature):
    with torch.no_grad():
        t_logp = F.log_softmax(head(t_hidden).float() / temperature, dim=-1)
    return fn(s_logp, t_logp).sum()


def dense_token_kd(student_logits: torch.Tensor, teacher_hidden: torch.Tensor,
                   teacher_head: nn.Module, mask: torch.Tensor, loss: str = "forward_kl",
                   temperature: float = 1.0, chunk_tokens: int = 256, *,
                   targets: torch.Tensor | None = None, kd_weight: float = 1.0,
                   ce_weight: float = 0.0, parts: dict | None = None,
                   **options) -> torch.Tensor:
    """Token-level KD against a live teacher, chunked; a scalar.

    ``student_logits`` (B, L, V) with grad; ``teacher_hidden`` (B, L, H) the teacher's final
    hidden states (may come from ``torch.inference_mode``); ``teacher_head`` its output
    projection (``teacher.get_output_embeddings()``), run under ``no_grad`` one chunk at a time so
    the teacher's (B, L, V) logits never exist at once; ``mask`` (B, L) the positions that count.
    ``loss`` names a divergence of ``TOKEN_LOSSES`` and ``options`` its options (``beta``,
    ``alpha``). Returns ``T^2 * sum / N`` over the N masked positions; with none, a 0 still
    connected to ``student_logits``. With ``targets`` (B, L) and ``ce_weight``, returns
    ``kd_weight * that + ce_weight * next-token cross-entropy`` in one pass (see :func:`_run`).

    The masked student logits are gathered once (a copy of N x V unless every position counts);
    everything else of vocabulary size lives one chunk at a time.
    """
    where = f"token KD ({loss})"
    fn = get_token_loss(loss, where, **options)
    flat_mask = _check_common(where, student_logits, mask, temperature, chunk_tokens)
    if teacher_hidden.shape[:2] != student_logits.shape[:2]:
        raise EdgeDistillError(
            f"{where}: teacher hidden states {tuple(teacher_hidden.shape)} and student logits "
            f"{tuple(student_logits.shape)} differ in (batch, length); run both on the same batch")
    out = getattr(teacher_head, "out_features", None)
    if out is not None and out != student_logits.shape[-1]:
        raise EdgeDistillError(
            f"{where}: the teacher's head gives {out} logits but the student "
            f"{student_logits.shape[-1]}; token-level KD needs one shared vocabulary (same "
            "tokenizer and same padded vocab size)")
    rows = flat_mask.nonzero().squeeze(1)
    n = rows.numel()
    if n == 0:
        return _zero(student_logits)
    s_sel = _select(student_logits, flat_mask, n)
    # index_select makes a normal tensor even from an inference-mode one, usable in autograd
    t_sel = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(
        0, rows.to(teacher_hidden.device))
    divergence = partial(_dense_divergence, head=teacher_head, fn=fn, temperature=temperature)
    return _run(s_sel, divergence, [t_sel], rows, temperature, chunk_tokens, targets, kd_weight,
                ce_weight, parts)


# ----------------------------------------------------------------------------------- sparse

@torch.inference_mode()
def teacher_topk(teacher_hidden: torch.Tensor, teacher_head: nn.Module, k: int,
                 temperature: float = 1.0, chunk_tokens: int = 256
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probabilities at temperature T, for a cache.

    ``teacher_hidden`` (B, L, H) -> ``(logprobs float16 (B, L, k), indices int32 (B, L, k))``,
    sorted by decreasing probability. The log-softmax is over the *full* vocabulary (in float32)
    before the top-k, so the k values keep their true mass and ``1 - sum exp`` is the tail's.
    Computed ``chunk_tokens`` positions at a time under ``inference_mode``; the outputs are
    inference tensors on the hidden states' device.
    """
    if not (isinstance(k, int) and k >= 1):
        raise EdgeDistillError(f"teacher top-k: k = {k!r}; use an integer >= 1 (e.g. 64)")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise EdgeDistillError(f"teacher top-k: temperature = {temperature!r}; use a number > 0")
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise EdgeDistillError(
            f"teacher top-k: chunk_tokens = {chunk_tokens!r}; use an integer >= 1")
    lead = teacher_hidden.shape[:-1]
    flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    values, indices = [], []
    for chunk in flat.split(chunk_tokens):
        logp = F.log_softmax(teacher_head(chunk).float() / temperature, dim=-1)
        if k > logp.shape[-1]:
            raise EdgeDistillError(f"teacher top-k: k = {k} exceeds the vocabulary "
                                   f"({logp.shape[-1]}); use k <= {logp.shape[-1]}")
        v, i = logp.topk(k, dim=-1)
        values.append(v.half())
        indices.append(i.int())
    if not values:  # no positions
        return (flat.new_zeros((*lead, k), dtype=torch.float16),
                flat.new_zeros((*lead, k), dtype=torch.int32))
    return torch.cat(values).reshape(*lead, k), torch.cat(indices).reshape(*lead, k)


def _sparse_divergence(s_logp, t_logp, t_idx, fn):
    return fn(coarsen(s_logp, t_idx), add_tail_bin(t_logp)).sum()


def sparse_token_kd(student_logits: torch.Tensor, topk_logprobs: torch.Tensor,
                    topk_indices: torch.Tensor, mask: torch.Tensor, loss: str = "forward_kl",
                    temperature: float = 1.0, chunk_tokens: int = 256, *,
                    targets: torch.Tensor | None = None, kd_weight: float = 1.0,
                    ce_weight: float = 0.0, parts: dict | None = None,
                    **options) -> torch.Tensor:
    """Token-level KD against a cached teacher top-k, over ``k + 1`` coarsened bins; a scalar.

    ``topk_logprobs`` / ``topk_indices`` (B, L, k) as made by :func:`teacher_topk` (at this
    ``temperature``: the cache's temperature must match). The teacher's bins are its k
    log-probs plus the tail ``1 - sum``; the student's, its full-vocabulary log-softmax gathered
    at the same indices plus its own tail (:func:`coarsen`). Then as :func:`dense_token_kd`:
    ``T^2 * sum / N`` over the masked positions, chunked. With k = the
    vocabulary this equals the dense loss (the tails are ~0); with smaller k it is the
    divergence between the coarsened distributions, a lower bound of the full one (data
    processing inequality).
    """
    where = f"sparse token KD ({loss})"
    fn = get_token_loss(loss, where, **options)
    flat_mask = _check_common(where, student_logits, mask, temperature, chunk_tokens)
    if (topk_logprobs.shape != topk_indices.shape
            or topk_logprobs.shape[:2] != student_logits.shape[:2]):
        raise EdgeDistillError(
            f"{where}: teacher top-k log-probs {tuple(topk_logprobs.shape)} and indices "
            f"{tuple(topk_indices.shape)} must both be (batch, length, k) with the logits' "
            f"(batch, length) {tuple(student_logits.shape[:2])}; is the cache from this data?")
    rows = flat_mask.nonzero().squeeze(1)
    n = rows.numel()
    if n == 0:
        return _zero(student_logits)
    vocab, k = student_logits.shape[-1], topk_indices.shape[-1]
    t_idx = topk_indices.reshape(-1, k).to(student_logits.device).index_select(0, rows)
    if t_idx.numel() and int(t_idx.max()) >= vocab:
        raise EdgeDistillError(
            f"{where}: the teacher cache holds token id {int(t_idx.max())} but the student has "
            f"{vocab} logits; token-level KD needs one shared vocabulary")
    t_logp = topk_logprobs.reshape(-1, k).to(student_logits.device).index_select(0, rows)
    s_sel = _select(student_logits, flat_mask, n)
    divergence = partial(_sparse_divergence, fn=fn)
    return _run(s_sel, divergence, [t_logp, t_idx], rows, temperature, chunk_tokens, targets,
                kd_weight, ce_weight, parts)


__all__ = ["TAIL_FLOOR", "add_tail_bin", "coarsen", "dense_token_kd", "sparse_token_kd",
           "teacher_topk"]
