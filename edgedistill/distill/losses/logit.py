"""Logit-based losses: the student imitates the teacher's output distribution.

Each takes ``(student_logits, teacher_logits, temperature)`` with the class (or vocabulary)
dimension last and returns a scalar averaged over the leading dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import register_loss


@register_loss("soft_cross_entropy", kind="logit")
def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's softened distribution.

    ``T^2 * mean_i [ -sum_c p_t(c|x_i; T) * log p_s(c|x_i; T) ]`` with ``p(.; T) =
    softmax(z / T)``. The ``T^2`` factor keeps gradient magnitudes comparable across temperatures
    (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", sec. 2). Its
    gradient equals that of forward KL; the value differs by the teacher's entropy.

    Recipe block::

        distill: {distill_loss: soft_cross_entropy, temperature: 2.0, alpha_distill: 0.5}
    """
    t = temperature
    p_teacher = F.softmax(teacher_logits / t, dim=-1)
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    return -(p_teacher * log_p_student).sum(-1).mean() * t * t


@register_loss("kl_divergence", kind="logit")
def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = 1.0, reverse: bool = False) -> torch.Tensor:
    """KL divergence between softened distributions, scaled by ``T^2``.

    Forward: ``KL(p_t || p_s) = sum_c p_t (log p_t - log p_s)`` (mean-seeking, Hinton et al.
    2015). Reverse: ``KL(p_s || p_t)`` (mode-seeking, as in MiniLLM, Gu et al. 2024).

    Recipe block::

        distill: {distill_loss: kl_divergence, temperature: 2.0}
    """
    t = temperature
    log_s = F.log_softmax(student_logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits / t, dim=-1)
    # KL(p || q) = sum_c p (log p - log q); p is the teacher (forward) or the student (reverse)
    log_p, log_q = (log_s, log_t) if reverse else (log_t, log_s)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t


@register_loss("reverse_kl_divergence", kind="logit")
def reverse_kl_divergence(student_logits, teacher_logits, temperature: float = 1.0):
    """``KL(p_s || p_t)``; see :func:`kl_divergence`. Recipe: ``distill_loss: reverse_kl_divergence``."""
    return kl_divergence(student_logits, teacher_logits, temperature, reverse=True)


@register_loss("logit_mse", kind="logit")
def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """Mean squared error between raw logits (Ba & Caruana 2014); temperature is unused.

    Recipe block::

        distill: {distill_loss: logit_mse}
    """
    return F.mse_loss(student_logits, teacher_logits.to(student_logits.dtype))
