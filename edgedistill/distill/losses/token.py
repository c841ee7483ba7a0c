"""Token-level divergences for causal-LM distillation.

Each takes ``(s_logp, t_logp)``: the student's and the teacher's log-probabilities, already
temperature-scaled and normalised, with the vocabulary (or coarsened bins, see
:func:`edgedistill.distill.token_kd.coarsen`) last. Each returns the divergence per position,
without reduction: the output has the input's shape minus its last dimension. Reduction, the
mask and the ``T^2`` factor belong to the caller (:mod:`edgedistill.distill.token_kd`).

Zero probabilities (``-inf`` log-probabilities) are allowed: a bin where the first argument of
a KL has no mass contributes exactly 0 (``0 log 0 = 0``), in the value and in the gradient, so a
coarsened tail bin with ~0 mass never produces NaN.

Each registers itself as a ``token`` loss (:mod:`.registry`); ``distill.distill_loss`` names one
for a causal LM::

    distill: {distill_loss: generalized_jsd, loss_options: {beta: 0.5}, temperature: 1.0}
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import torch

from ...errors import EdgeDistillError
from .registry import TOKEN_LOSSES, get_loss, register_loss


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_c p (log p - log q)`` over the last dim, with ``0 log 0 = 0``.

    Where ``p`` is 0 the difference is replaced by 0 *before* the product, so neither the value
    (``-inf - -inf = NaN``) nor the gradient (``0 * NaN``) can be NaN. Where ``p > 0`` and
    ``q = 0`` the result is ``+inf``, which is the true value.
    """
    p = log_p.exp()
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    diff = torch.where(p > 0, log_p - log_q, zero)
    return (p * diff).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """``log(weight * a + (1 - weight) * b)`` in log space (logsumexp), for ``0 < weight < 1``.

    ``-inf`` inputs are clamped to the dtype's lowest finite value first: a bin with no mass in
    either distribution then stays at ~0 mass, but ``logsumexp``'s gradient there is 0 instead
    of ``exp(-inf - -inf) = NaN``.
    """
    low = torch.finfo(log_a.dtype).min
    a = log_a.clamp(min=low) + math.log(weight)
    b = log_b.clamp(min=low) + math.log1p(-weight)
    return torch.logaddexp(a, b)


def _check_range(loss: str, name: str, value, low: float, high: float, high_open: bool,
                 meaning: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        low <= value < high if high_open else low <= value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise EdgeDistillError(
            f"{loss}: {name} = {value!r} is out of range; use a number in "
            f"[{low:g}, {high:g}{bracket} ({meaning})")
    return float(value)


@register_loss("forward_kl", kind="token")
def forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """Forward KL ``KL(p_t || p_s) = sum_c p_t (log p_t - log p_s)``, per position.

    Mean-seeking: the student must cover every token the teacher gives mass to (Hinton, Vinyals
    & Dean 2015, "Distilling the Knowledge in a Neural Network"; the usual word-level KD of
    Kim & Rush 2016, "Sequence-Level Knowledge Distillation").

    Recipe block::

        distill: {distill_loss: forward_kl, temperature: 1.0}
    """
    return _kl(t_logp, s_logp)


@register_loss("reverse_kl", kind="token")
def reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """Reverse KL ``KL(p_s || p_t) = sum_c p_s (log p_s - log p_t)``, per position.

    Mode-seeking: the student may drop low-probability teacher modes rather than spread mass
    over them (MiniLLM, Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language
    Models").

    Recipe block::

        distill: {distill_loss: reverse_kl, temperature: 1.0}
    """
    return _kl(s_logp, t_logp)


@register_loss("generalized_jsd", kind="token")
def generalized_jsd(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of GKD, per position.

    ``m = beta p_t + (1 - beta) p_s``;
    ``JSD(beta) = beta KL(p_t || m) + (1 - beta) KL(p_s || m)``
    (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes", ICLR). As ``beta -> 0`` it tends to ``beta KL(p_t || p_s)`` and as
    ``beta -> 1`` to ``(1 - beta) KL(p_s || p_t)``; following the paper (and TRL's
    ``GKDTrainer``), ``beta = 0`` returns :func:`forward_kl` and ``beta = 1`` :func:`reverse_kl`
    exactly, not the degenerate 0. Note that this makes the loss scale jump at the endpoints:
    near them, the value is ~``beta`` (resp. ``1 - beta``) times the KL. ``m`` is computed in
    log space with logsumexp.

    Recipe block::

        distill: {distill_loss: generalized_jsd, loss_options: {beta: 0.5}}
    """
    beta = _check_range("generalized_jsd", "beta", beta, 0.0, 1.0, False,
                        "0 = forward KL, 1 = reverse KL, 0.5 = symmetric JSD")
    if beta == 0.0:
        return forward_kl(s_logp, t_logp)
    if beta == 1.0:
        return reverse_kl(s_logp, t_logp)
    log_m = _mix(t_logp, s_logp, beta)
    return beta * _kl(t_logp, log_m) + (1.0 - beta) * _kl(s_logp, log_m)


@register_loss("skew_forward_kl", kind="token")
def skew_forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew forward KL ``KL(p_t || alpha p_t + (1 - alpha) p_s)``, per position.

    Mixing a little of the teacher into the student bounds the divergence (at most
    ``-log alpha``) and its gradient where the student has ~0 mass (DistiLLM, Ko et al. 2024,
    "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML; they use
    ``alpha = 0.1``). ``alpha = 0`` is :func:`forward_kl`.

    Recipe block::

        distill: {distill_loss: skew_forward_kl, loss_options: {alpha: 0.1}}
    """
    alpha = _check_range("skew_forward_kl", "alpha", alpha, 0.0, 1.0, True,
                         "the teacher's share in the mixture; 0 = forward KL")
    if alpha == 0.0:
        return forward_kl(s_logp, t_logp)
    return _kl(t_logp, _mix(t_logp, s_logp, alpha))


@register_loss("skew_reverse_kl", kind="token")
def skew_reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL ``KL(p_s || alpha p_s + (1 - alpha) p_t)``, per position.

    The reverse-direction counterpart of :func:`skew_forward_kl` (DistiLLM, Ko et al. 2024).
    ``alpha = 0`` is :func:`reverse_kl`.

    Recipe block::

        distill: {distill_loss: skew_reverse_kl, loss_options: {alpha: 0.1}}
    """
    alpha = _check_range("skew_reverse_kl", "alpha", alpha, 0.0, 1.0, True,
                         "the student's share in the mixture; 0 = reverse KL")
    if alpha == 0.0:
        return reverse_kl(s_logp, t_logp)
    return _kl(s_logp, _mix(s_logp, t_logp, alpha))


def loss_options(fn: Callable[..., torch.Tensor]) -> tuple[str, ...]:
    """The options a token loss takes: its parameters after ``(s_logp, t_logp)``."""
    return tuple(inspect.signature(fn).parameters)[2:]


def get_token_loss(name: str, where: str = "token_loss", **options) -> Callable[..., torch.Tensor]:
    """Look a token loss up by name; with ``options``, check them and bind them.

    An unknown name raises :class:`EdgeDistillError` listing the valid names and the closest;
    an unknown option or an out-of-range value raises it naming ``where``. Without options the
    registry's function is returned as is; with options, a function of ``(s_logp, t_logp)``.
    """
    fn = get_loss(name, TOKEN_LOSSES, where)
    valid = loss_options(fn)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        takes = f"it takes {', '.join(valid)}" if valid else "it takes no options"
        raise EdgeDistillError(f"{where}: {name} has no option {', '.join(unknown)}; {takes}")
    if not options:
        return fn
    try:  # the range checks, on a one-bin distribution, now rather than mid-training
        fn(torch.zeros(1), torch.zeros(1), **options)
    except EdgeDistillError as e:
        raise EdgeDistillError(f"{where}: {e}") from None

    return functools.partial(fn, **options)


__all__ = ["TOKEN_LOSSES", "get_token_loss", "loss_options", *TOKEN_LOSSES]
