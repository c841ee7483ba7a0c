"""Relation-based losses: the student keeps the teacher's relations between samples or tokens.

They compare relation matrices (sample x sample, or token x token), never the features
themselves, so student and teacher widths may differ and no projection is needed.

Sample-level losses (:func:`rkd_distance`, :func:`rkd_angle`, :func:`similarity_preserving`,
:func:`contrastive_relation`) take one vector per sample, ``(batch, width)``: by default the
mean of a layer's hidden states over the real tokens (``feature: pooled``) or the first token's
(``feature: cls``). They need batches of at least 2 (3 for angles); the relation of a single
sample with itself carries nothing. :func:`minilm_relation` takes a layer's queries, keys and
values.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .feature import masked_mean
from .registry import register_loss


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, x, p=2)


@register_loss("rkd_distance", kind="match", features=("pooled", "cls"))
def rkd_distance(student: torch.Tensor, teacher: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RKD distance loss (Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019).

    ``psi(x_i, x_j) = ||x_i - x_j|| / mu`` with ``mu`` the mean distance over pairs ``i != j``;
    the loss is the Huber (smooth L1) distance between the student's and the teacher's
    ``psi`` over all pairs. Dividing by ``mu`` makes it blind to the scale of each model's
    features. ``mask`` is unused (the inputs are already one vector per sample).

    Recipe block::

        distill:
          matches:
            - {loss: rkd_distance, feature: pooled, weight: 1.0}   # final layers
    """
    def normalised(x):
        d = _pairwise_distances(x.float())
        off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
        return d / d[off_diagonal].mean().clamp_min(1e-12)

    with torch.no_grad():
        target = normalised(teacher)
    return F.smooth_l1_loss(normalised(student), target)


@register_loss("rkd_angle", kind="match", features=("pooled", "cls"))
def rkd_angle(student: torch.Tensor, teacher: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RKD angle loss (Park et al., CVPR 2019).

    For every triplet ``(i, j, k)``: ``psi = cos angle(x_i - x_j, x_k - x_j)``; the loss is the
    Huber distance between student and teacher ``psi`` over all triplets. Unchanged when the
    features are scaled, shifted or rotated. ``mask`` is unused.

    Recipe block::

        distill:
          matches:
            - {loss: rkd_angle, feature: pooled, weight: 2.0}   # RKD's paper weights angle 2x
    """
    def angles(x):
        x = x.float()
        # e[j, i] = unit vector from x_j to x_i; angles[j, i, k] = <e[j, i], e[j, k]>
        e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=-1)
        return torch.bmm(e, e.transpose(1, 2))

    with torch.no_grad():
        target = angles(teacher)
    return F.smooth_l1_loss(angles(student), target)


def _row_normalised_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.float().flatten(1)
    return F.normalize(x @ x.t(), p=2, dim=1)


@register_loss("similarity_preserving", kind="match", features=("pooled", "cls"))
def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Similarity-preserving loss (Tung & Mori, "Similarity-Preserving Knowledge Distillation",
    ICCV 2019).

    ``G = X X^T`` (batch x batch), each row L2-normalised to ``G~``; the loss is
    ``||G~_s - G~_t||_F^2 / b^2``. Inputs of shape ``(batch, ...)`` are flattened per sample.
    Unchanged by any permutation of the feature channels. ``mask`` is unused.

    Recipe block::

        distill:
          matches:
            - {loss: similarity_preserving, feature: pooled, weight: 1.0}
    """
    diff = _row_normalised_gram(student) - _row_normalised_gram(teacher)
    return diff.pow(2).sum() / (len(student) ** 2)


def _relation_profiles(x: torch.Tensor) -> torch.Tensor:
    """Each sample's cosine similarities to the other samples, centred and L2-normalised.

    The diagonal (a sample with itself) is set to the row's mean, so it counts for nothing;
    centring matters because features of one model are often all alike (cosines of 0.8-0.95),
    which would make every row look the same.
    """
    x = F.normalize(x.float().flatten(1), p=2, dim=1)
    r = x @ x.t()
    n = len(x)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    mean = r.masked_fill(eye, 0.0).sum(1, keepdim=True) / max(n - 1, 1)
    return F.normalize(torch.where(eye, mean.expand_as(r), r) - mean, p=2, dim=1)


@register_loss("contrastive_relation", kind="match", features=("pooled", "cls"))
def contrastive_relation(student: torch.Tensor, teacher: torch.Tensor,
                         mask: Optional[torch.Tensor] = None,
                         tau: float = 0.1) -> torch.Tensor:
    """InfoNCE between the student's and the teacher's sample-relation matrices (the
    reference article's relation-based method: a relation matrix between samples from each
    model, compared with a contrastive loss; InfoNCE from van den Oord et al. 2018).

    ``R[i, j] = cos(x_i, x_j)``; each row, without its diagonal, is centred and normalised to a
    relation profile ``r_i``, so ``<r_s[i], r_t[j]>`` is the correlation of sample ``i``'s
    relations in the student with sample ``j``'s in the teacher. The student's profile of each
    sample must pick out the teacher's profile of the same sample among the batch:
    ``loss = mean_i -log softmax_j(<r_s[i], r_t[j]> / tau)[i]``. Unlike the other losses it is
    not 0 at a perfect match (InfoNCE's floor depends on the batch); it falls as the student's
    relations take the teacher's shape. Needs batches of at least 3.

    Recipe block::

        distill:
          matches:
            - {loss: contrastive_relation, feature: pooled, weight: 0.1, options: {tau: 0.1}}
    """
    with torch.no_grad():
        target = _relation_profiles(teacher)
    logits = _relation_profiles(student) @ target.t() / tau
    return F.cross_entropy(logits, torch.arange(len(student), device=student.device))


@register_loss("minilm_relation", kind="match", features="qkv")
def minilm_relation(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                    mask: Optional[torch.Tensor] = None,
                    relation_heads: int = 12) -> torch.Tensor:
    """MiniLMv2 self-attention relation transfer (Wang et al., "MiniLMv2: Multi-Head
    Self-Attention Relation Distillation", Findings of ACL 2021).

    For each of the queries, keys and values ``X`` (batch, length, width) of one layer: split the
    width into ``relation_heads`` parts ``X_r`` and form ``R_r = softmax(X_r X_r^T / sqrt(d_r))``
    over the unmasked tokens; the loss is ``sum over Q, K, V of mean_{r,i} KL(R_t[r, i] ||
    R_s[r, i])``. Relations are length x length, so the widths and head counts of the two
    models may differ; ``relation_heads`` must divide both widths (default: the teacher's
    attention heads).

    Recipe block::

        distill:
          matches:
            - {loss: minilm_relation, strategy: last, weight: 1.0, options: {relation_heads: 12}}
    """
    key_mask = None
    if mask is not None:  # (batch, 1, 1, keys): masked keys get no probability
        key_mask = mask[:, None, None, :].bool()

    def log_relations(x):
        b, n, width = x.shape
        d = width // relation_heads
        x = x.float().view(b, n, relation_heads, d).transpose(1, 2)
        scores = x @ x.transpose(-1, -2) / d ** 0.5
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
        return F.log_softmax(scores, dim=-1)

    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        log_s = log_relations(s)
        with torch.no_grad():
            log_t = log_relations(t)
        per_row = (log_t.exp() * (log_t - log_s)).sum(-1)  # (batch, heads, queries)
        total = total + masked_mean(per_row.mean(1), mask)
    return total
