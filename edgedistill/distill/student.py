"""make_student(): a smaller student, initialised from its teacher's own blocks or at random;
and the student a recipe's ``student`` block asks for (:func:`build_student`), planned from
configs alone first (:func:`plan_student`) so that a recipe is checked before any training."""

from __future__ import annotations

import copy
from pathlib import Path

import torch.nn as nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel

from ..data import TaskData
from ..errors import EdgeDistillError
from ..recipe_blocks import StudentConfig
from ..sources import check_remote_code, resolve_model
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


def plan_student(teacher_path: Path, teacher_config, cfg: StudentConfig,
                 trust_remote_code: bool = False):
    """The config of the student a recipe asks for, and the teacher blocks it keeps (or None),
    worked out from configs alone so that a recipe is checked before any training."""
    if cfg.model:
        path = resolve_model(cfg.model)
        # a student's own code is not run: the trust setting is the teacher's alone
        check_remote_code(path, False, "student.model (custom code is not supported)")
        config = AutoConfig.from_pretrained(path)
        if cfg.cuts_model():  # its own blocks, not the teacher's: no teacher layers to name
            ids = select_layers(config.num_hidden_layers, cfg.layers, cfg.depth(),
                                cfg.layer_ids, "student.model's")
            config = student_config(config, len(ids))
        return config, None
    if cfg.init == "pruned" or (cfg.init == "teacher" and not cfg.config):
        ids = select_layers(teacher_config.num_hidden_layers, cfg.layers, cfg.depth(),
                            cfg.layer_ids)
        return student_config(teacher_config, len(ids), cfg.init, **cfg.config), ids
    return student_config(teacher_config, cfg.depth(), cfg.init, **cfg.config), None


def check_positions(config, who: str, max_length: int, sequence_length: int) -> None:
    """The training length (data.max_length) and the benchmark's (bench.sequence_length) fit
    in the positions of the model ``who`` (its ``config``)."""
    positions = getattr(config, "max_position_embeddings", None)
    for key, length in (("data.max_length", max_length),
                        ("bench.sequence_length", sequence_length)):
        if positions and length > positions:
            raise EdgeDistillError(f"{key}: {length} exceeds the {who}'s {positions} "
                                   f"positions; set {key} <= {positions}")


def student_tokenizer(teacher_tokenizer, cfg: StudentConfig):
    """The tokenizer the student reads: the teacher's, unless ``student.model`` is a pretrained
    model with a vocabulary of its own (whether the task allows that, its preflight says:
    :meth:`edgedistill.tasks.base.Task.check_student`)."""
    if not cfg.model:
        return teacher_tokenizer
    own = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
    return teacher_tokenizer if shares_tokenizer(teacher_tokenizer, own) else own


def pretrained_student(task, cfg: StudentConfig, teacher_config):
    """``student.model`` loaded as the task loads a student (with the head for the teacher's
    labels, the pooling it carries), whole or cut to the blocks ``cfg`` keeps."""
    model = task.load_model(resolve_model(cfg.model), **task.student_head(teacher_config))
    if not cfg.cuts_model():
        return model
    # DistilBERT's initialisation applied to the pretrained student's own blocks
    cut = make_student(model, cfg.layers, cfg.depth(), cfg.layer_ids)
    del cut.config.edgedistill_teacher_layers  # they are not the teacher's: none to match
    return cut


def build_student(task, teacher, cfg: StudentConfig, tokenizer=None, data: TaskData | None = None,
                  max_length: int = 128, seed: int = 0):
    """The student a recipe asks for: another pretrained model, or one made from the teacher
    (a pruned one ranks what it keeps on ``cfg.prune_texts`` training texts of ``data``, read
    by the teacher's ``tokenizer``)."""
    if cfg.model:
        return pretrained_student(task, cfg, teacher.config)
    inputs = None
    if cfg.init == "pruned" and data is not None:
        texts = data.calibration_texts(cfg.prune_texts, seed)
        inputs = [dict(tokenizer(texts[i:i + 32], truncation=True, max_length=max_length,
                                 padding=True, return_tensors="pt"))
                  for i in range(0, len(texts), 32)]
    return make_student(teacher, cfg.layers, cfg.depth(), cfg.layer_ids, cfg.init,
                        inputs=inputs, **cfg.config)
