"""Intermediate matches: which student layer learns what from which teacher layer.

A match is declared as ``{loss, weight, feature, student_layer, teacher_layer, options}``
(TextBrewer's "intermediate match" idea) or as ``{loss, weight, strategy}``, which builds one
match per student block. Layer numbers index ``output_hidden_states``: 0 is the embedding
output, ``i`` the output of transformer block ``i``. A match that names no layers and no
strategy compares the final layers. Everything is checked against the two model configs, so a
match that cannot work fails before any training.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch.nn as nn

from ..errors import EdgeDistillError
from ..recipe_blocks import MatchConfig, check_limits
from .losses import MATCH_LOSSES, MatchLoss, get_loss

STRATEGIES = ("uniform", "skip", "last")
MATCH_KEYS = ("loss", "weight", "feature", "strategy", "student_layer", "teacher_layer", "options")
PROJECTIONS = "distill_projections"  # student attribute holding width projections


@dataclass
class Match:
    """One resolved pairing of a student layer with a teacher layer."""

    loss: str
    weight: float
    feature: str
    student_layer: int
    teacher_layer: int
    options: dict = field(default_factory=dict)

    @property
    def spec(self) -> MatchLoss:
        return MATCH_LOSSES[self.loss]


def layer_map(strategy: str, num_student: int, num_teacher: int,
              kept: list[int] | None = None) -> list[tuple[int, int]]:
    """Pairs ``(student_layer, teacher_layer)`` of transformer blocks, one per student block.

    - ``uniform``: a student built from teacher blocks ``kept`` (see ``make_student``) matches
      each block to the one it was copied from; any other student matches block ``i`` to teacher
      block ``round(i * n_t / n_s)``, the one that ends the same share of the network (TinyBERT,
      Jiao et al. 2020).
    - ``skip``: block ``i`` to teacher block ``i * (n_t // n_s)``, every k-th block (PKD-Skip,
      Sun et al. 2019).
    - ``last``: the student's blocks to the teacher's last ``n_s`` blocks (PKD-Last).
    """
    if num_student > num_teacher and strategy in ("skip", "last"):
        raise EdgeDistillError(f"strategy '{strategy}' needs a student with at most the "
                               f"teacher's {num_teacher} blocks; it has {num_student}")
    if strategy == "uniform" and kept:
        return [(i + 1, t + 1) for i, t in enumerate(kept)]
    if strategy == "uniform":
        return [(i, round(i * num_teacher / num_student)) for i in range(1, num_student + 1)]
    if strategy == "skip":
        step = num_teacher // num_student
        return [(i, i * step) for i in range(1, num_student + 1)]
    if strategy == "last":
        return [(i, num_teacher - num_student + i) for i in range(1, num_student + 1)]
    raise EdgeDistillError(f"strategy '{strategy}' is unknown; valid: {', '.join(STRATEGIES)}")


def loss_options(fn) -> dict:
    """The settings a match loss takes besides ``(student, teacher, mask)``, with defaults."""
    params = list(inspect.signature(fn).parameters.values())[3:]
    return {p.name: p.default for p in params}


def check_match_spec(spec: dict, where: str) -> MatchLoss:
    """Check what can be checked without models: keys, loss, feature, strategy, options."""
    unknown = sorted(set(spec) - set(MATCH_KEYS))
    if unknown:
        raise EdgeDistillError(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(MATCH_KEYS)}")
    if not spec.get("loss"):
        raise EdgeDistillError(f"{where}: a match needs 'loss' (one of {', '.join(MATCH_LOSSES)})")
    loss = get_loss(spec["loss"], MATCH_LOSSES, f"{where}.loss")
    feature = spec.get("feature") or loss.features[0]
    if feature not in loss.features:
        raise EdgeDistillError(f"{where}.feature: '{spec['loss']}' compares "
                               f"{' or '.join(loss.features)}, not '{feature}'")
    # the field limits a recipe's matches are read with, for plain dict specs too
    check_limits(MatchConfig, SimpleNamespace(**spec), f"{where}.")
    strategy = spec.get("strategy")
    if strategy is not None and strategy not in STRATEGIES:
        raise EdgeDistillError(f"{where}.strategy: '{strategy}' is unknown; "
                               f"valid: {', '.join(STRATEGIES)}")
    layers = [spec.get("student_layer"), spec.get("teacher_layer")]
    if strategy is not None and any(x is not None for x in layers):
        raise EdgeDistillError(f"{where}: give either a strategy or student_layer and "
                               "teacher_layer, not both")
    if (layers[0] is None) != (layers[1] is None):
        raise EdgeDistillError(f"{where}: give both student_layer and teacher_layer (or "
                               "neither, for the final layers)")
    valid = loss_options(loss.fn)
    for name in spec.get("options") or {}:
        if name not in valid:
            raise EdgeDistillError(f"{where}.options.{name}: '{spec['loss']}' takes "
                                   f"{', '.join(valid) or 'no options'}")
    return loss


def _shape(config) -> dict:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"layers": config.num_hidden_layers, "width": config.hidden_size, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": head_dim}


def resolve_matches(specs: list[dict], student_config, teacher_config,
                    kept: list[int] | None = None, where: str = "matches") -> list[Match]:
    """Turn declared matches into concrete layer pairs, checked against both model configs."""
    s, t = _shape(student_config), _shape(teacher_config)
    matches = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        loss = check_match_spec(spec, at)
        feature = spec.get("feature") or loss.features[0]
        weight = float(spec.get("weight", 1.0))
        if spec.get("strategy"):
            pairs = layer_map(spec["strategy"], s["layers"], t["layers"], kept)
            weight /= len(pairs)  # a strategy's weight is shared by the pairs it builds
        elif spec.get("student_layer") is not None:
            pairs = [(spec["student_layer"], spec["teacher_layer"])]
        else:
            pairs = [(s["layers"], t["layers"])]
        lowest = 1 if feature in ("attention", "qkv") else 0  # blocks have these, embeddings not
        for sl, tl in pairs:
            for side, layer, n in (("student", sl, s["layers"]), ("teacher", tl, t["layers"])):
                if not lowest <= layer <= n:
                    raise EdgeDistillError(f"{at}: {side} layer {layer} is out of range; "
                                           f"{feature} exists for layers {lowest}..{n}")
        options = dict(spec.get("options") or {})
        if loss.same_heads and s["heads"] != t["heads"]:
            raise EdgeDistillError(
                f"{at}: '{spec['loss']}' compares attention maps head by head, but the teacher "
                f"has {t['heads']} heads and the student {s['heads']}; use minilm_relation, "
                "which works across head counts")
        if feature == "qkv":
            options["relation_heads"] = int(options.get("relation_heads", t["heads"]))
            _check_relation_heads(options["relation_heads"], s, t, at)
        matches += [Match(spec["loss"], weight, feature, sl, tl, options) for sl, tl in pairs]
    return matches


def _check_relation_heads(heads: int, s: dict, t: dict, where: str) -> None:
    widths = {w for shape in (s, t) for w in (shape["width"], shape["kv_heads"] * shape["head_dim"])}
    bad = sorted(w for w in widths if heads <= 0 or w % heads)
    if bad:
        raise EdgeDistillError(f"{where}.options.relation_heads: {heads} must divide the query, "
                               f"key and value widths of both models ({sorted(widths)}); "
                               "choose a common divisor")


def attach_projections(student: nn.Module, matches: list[Match], student_width: int,
                       teacher_width: int) -> None:
    """Give each width-comparing match a learned ``Linear(student -> teacher width)``.

    The projections live on the student (``distill_projections``) so that the optimizer, DDP
    and checkpoints handle them like any other weight; ``DistillationTrainer.save_model`` leaves
    them out of the saved student, which does not need them to run.
    """
    if student_width == teacher_width:
        return
    layers = {str(i): nn.Linear(student_width, teacher_width)
              for i, m in enumerate(matches) if m.spec.same_width}
    if layers:
        device = next(student.parameters()).device
        student.add_module(PROJECTIONS, nn.ModuleDict(layers).to(device))
