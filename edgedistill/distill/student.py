"""make_student(): a smaller student initialised from its teacher's own weights."""

from __future__ import annotations

import copy

import torch.nn as nn
from transformers import PreTrainedModel

from ..errors import EdgeDistillError

SELECTIONS = ("uniform", "first", "last")


def select_layers(num_teacher: int, layers: str = "uniform", num_layers: int = 2,
                  layer_ids: list[int] | None = None) -> list[int]:
    """Indices of the teacher blocks a student keeps.

    ``uniform`` spreads them from the first block to the last (2 of 6 -> [0, 5]); keeping the
    first and last blocks keeps the teacher's input and output representations, which is what
    DistilBERT's every-other-layer initialisation aims at (Sanh et al. 2019).
    """
    if layer_ids is not None:
        bad = [i for i in layer_ids if not 0 <= i < num_teacher]
        if bad or not layer_ids or len(set(layer_ids)) != len(layer_ids):
            raise EdgeDistillError(
                f"student.layer_ids: {layer_ids} must be distinct indices in 0..{num_teacher - 1}")
        return sorted(layer_ids)
    if not 1 <= num_layers <= num_teacher:
        raise EdgeDistillError(
            f"student.num_layers: {num_layers} must be between 1 and the teacher's {num_teacher}")
    if layers == "first":
        return list(range(num_layers))
    if layers == "last":
        return list(range(num_teacher - num_layers, num_teacher))
    if layers == "uniform":
        if num_layers == 1:
            return [num_teacher - 1]
        step = (num_teacher - 1) / (num_layers - 1)
        return [round(i * step) for i in range(num_layers)]
    raise EdgeDistillError(f"student.layers: '{layers}' is unknown; valid: {', '.join(SELECTIONS)}")


def _find_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The ModuleList of transformer blocks (``bert.encoder.layer``, ``model.layers``, ...)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            return parent, attr, module
    raise EdgeDistillError(
        f"{type(model).__name__}: cannot find its list of {n} transformer blocks; pass a "
        "student model instead of a layer subset")


def make_student(teacher: PreTrainedModel, layers: str = "uniform", num_layers: int = 2,
                 layer_ids: list[int] | None = None) -> PreTrainedModel:
    """A copy of ``teacher`` keeping only some of its transformer blocks.

    Embeddings, heads and the kept blocks start from the teacher's weights, so the student
    begins close to the teacher instead of at random. The teacher is left untouched.
    """
    num_teacher = teacher.config.num_hidden_layers
    ids = select_layers(num_teacher, layers, num_layers, layer_ids)
    student = copy.deepcopy(teacher)
    parent, attr, blocks = _find_blocks(student)
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in ids]))
    # Blocks that index a KV cache carry their position; renumber them for the shorter stack.
    for new_idx, block in enumerate(getattr(parent, attr)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = student.config
    config.num_hidden_layers = len(ids)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in ids]
    config.edgedistill_teacher_layers = ids
    return student
