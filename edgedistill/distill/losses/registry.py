"""The loss registry: every distillation loss, built-in or yours, is found here by name.

:func:`register_loss` files a function under a name and a kind; recipes and training arguments
then name it like a built-in, with no edit to the package:

- ``logit``: ``fn(student_logits, teacher_logits, temperature) -> scalar``, a classifier's soft
  targets; named by ``distill.distill_loss``;
- ``token``: ``fn(s_logp, t_logp, **options) -> per-position divergence`` on a causal LM's
  log-probabilities (see :mod:`.token`); named by ``distill.distill_loss``, options from
  ``distill.loss_options``;
- ``embedding``: ``fn(student, teacher) -> scalar`` between the pooled sentence embeddings
  (batch, width) of a sentence embedder and its teacher (task sentence-embedding); named by
  ``distill.distill_loss``, as are the relation losses that compare pooled vectors;
- ``match``: ``fn(student, teacher, mask, **options) -> scalar`` between matched layers; named
  by ``distill.matches[].loss``, options from ``matches[].options``. ``features`` are the model
  outputs it accepts, the first being the default (see :class:`MatchLoss`).

Names are one namespace across the kinds (``distill_loss`` may name a logit or a token loss).
Registering a taken name is an error unless ``replace=True``; re-running the module or
notebook cell that defined a loss (same module and function name) replaces it quietly.
A loss exists once the code that registers it has run: import your module before building
the trainer or calling ``edgedistill.run``; the ``edgedistill`` command does not import it.

Example::

    import torch.nn.functional as F
    from edgedistill.distill.losses import masked_mean, register_loss

    @register_loss("smooth_l1_logits", kind="logit")
    def smooth_l1_logits(student_logits, teacher_logits, temperature=1.0):
        # Huber distance between raw logits; the temperature is unused
        return F.smooth_l1_loss(student_logits, teacher_logits)

    @register_loss("hidden_l1", kind="match", features="hidden", same_width=True)
    def hidden_l1(student, teacher, mask=None, scale=1.0):
        # mean absolute difference per position, padding left out
        return scale * masked_mean((student - teacher).abs().mean(-1), mask)

and in the recipe::

    distill:
      distill_loss: smooth_l1_logits
      matches:
        - {loss: hidden_l1, strategy: uniform, weight: 0.5, options: {scale: 2.0}}
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ...errors import EdgeDistillError

KINDS = ("logit", "token", "embedding", "match")
FEATURES = ("hidden", "attention", "pooled", "cls", "qkv")  # what features.py can read out


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


# The registry's tables, one per kind: plain dicts, so a test can swap an entry for a moment
# (monkeypatch.setitem); code adds entries with register_loss only.
LOGIT_LOSSES: dict[str, Callable] = {}
TOKEN_LOSSES: dict[str, Callable] = {}
EMBEDDING_LOSSES: dict[str, Callable] = {}
MATCH_LOSSES: dict[str, MatchLoss] = {}
_TABLES: dict[str, dict] = {"logit": LOGIT_LOSSES, "token": TOKEN_LOSSES,
                            "embedding": EMBEDDING_LOSSES, "match": MATCH_LOSSES}
_ARGS = {"logit": ("student_logits", "teacher_logits", "temperature"),
         "token": ("s_logp", "t_logp"), "embedding": ("student", "teacher"),
         "match": ("student", "teacher", "mask")}


def register_loss(name: str, kind: str, *, features: str | tuple[str, ...] = (),
                  same_width: bool = False, same_heads: bool = False,
                  replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: file the function under ``name`` as a ``kind`` loss and return it unchanged.

    ``features``, ``same_width`` and ``same_heads`` describe a ``match`` loss (see
    :class:`MatchLoss`; ``features`` is required for one, a name or a tuple of names).
    """
    if kind not in KINDS:
        raise EdgeDistillError(f"register_loss('{name}'): kind '{kind}' is unknown; "
                               f"valid: {', '.join(KINDS)}")
    features = (features,) if isinstance(features, str) else tuple(features)
    if kind == "match":
        unknown = [f for f in features if f not in FEATURES]
        if not features or unknown:
            raise EdgeDistillError(f"register_loss('{name}'): a match loss needs features "
                                   f"among {', '.join(FEATURES)}; got {features}")
    elif features or same_width or same_heads:
        raise EdgeDistillError(f"register_loss('{name}'): features, same_width and same_heads "
                               "describe match losses only")

    def decorator(fn: Callable) -> Callable:
        _check_arguments(fn, name, kind)
        taken = next((k for k, table in _TABLES.items() if name in table), None)
        if taken:
            old = _origin(_TABLES[taken][name])
            if not (replace or (old == _origin(fn) and "<lambda>" not in old[1])):
                raise EdgeDistillError(
                    f"register_loss('{name}'): the name is taken by the {taken} loss "
                    f"{'.'.join(old)}; choose another name, or pass replace=True to override it")
            del _TABLES[taken][name]
        _TABLES[kind][name] = (MatchLoss(fn, features, same_width, same_heads)
                               if kind == "match" else fn)
        return fn

    return decorator


def get_loss(name: str, registry: str | Mapping, setting: str = "loss"):
    """Look ``name`` up in ``registry`` (a kind or a table of losses); an unknown name raises
    :class:`EdgeDistillError` naming ``setting``, with the valid names and the closest."""
    table = _TABLES[registry] if isinstance(registry, str) else registry
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise EdgeDistillError(
        f"{setting}: unknown loss '{name}'; {hint}valid: {', '.join(sorted(table))}")


def _check_arguments(fn: Callable, name: str, kind: str) -> None:
    """The trainer passes a kind's leading arguments by position: fail now, not mid-training."""
    params = inspect.signature(fn).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(_ARGS[kind]) and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise EdgeDistillError(f"register_loss('{name}'): a {kind} loss takes "
                               f"({', '.join(_ARGS[kind])}, ...); {'.'.join(_origin(fn))} takes "
                               f"{inspect.signature(fn)}")


def _origin(entry) -> tuple[str, str]:
    """Where a loss was defined: (module, qualified name); the same pair means a re-run."""
    fn = entry.fn if isinstance(entry, MatchLoss) else entry
    return getattr(fn, "__module__", None) or "?", getattr(fn, "__qualname__", None) or repr(fn)


__all__ = ["EMBEDDING_LOSSES", "FEATURES", "KINDS", "LOGIT_LOSSES", "MATCH_LOSSES", "TOKEN_LOSSES", "MatchLoss",
           "get_loss", "register_loss"]
