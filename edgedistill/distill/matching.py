"""Which student layer learns from which teacher layer.

Layer numbers index ``output_hidden_states``: 0 is the embedding output, ``i`` the output of
transformer block ``i``.
"""

from __future__ import annotations

from ..errors import EdgeDistillError

STRATEGIES = ("uniform", "last")


def layer_map(strategy: str, num_student: int, num_teacher: int,
              kept: list[int] | None = None) -> list[tuple[int, int]]:
    """Pairs ``(student_layer, teacher_layer)`` for hidden-state losses.

    ``uniform`` matches student block ``i`` to teacher block ``round(i * n_t / n_s)``, so each
    student block imitates the teacher block that ends the same share of the network (the
    TinyBERT mapping, Jiao et al. 2020). A student built from teacher blocks ``kept`` (see
    ``make_student``) instead matches each block to the one it was copied from. ``last``
    matches only the final blocks.
    """
    if strategy == "uniform" and kept:
        return [(i + 1, t + 1) for i, t in enumerate(kept)]
    if strategy == "uniform":
        return [(i, round(i * num_teacher / num_student)) for i in range(1, num_student + 1)]
    if strategy == "last":
        return [(num_student, num_teacher)]
    raise EdgeDistillError(
        f"layer map '{strategy}' is unknown; valid: {', '.join(STRATEGIES)}")
