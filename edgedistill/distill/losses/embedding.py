"""Sentence-embedding losses: the student's pooled embedding (batch, width) against the
teacher's for the same texts.

Each takes ``(student, teacher)`` and returns a scalar. The relation losses of
:mod:`.relation` that compare one vector per sample (similarity-preserving, RKD, contrastive)
serve here too, on the pooled embeddings: :func:`embedding_losses` lists both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import EMBEDDING_LOSSES, MATCH_LOSSES, get_loss, register_loss


@register_loss("embedding_mse", kind="embedding")
def embedding_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the embeddings, ``mean_{i,d} (s_id - t_id)^2``.

    The objective sentence-transformers' ``MSELoss`` trains with when one model learns
    another's embedding space (Reimers & Gurevych, "Making Monolingual Sentence Embeddings
    Multilingual using Knowledge Distillation", EMNLP 2020). It asks for the teacher's exact
    vectors, lengths included, so a student can serve an index the teacher built.

    Recipe block::

        distill:
          distill_loss: embedding_mse
    """
    return F.mse_loss(student.float(), teacher.float())


@register_loss("embedding_cosine", kind="embedding")
def embedding_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean_i (1 - cos(s_i, t_i))``: the direction of each embedding alone, for models whose
    users compare embeddings by cosine similarity (lengths are free).

    Recipe block::

        distill:
          distill_loss: embedding_cosine
    """
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


@register_loss("embedding_similarity", kind="embedding")
def embedding_similarity(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the two models' cosine similarities of every pair of
    texts in the batch: ``mean_{i != j} (cos(s_i, s_j) - cos(t_i, t_j))^2``.

    It asks for the teacher's similarities, not its vectors, so the student may be narrower (a
    different width, another pretrained encoder): what a semantic-search index ranks by is
    kept, and the index is built with the student alone. The pairwise form of the relational
    objectives (Park et al., "Relational Knowledge Distillation", CVPR 2019, compare distances
    and angles; Tung & Mori 2019, row-normalised Gram matrices) on exactly the quantity a
    cosine-similarity search reads. A batch of one text (the last of an epoch, say) has no
    pair and adds nothing.

    Recipe block::

        distill:
          distill_loss: embedding_similarity
    """
    s, t = (F.normalize(x.float(), dim=-1) for x in (student, teacher))
    if len(s) < 2:
        return s.sum() * 0.0
    off_diagonal = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    return ((s @ s.t() - t @ t.t())[off_diagonal]).pow(2).mean()


# the losses that compare each text's two embeddings coordinate by coordinate: a student of
# another width learns them through a projection onto the teacher's (the embedding trainer adds
# it); every other embedding loss compares how texts relate within each model
POINTWISE = ("embedding_mse", "embedding_cosine")


def embedding_losses() -> dict:
    """What a sentence embedder's ``distill_loss`` may name: the embedding losses and the
    relation losses that compare one vector per sample (called without a mask)."""
    relations = {name: m.fn for name, m in MATCH_LOSSES.items() if "pooled" in m.features}
    return {**EMBEDDING_LOSSES, **relations}


def embedding_loss(name: str, setting: str = "distill_loss"):
    return get_loss(name, embedding_losses(), setting)
