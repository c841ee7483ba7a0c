"""Distillation losses: pure functions on tensors, looked up by name.

Three families (Gou et al., "Knowledge Distillation: A Survey", IJCV 2021):

- logit-based (:mod:`.logit`): the student imitates the teacher's output distribution; chosen
  by ``distill.distil_loss`` and weighted by ``alpha_distil``;
- feature-based (:mod:`.feature`): hidden states or attention maps of matched layers;
- relation-based (:mod:`.relation`): relations between samples or between tokens.

Feature and relation losses are used through *matches* (``distill.matches`` in a recipe, see
:mod:`edgedistill.distill.matching`); :data:`MATCH_LOSSES` says what each one compares.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from ...errors import EdgeDistillError
from .feature import attention_kl, attention_mse, hidden_cosine, hidden_mse
from .logit import kl_divergence, logit_mse, reverse_kl_divergence, soft_cross_entropy
from .relation import (contrastive_relation, minilm_relation, rkd_angle, rkd_distance,
                       similarity_preserving)

LOGIT_LOSSES: dict[str, Callable] = {
    "soft_cross_entropy": soft_cross_entropy,
    "kl_divergence": kl_divergence,
    "reverse_kl_divergence": reverse_kl_divergence,
    "logit_mse": logit_mse,
}


@dataclass(frozen=True)
class MatchLoss:
    """A loss used in a match, and what it compares.

    ``features`` are the model outputs it accepts (the first is the default): ``hidden``
    (batch, length, width), ``attention`` (batch, heads, length, length), ``pooled`` / ``cls``
    (batch, width), ``qkv`` (a layer's queries, keys and values).
    """

    fn: Callable
    features: tuple[str, ...]
    same_width: bool = False   # compares features directly: a projection bridges widths
    same_heads: bool = False   # compares attention maps head by head


MATCH_LOSSES: dict[str, MatchLoss] = {
    "hidden_mse": MatchLoss(hidden_mse, ("hidden",), same_width=True),
    "hidden_cosine": MatchLoss(hidden_cosine, ("hidden",), same_width=True),
    "attention_mse": MatchLoss(attention_mse, ("attention",), same_heads=True),
    "attention_kl": MatchLoss(attention_kl, ("attention",), same_heads=True),
    "rkd_distance": MatchLoss(rkd_distance, ("pooled", "cls")),
    "rkd_angle": MatchLoss(rkd_angle, ("pooled", "cls")),
    "similarity_preserving": MatchLoss(similarity_preserving, ("pooled", "cls")),
    "contrastive_relation": MatchLoss(contrastive_relation, ("pooled", "cls")),
    "minilm_relation": MatchLoss(minilm_relation, ("qkv",)),
}


def get_loss(name: str, registry: dict, setting: str = "loss"):
    """Look ``name`` up in ``registry``; an unknown name lists the valid ones and the closest."""
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise EdgeDistillError(
        f"{setting}: unknown loss '{name}'; {hint}valid: {', '.join(sorted(registry))}")


__all__ = ["LOGIT_LOSSES", "MATCH_LOSSES", "MatchLoss", "get_loss", *LOGIT_LOSSES, *MATCH_LOSSES]
