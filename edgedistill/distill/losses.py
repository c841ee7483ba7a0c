"""Distillation losses: pure functions on tensors, looked up by name.

Logit losses take ``(student_logits, teacher_logits, temperature)`` with the class (or
vocabulary) dimension last and return a scalar averaged over the leading dimensions. Feature
losses take ``(student_hidden, teacher_hidden, mask)`` with shape ``(batch, length, width)`` and
an optional ``(batch, length)`` mask of the positions that count.
"""

from __future__ import annotations

import difflib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import EdgeDistillError


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's softened distribution.

    ``T^2 * mean_i [ -sum_c p_t(c|x_i; T) * log p_s(c|x_i; T) ]`` with ``p(.; T) =
    softmax(z / T)``. The ``T^2`` factor keeps gradient magnitudes comparable across temperatures
    (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", sec. 2). Its
    gradient equals that of forward KL; the value differs by the teacher's entropy.

    Recipe block::

        distill: {distil_loss: soft_cross_entropy, temperature: 2.0, alpha_distil: 0.5}
    """
    t = temperature
    p_teacher = F.softmax(teacher_logits / t, dim=-1)
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    return -(p_teacher * log_p_student).sum(-1).mean() * t * t


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = 1.0, reverse: bool = False) -> torch.Tensor:
    """KL divergence between softened distributions, scaled by ``T^2``.

    Forward: ``KL(p_t || p_s) = sum_c p_t (log p_t - log p_s)`` (mean-seeking, Hinton et al.
    2015). Reverse: ``KL(p_s || p_t)`` (mode-seeking, as in MiniLLM, Gu et al. 2024).

    Recipe block::

        distill: {distil_loss: kl_divergence, temperature: 2.0}
    """
    t = temperature
    log_s = F.log_softmax(student_logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits / t, dim=-1)
    # KL(p || q) = sum_c p (log p - log q); p is the teacher (forward) or the student (reverse)
    log_p, log_q = (log_s, log_t) if reverse else (log_t, log_s)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t


def reverse_kl_divergence(student_logits, teacher_logits, temperature: float = 1.0):
    """``KL(p_s || p_t)``; see :func:`kl_divergence`. Recipe: ``distil_loss: reverse_kl_divergence``."""
    return kl_divergence(student_logits, teacher_logits, temperature, reverse=True)


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """Mean squared error between raw logits (Ba & Caruana 2014); temperature is unused.

    Recipe block::

        distill: {distil_loss: logit_mse}
    """
    return F.mse_loss(student_logits, teacher_logits.to(student_logits.dtype))


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values`` (batch, length) over positions where ``mask`` is 1."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error between hidden states of matched layers (FitNets, Romero et al. 2015;
    TinyBERT, Jiao et al. 2020), averaged over width and the unmasked positions.

    Recipe block::

        distill: {alpha_hidden: 1.0, hidden_loss: hidden_mse}
    """
    per_position = (student_hidden - teacher_hidden).pow(2).mean(-1)
    return _masked_mean(per_position, mask)


def hidden_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``1 - cos(h_s, h_t)`` per position, averaged over unmasked positions (DistilBERT's cosine
    embedding loss, Sanh et al. 2019).

    Recipe block::

        distill: {alpha_hidden: 1.0, hidden_loss: hidden_cosine}
    """
    per_position = 1 - F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)
    return _masked_mean(per_position, mask)


LOGIT_LOSSES: dict[str, Callable] = {
    "soft_cross_entropy": soft_cross_entropy,
    "kl_divergence": kl_divergence,
    "reverse_kl_divergence": reverse_kl_divergence,
    "logit_mse": logit_mse,
}

FEATURE_LOSSES: dict[str, Callable] = {
    "hidden_mse": hidden_mse,
    "hidden_cosine": hidden_cosine,
}


def get_loss(name: str, registry: dict[str, Callable], setting: str = "loss") -> Callable:
    """Look ``name`` up in ``registry``; an unknown name lists the valid ones and the closest."""
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise EdgeDistillError(
        f"{setting}: unknown loss '{name}'; {hint}valid: {', '.join(sorted(registry))}")
