"""Distillation losses: pure functions on tensors, looked up by name.

Three families (Gou et al., "Knowledge Distillation: A Survey", IJCV 2021):

- logit-based (:mod:`.logit`): the student imitates the teacher's output distribution; chosen
  by ``distill.distill_loss`` and weighted by ``alpha_distill``; for causal LMs, the token-level
  divergences of :mod:`.token`;
- sentence embeddings (:mod:`.embedding`): the student's pooled embedding against the
  teacher's, by distance or by the relations among a batch's embeddings;
- feature-based (:mod:`.feature`): hidden states or attention maps of matched layers;
- relation-based (:mod:`.relation`): relations between samples or between tokens.

Feature and relation losses are used through *matches* (``distill.matches`` in a recipe, see
:mod:`edgedistill.distill.matching`); :data:`MATCH_LOSSES` says what each one compares.

Each loss registers itself by name with :func:`register_loss` where it is defined; your own
losses register the same way and are then named in a recipe like these (see :mod:`.registry`).
"""

from __future__ import annotations

from .embedding import (POINTWISE, embedding_cosine, embedding_loss, embedding_losses,
                        embedding_mse, embedding_similarity)
from .feature import attention_kl, attention_mse, hidden_cosine, hidden_mse, masked_mean
from .logit import kl_divergence, logit_mse, reverse_kl_divergence, soft_cross_entropy
from .registry import (EMBEDDING_LOSSES, LOGIT_LOSSES, MATCH_LOSSES, TOKEN_LOSSES, MatchLoss,
                       get_loss, register_loss)
from .relation import (contrastive_relation, minilm_relation, rkd_angle, rkd_distance,
                       similarity_preserving)
from .token import (forward_kl, generalized_jsd, get_token_loss, reverse_kl, skew_forward_kl,
                    skew_reverse_kl)

__all__ = [
    "EMBEDDING_LOSSES", "LOGIT_LOSSES", "MATCH_LOSSES", "POINTWISE", "TOKEN_LOSSES", "MatchLoss",
    "embedding_loss", "embedding_losses", "get_loss", "get_token_loss", "masked_mean",
    "register_loss",
    # the built-in losses
    "attention_kl", "attention_mse", "contrastive_relation", "embedding_cosine", "embedding_mse",
    "embedding_similarity",
    "forward_kl", "generalized_jsd",
    "hidden_cosine", "hidden_mse", "kl_divergence", "logit_mse", "minilm_relation",
    "reverse_kl", "reverse_kl_divergence", "rkd_angle", "rkd_distance", "similarity_preserving",
    "skew_forward_kl", "skew_reverse_kl", "soft_cross_entropy",
]
