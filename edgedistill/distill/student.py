"""make_student(): a smaller student, initialised from its teacher's own blocks or at random."""

from __future__ import annotations

import copy

import torch.nn as nn
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import EdgeDistillError
from .pruning import prune_width, pruned_shape

SELECTIONS = ("uniform", "first", "last")


def select_layers(num_teacher: int, layers: str = "uniform", num_layers: int = 2,
                  layer_ids: list[int] | None = None, whose: str = "the teacher's") -> list[int]:
    """Indices of the teacher blocks (or ``whose`` else) a student keeps.

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
            f"student.num_layers: {num_layers} must be between 1 and {whose} {num_teacher}")
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


def find_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
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


INITS = ("teacher", "random", "pruned")


def student_config(teacher_config: PretrainedConfig, num_layers: int, init: str = "teacher",
                   **overrides) -> PretrainedConfig:
    """The config a student built by :func:`make_student` will have (used to check a recipe's
    matches before any model is built)."""
    if init not in INITS:
        raise EdgeDistillError(f"student.init: '{init}' is unknown; valid: {', '.join(INITS)}")
    if overrides and init == "teacher":
        raise EdgeDistillError(
            f"student.config: {', '.join(overrides)} change the shape, so the student cannot "
            "reuse the teacher's blocks as they are; set student.init: pruned or random")
    if init == "pruned":
        overrides = pruned_shape(teacher_config, overrides)
    if num_layers < 1:
        raise EdgeDistillError(f"student.num_layers: {num_layers} must be at least 1")
    config = copy.deepcopy(teacher_config)
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise EdgeDistillError(f"student.config.{unknown[0]}: {type(config).__name__} has no "
                               "such setting")
    for key, value in overrides.items():
        setattr(config, key, value)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    heads = getattr(config, "num_attention_heads", None)
    if heads and config.hidden_size % heads:
        raise EdgeDistillError(f"student.config: hidden_size {config.hidden_size} is not a "
                               f"multiple of num_attention_heads {heads}")
    return config


def make_student(teacher: PreTrainedModel, layers: str = "uniform", num_layers: int = 2,
                 layer_ids: list[int] | None = None, init: str = "teacher",
                 inputs: list[dict] | None = None, **config_overrides) -> PreTrainedModel:
    """A smaller student of the same architecture as ``teacher``.

    ``init="teacher"`` (default) keeps some of the teacher's transformer blocks (``layers``:
    uniform / first / last, or explicit ``layer_ids``); embeddings, heads and the kept blocks
    start from the teacher's weights, so the student begins close to the teacher instead of at
    random (DistilBERT, Sanh et al. 2019). ``init="random"`` builds ``num_layers`` fresh blocks,
    and may change the shape too (``hidden_size=256, num_attention_heads=4,
    intermediate_size=1024``), as TinyBERT's students are. ``init="pruned"`` keeps teacher
    blocks as ``"teacher"`` does, then narrows them to ``hidden_size`` / ``intermediate_size``,
    keeping the heads, neurons and channels most active on ``inputs`` (tokenized training
    batches; :mod:`edgedistill.distill.pruning`). The teacher is left untouched.
    """
    if init == "pruned":  # the shape is checked (once) where it is cut
        kept = make_student(teacher, layers, num_layers, layer_ids)
        student = prune_width(kept, inputs or [], **config_overrides)
        student.config.edgedistill_teacher_layers = kept.config.edgedistill_teacher_layers
        return student
    if init != "teacher" or config_overrides:
        config = student_config(teacher.config, num_layers, init, **config_overrides)
        return type(teacher)(config)
    num_teacher = teacher.config.num_hidden_layers
    ids = select_layers(num_teacher, layers, num_layers, layer_ids)
    student = copy.deepcopy(teacher)
    # a teacher that has served a DistillationTrainer is frozen; its copy must learn
    student.requires_grad_(True)
    parent, attr, blocks = find_blocks(student)
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


def shares_tokenizer(teacher_tokenizer, student_tokenizer) -> bool:
    """Whether both read text as the same token ids (one vocabulary)."""
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, where: str = "student") -> None:
    """Both models read the same token ids, so they must share one vocabulary."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differ = len(set(t_vocab.items()) ^ set(s_vocab.items()))
        raise EdgeDistillError(
            f"{where}: its tokenizer differs from the teacher's ({len(s_vocab)} vs "
            f"{len(t_vocab)} tokens, {differ} entries differ); distillation feeds the same token "
            "ids to both models: use a student that shares the teacher's tokenizer")
