"""Feature-based losses: a student layer imitates a teacher layer's hidden states or attention.

Hidden-state losses take ``(student, teacher, mask)`` of shape ``(batch, length, width)``;
attention losses take attention probabilities of shape ``(batch, heads, length, length)``. The
optional ``mask`` is ``(batch, length)``, 1 where a position is a real token: padding never
counts. When the widths differ, the trainer puts a learned linear projection on the student
side (left out of the saved student).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .registry import register_loss


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values`` (batch, length) over the positions where ``mask`` is 1."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


@register_loss("hidden_mse", kind="match", features="hidden", same_width=True)
def hidden_mse(student: torch.Tensor, teacher: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error between hidden states of matched layers, averaged over the width and
    the unmasked positions (FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020). Layer 0 is
    the embedding output, so ``student_layer: 0, teacher_layer: 0`` is TinyBERT's embedding loss.

    Recipe block::

        distill:
          matches:
            - {loss: hidden_mse, strategy: uniform, weight: 1.0}
            - {loss: hidden_mse, student_layer: 0, teacher_layer: 0, weight: 0.5}
    """
    per_position = (student - teacher).pow(2).mean(-1)
    return masked_mean(per_position, mask)


@register_loss("hidden_cosine", kind="match", features="hidden", same_width=True)
def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``1 - cos(h_s, h_t)`` per position, averaged over unmasked positions (DistilBERT's cosine
    embedding loss on the last hidden states, Sanh et al. 2019).

    Recipe block::

        distill:
          matches:
            - {loss: hidden_cosine, strategy: last, weight: 1.0}
    """
    per_position = 1 - F.cosine_similarity(student, teacher, dim=-1)
    return masked_mean(per_position, mask)


def _per_query(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Average a (batch, heads, queries) tensor over heads, then over unmasked queries."""
    return masked_mean(values.mean(1), mask)


@register_loss("attention_mse", kind="match", features="attention", same_heads=True)
def attention_mse(student: torch.Tensor, teacher: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error between attention maps, ``mean_{h,i,j} (A_s - A_t)^2`` over heads
    ``h``, unmasked queries ``i`` and unmasked keys ``j`` (TinyBERT's attention loss, Jiao et al.
    2020; it compares scores before softmax, which transformers does not return, so this
    compares the probabilities). Needs the same number of heads in both models.

    Recipe block::

        distill:
          matches:
            - {loss: attention_mse, strategy: uniform, weight: 1.0}
    """
    squared = (student - teacher.to(student.dtype)).pow(2)
    if mask is None:
        return _per_query(squared.mean(-1), mask)
    # average over real keys only: a sequence's loss must not shrink as the batch's padded
    # length grows (TextBrewer's att_mse_loss masks keys the same way)
    keys = mask[:, None, None, :].to(squared.dtype)
    return _per_query((squared * keys).sum(-1) / keys.sum(-1).clamp_min(1.0), mask)


@register_loss("attention_kl", kind="match", features="attention", same_heads=True)
def attention_kl(student: torch.Tensor, teacher: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``KL(A_t[h, i, :] || A_s[h, i, :])`` for each head and unmasked query row, averaged
    (MiniLM's self-attention distribution transfer, Wang et al. 2020). Needs the same number of
    heads in both models; :func:`~edgedistill.distill.losses.relation.minilm_relation` does not.

    Recipe block::

        distill:
          matches:
            - {loss: attention_kl, strategy: last, weight: 1.0}
    """
    teacher = teacher.to(student.dtype)
    # xlogy gives 0 * log 0 = 0 for masked keys; the clamp keeps log of the student finite there
    per_row = (torch.xlogy(teacher, teacher) - teacher * student.clamp_min(1e-12).log()).sum(-1)
    return _per_query(per_row, mask)
