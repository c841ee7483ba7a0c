"""DistillationTrainer: a transformers.Trainer whose loss mixes hard labels and a teacher.

Only ``compute_loss`` (and logging of the loss parts) is overridden, so everything a Trainer
does (checkpoints, resume, evaluation, DDP / FSDP / DeepSpeed through ``torchrun`` or
``accelerate launch``) works unchanged. With no teacher it trains on the labels alone, which is
how the teacher is fine-tuned and how the labels-only baseline is trained.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from ..errors import EdgeDistillError
from ..recipe_blocks import DistillConfig, check_limits
from .features import forward_with_features
from .losses import LOGIT_LOSSES, embedding_losses, get_loss
from .losses.token import TOKEN_LOSSES, get_token_loss
from .matching import PROJECTIONS, attach_projections, check_match_spec, resolve_matches
from .student import find_blocks
from .teacher_cache import TOPK_INDICES, TOPK_LOGPROBS
from .teacher_generations import PROMPT_LENGTH
from .teacher_outputs import TEACHER_LOGITS


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    """TrainingArguments plus the distillation settings.

    ``loss = alpha_ce * CE(student, labels) + alpha_distill * L_logit(student, teacher; T)
    + sum over matches of weight * L_match(student feature, teacher feature)``.
    """

    temperature: float = field(default=2.0, metadata={"help": "Soft-target temperature T."})
    alpha_ce: float = field(default=0.5, metadata={"help": "Weight of the hard-label loss."})
    alpha_distill: float = field(default=0.5, metadata={"help": "Weight of the soft-target loss."})
    distill_loss: str = field(default="soft_cross_entropy", metadata={"help": (
        "Logit loss name; causal LMs take a token-level loss (forward_kl, reverse_kl, "
        "generalized_jsd, skew_forward_kl, skew_reverse_kl).")})
    loss_options: Optional[dict] = field(default=None, metadata={"help": (
        "Settings of the logit loss, e.g. {'beta': 0.5} for generalized_jsd.")})
    kd_chunk_tokens: int = field(default=256, metadata={"help": (
        "Causal LMs: token positions whose full-vocabulary distributions are in memory at once "
        "in the distillation loss.")})
    matches: Optional[list[dict]] = field(default=None, metadata={"help": (
        "Feature and relation losses: a list of {loss, weight, feature, strategy, student_layer, "
        "teacher_layer, options} (see edgedistill.distill.matching).")})
    class_weights: Optional[list[float]] = field(
        default=None, metadata={"help": "Per-class weights of the hard-label loss."})
    lmbda: float = field(default=0.0, metadata={"help": (
        "Causal LMs, on-policy share (GKD, Agarwal et al. 2024): the fraction of training "
        "batches whose generated rows (prompt_length > 0) the student continues itself before "
        "the live teacher scores them.")})
    generation_temperature: float = field(default=1.0, metadata={"help": (
        "On-policy batches: the student's sampling temperature (0: greedy).")})
    generation_top_p: float = field(default=1.0, metadata={"help": (
        "On-policy batches: nucleus sampling mass (1: off).")})
    generation_new_tokens: int = field(default=96, metadata={"help": (
        "On-policy batches: most tokens the student generates per prompt (also capped by the "
        "row length).")})
    # transformers renamed this to eval_strategy; users (and many tutorials) still write it.
    evaluation_strategy: Optional[str] = field(
        default=None, metadata={"help": "Old name of eval_strategy, still accepted."})
    # edgedistill's own names spelt "distil" before 0.2, still accepted with a warning
    alpha_distil: Optional[float] = field(
        default=None, metadata={"help": "Old name of alpha_distill, still accepted."})
    distil_loss: Optional[str] = field(
        default=None, metadata={"help": "Old name of distill_loss, still accepted."})

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
            self.evaluation_strategy = None
        for old, new in DistillConfig.RENAMED.items():  # the recipe's table of old spellings
            if getattr(self, old) is not None:
                warnings.warn(f"DistillationTrainingArguments: {old} is the old name of {new}; "
                              f"write {new}=", FutureWarning, stacklevel=3)
                default = type(self).__dataclass_fields__[new].default
                if getattr(self, new) != default and getattr(self, new) != getattr(self, old):
                    raise EdgeDistillError(f"DistillationTrainingArguments: {old} and {new} are "
                                           f"the same setting; keep {new} only")
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        if self.fp16 and not torch.cuda.is_available():
            warnings.warn("fp16=True needs a CUDA GPU and none is present; training in fp32")
            self.fp16 = False
        check_distill_settings(self)
        super().__post_init__()


def check_distill_settings(settings, prefix: str = "") -> None:
    """Validate the distillation fields of ``settings`` (training arguments or a recipe's
    ``distill`` block) as far as possible without models; ``prefix`` names where they came
    from in the error."""
    check_limits(DistillConfig, settings, prefix)  # temperature, alpha_ce, alpha_distill, ...
    if settings.distill_loss in TOKEN_LOSSES:  # checks the options' names and ranges too
        get_token_loss(settings.distill_loss, f"{prefix}distill_loss",
                       **(settings.loss_options or {}))
    else:
        get_loss(settings.distill_loss, {**LOGIT_LOSSES, **TOKEN_LOSSES, **embedding_losses()},
                 f"{prefix}distill_loss")
        if settings.loss_options:
            raise EdgeDistillError(f"{prefix}loss_options: {settings.distill_loss} takes no "
                                   "options; they are for the token-level losses of causal LMs")
    for i, spec in enumerate(settings.matches or []):
        # a recipe holds MatchConfig dataclasses, training arguments plain dicts
        check_match_spec(asdict(spec) if is_dataclass(spec) else spec, f"{prefix}matches[{i}]")
    # a recipe's distill block may not carry the on-policy fields: their defaults are "off"
    lmbda = getattr(settings, "lmbda", 0.0)
    if not 0 <= lmbda <= 1:
        raise EdgeDistillError(f"{prefix}lmbda: {lmbda} must be in [0, 1] (0: off)")
    if getattr(settings, "generation_temperature", 1.0) < 0:
        raise EdgeDistillError(f"{prefix}generation_temperature: "
                               f"{settings.generation_temperature} must be >= 0 (0: greedy)")
    if not 0 < getattr(settings, "generation_top_p", 1.0) <= 1:
        raise EdgeDistillError(f"{prefix}generation_top_p: {settings.generation_top_p} must be "
                               "in (0, 1] (1: off)")
    if getattr(settings, "generation_new_tokens", 1) < 1:
        raise EdgeDistillError(f"{prefix}generation_new_tokens: "
                               f"{settings.generation_new_tokens} must be >= 1")


def check_classifier_settings(settings, prefix: str = "") -> None:
    """What distilling a classifier refuses, on training arguments or a recipe's ``distill``
    block (the task's preflight and the trainer both call this: one place for the rules)."""
    if settings.distill_loss in TOKEN_LOSSES or settings.distill_loss in embedding_losses():
        what = ("a token-level loss for task: causal-lm" if settings.distill_loss in TOKEN_LOSSES
                else "a loss for task: sentence-embedding")
        raise EdgeDistillError(
            f"{prefix}distill_loss: '{settings.distill_loss}' is {what}; a classifier takes "
            f"one of {', '.join(LOGIT_LOSSES)}")
    get_loss(settings.distill_loss, LOGIT_LOSSES, f"{prefix}distill_loss")
    if getattr(settings, "lmbda", 0.0) > 0:
        raise EdgeDistillError(f"{prefix}lmbda: on-policy batches are for causal LMs (the "
                               "student generates); set lmbda=0")


def check_causal_lm_settings(settings, prefix: str = "") -> None:
    """What distilling a causal LM refuses, as :func:`check_classifier_settings`. With
    ``alpha_distill`` 0 (a teacher fine-tuned on its text alone) the loss is never used."""
    if settings.alpha_distill > 0 and settings.distill_loss not in TOKEN_LOSSES:
        raise EdgeDistillError(
            f"{prefix}distill_loss: '{settings.distill_loss}' compares classifier outputs; a "
            f"causal LM takes a token-level loss (task causal-lm takes one of "
            f"{', '.join(TOKEN_LOSSES)})")
    if settings.matches:
        raise EdgeDistillError(f"{prefix}matches: feature and relation losses are not "
                               "supported for causal LMs yet; remove distill.matches")
    # training arguments hold the weights (None: off), a recipe block the rule ("none": off)
    if settings.class_weights not in (None, "none"):
        raise EdgeDistillError(f"{prefix}class_weights: a causal LM has no classes; leave it "
                               "unset")
    if getattr(settings, "kd_chunk_tokens", 1) < 1:
        raise EdgeDistillError(f"{prefix}kd_chunk_tokens: {settings.kd_chunk_tokens} must be "
                               ">= 1")


# trainers for other kinds of model than classifiers, registered by subclassing (see __new__)
_KINDS: list[type] = []


def _kind_of(model) -> type | None:
    """The registered trainer for ``model``'s kind, or None for a classifier."""
    return next((kind for kind in _KINDS if kind.handles(model)), None)


class DistillationTrainer(Trainer):
    """Trainer that distils ``teacher_model`` into ``model``.

    Accepts ``tokenizer=`` as well as ``processing_class=``. The teacher runs in eval mode
    without gradients and is never wrapped by DDP: it only produces targets. Under FSDP2 it is
    sharded over the processes like the student (:meth:`_shard_teacher_fsdp2`). When the data
    carry a ``teacher_logits`` column (see :func:`.teacher_outputs.add_teacher_logits`), those
    are used instead of running the teacher for the logit loss. A token classifier's logits
    (one row per token) are compared where the labels score (not -100), or on the real tokens
    where there are no labels.
    """

    def __init__(self, *args, teacher_model=None, tokenizer=None, **kwargs):
        if tokenizer is not None:
            kwargs.setdefault("processing_class", tokenizer)
        super().__init__(*args, **kwargs)
        args_ = self.args
        if not isinstance(args_, DistillationTrainingArguments):
            raise EdgeDistillError(
                "DistillationTrainer: pass args=DistillationTrainingArguments(...)")
        self.teacher = teacher_model
        self._check_settings(args_)
        self.matches = []
        if args_.matches and self.teacher is None:
            raise EdgeDistillError("matches need teacher_model: precomputed teacher_logits "
                                   "carry no hidden states or attention maps")
        self.teacher_sharded = False
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher_sharded = self._shard_teacher_fsdp2()
            if not self.teacher_sharded:
                self.teacher.to(args_.device)
            self.teacher.eval()
            self._check_compatible(self.model, self.teacher)
            self.matches = resolve_matches(
                args_.matches or [], self.model.config, self.teacher.config,
                getattr(self.model.config, "edgedistill_teacher_layers", None))
            attach_projections(self.model, self.matches, self.model.config.hidden_size,
                               self.teacher.config.hidden_size)
        # compute_loss returns a mean over the batch itself, so the Trainer must scale it for
        # gradient accumulation as it does for models that do not take loss kwargs.
        self.model_accepts_loss_kwargs = False
        self._loss_parts: dict[str, list[float]] = defaultdict(list)
        self._class_weights = (None if args_.class_weights is None else
                               torch.tensor(args_.class_weights, device=args_.device))

    def __new__(cls, *args, **kwargs):
        """The entry point for every model kind: ``DistillationTrainer(model=...)`` builds the
        trainer of the model's kind (a causal LM's: :mod:`.causal_trainer`), so user scripts
        and the pipeline name one class."""
        if cls is DistillationTrainer:
            cls = _kind_of(kwargs.get("model", args[0] if args else None)) or cls
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "handles" in vars(cls):  # a trainer for another kind of model
            _KINDS.append(cls)

    # A causal LM's head runs after its forward pass, chunk by chunk, so its trainer keeps the
    # FSDP2 root unit (embeddings, final norm, head) gathered after the forward.
    reshard_teacher_root = True

    def _check_settings(self, args_) -> None:
        """Refuse settings this kind of model cannot train with (the base: classifiers)."""
        kind = _kind_of(self.model)
        if kind is not None and not isinstance(self, kind):
            # a user's subclass of DistillationTrainer (or a model_init) given another kind of
            # model: training it with the classifier's loss would be silently wrong
            raise EdgeDistillError(
                f"{type(self).__name__}: {type(self.model).__name__} is trained by "
                f"{kind.__name__}; subclass that class, or pass the model as model=")
        check_classifier_settings(args_)
        self.logit_loss = get_loss(args_.distill_loss, LOGIT_LOSSES, "distill_loss")

    def _shard_teacher_fsdp2(self) -> bool:
        """Under FSDP2, shard the teacher over the ranks like the student; return whether done.

        The Trainer's accelerator shards only the model it trains. A teacher too large to sit
        whole beside the student's shard is sharded here with the same plugin settings: each
        transformer block, then the root (embeddings, final norm, head), each gathered only for
        its own forward pass. It stays frozen (no gradients, no optimizer state) and outside
        ``accelerator.prepare``: ``prepare_model(..., evaluation_mode=True)`` would not shard
        it. Under DDP, FSDP1, DeepSpeed or one process the teacher stays a full copy per rank.
        """
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if not self.is_fsdp_enabled or getattr(plugin, "fsdp_version", 1) != 2:
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                warnings.warn("the teacher is not sharded, every process holds a full copy: "
                              "DistillationTrainer shards it under FSDP2 only (fsdp_version: 2;"
                              " see docs/scale-out.md)")
            return False
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = dict(mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
                      offload_policy=plugin.cpu_offload)
        mesh = getattr(self.accelerator, "torch_device_mesh", None)
        if mesh is not None:
            kwargs["mesh"] = mesh[tuple(self.accelerator.parallelism_config.fsdp_dim_names)]
        for block in find_blocks(self.teacher)[2]:
            fully_shard(block, reshard_after_forward=True, **kwargs)
        fully_shard(self.teacher, reshard_after_forward=self.reshard_teacher_root, **kwargs)
        return True

    def _check_compatible(self, student, teacher) -> None:
        """Fail before training when the two models cannot be compared at all."""
        s_vocab, t_vocab = student.config.vocab_size, teacher.config.vocab_size
        if s_vocab != t_vocab:
            raise EdgeDistillError(
                f"teacher and student vocabularies differ (teacher {t_vocab} tokens, student "
                f"{s_vocab}); both read the same token ids, so the student needs the teacher's "
                "tokenizer")
        if self.args.alpha_distill > 0:
            s_what, s_size = _output_space(student)
            t_what, t_size = _output_space(teacher)
            if (s_what, s_size) != (t_what, t_size):
                raise EdgeDistillError(
                    f"teacher and student outputs differ (teacher: {t_what} {t_size}, student: "
                    f"{s_what} {s_size}); a logit loss needs the same output space: build the "
                    "student from the teacher (make_student) or set alpha_distill=0")

    def _set_signature_columns_if_needed(self):
        # Keep a precomputed `teacher_logits` column: the Trainer drops columns the model's
        # forward() does not take.
        super()._set_signature_columns_if_needed()
        for name in (TEACHER_LOGITS, TOPK_LOGPROBS, TOPK_INDICES, PROMPT_LENGTH):
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        cached = inputs.pop(TEACHER_LOGITS, None)
        student = self.accelerator.unwrap_model(model)
        outputs, s_features = forward_with_features(
            model, inputs, {(m.feature, m.student_layer) for m in self.matches}, student)
        logits = outputs.logits
        parts: dict[str, torch.Tensor] = {}  # each part as it enters the total loss
        if labels is not None:
            weight = None if self._class_weights is None else self._class_weights.to(logits.dtype)
            if (labels != -100).any():
                ce = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1),
                                     weight=weight)
            else:  # rows the teacher alone labels (label -100): cross-entropy's mean over no
                ce = logits.sum() * 0.0  # rows is NaN, which would stop the run; add nothing
            # labels only (no teacher): plain (optionally class-weighted) cross-entropy
            has_teacher = self.teacher is not None or cached is not None
            parts["ce"] = args.alpha_ce * ce if has_teacher else ce

        t_logits, t_features = cached, {}
        if self.teacher is not None and (self.matches or (cached is None and args.alpha_distill > 0)):
            t_out, t_features = self._teacher_features(inputs)
            t_logits = t_out.logits if cached is None else cached
        if t_logits is not None and args.alpha_distill > 0:
            s_scored, t_scored = logits, t_logits.to(logits.dtype)
            if logits.dim() == 3:  # a tag per token: only the positions the labels score
                keep = (labels != -100) if labels is not None else \
                    inputs["attention_mask"].bool()
                s_scored, t_scored = s_scored[keep], t_scored[keep]
            parts["distill"] = args.alpha_distill * self.logit_loss(
                s_scored, t_scored, args.temperature)
        self._add_matches(parts, student, s_features, t_features, inputs.get("attention_mask"))
        return self._total(model, parts, logits, return_outputs)

    def _teacher_features(self, inputs: dict) -> tuple:
        """The live teacher's features that the matches compare (and its outputs)."""
        # no_grad, not inference_mode: the teacher's outputs enter the student's autograd
        # graph as constants, which inference tensors are not allowed to do.
        with torch.no_grad():
            return forward_with_features(self.teacher, inputs,
                                         {(m.feature, m.teacher_layer) for m in self.matches})

    def _add_matches(self, parts: dict, student, s_features: dict, t_features: dict,
                     mask) -> None:
        """Add each match's weighted loss to ``parts`` (one entry per loss name)."""
        projections = getattr(student, PROJECTIONS, {})
        for i, m in enumerate(self.matches):
            s = s_features[m.feature, m.student_layer]
            if str(i) in projections:
                s = projections[str(i)](s)
            value = m.weight * m.spec.fn(s, t_features[m.feature, m.teacher_layer], mask,
                                         **m.options)
            parts[m.loss] = parts[m.loss] + value if m.loss in parts else value

    def _total(self, model, parts: dict[str, torch.Tensor], logits, return_outputs):
        """The sum of the weighted parts (see :meth:`_finish`)."""
        if not parts:
            raise EdgeDistillError("DistillationTrainer: batch has no labels and no teacher")
        return self._finish(model, sum(parts.values()), parts, logits, return_outputs)

    def _finish(self, model, loss, parts: dict, logits, return_outputs):
        """Stop on a non-finite loss; keep the weighted parts (tensors or floats) for the log."""
        parts = {k: float(v.detach()) if torch.is_tensor(v) else float(v)
                 for k, v in parts.items()}
        if model.training and not torch.isfinite(loss):
            self._stop_on_non_finite(parts)
        if model.training:
            for k, v in parts.items():
                self._loss_parts[k].append(v)
        return (loss, {"logits": logits}) if return_outputs else loss

    def _stop_on_non_finite(self, parts: dict[str, float]) -> None:
        """Stop before a NaN / inf loss reaches the weights: the checkpoints saved so far stay
        good, and rerunning resumes from the last one."""
        bad = ", ".join(f"{k}={v}" for k, v in parts.items() if not math.isfinite(v))
        raise EdgeDistillError(
            f"training loss is not finite at step {self.state.global_step + 1} (epoch "
            f"{self.state.epoch or 0:.2f}; {bad}); stopped before updating the weights, the "
            "checkpoints saved so far are kept: lower the learning rate or check the data, then "
            "rerun to resume")

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        """Save the student; width projections go into checkpoints (a resume needs them) but
        not into the model a user saves, which runs without them."""
        student = self.accelerator.unwrap_model(self.model)
        projections = getattr(student, PROJECTIONS, None)
        if _internal_call or projections is None:
            return super().save_model(output_dir, _internal_call)
        delattr(student, PROJECTIONS)
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            student.add_module(PROJECTIONS, projections)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Add the mean of each loss part since the last log, so a user sees what moves.
        if "loss" in logs and self._loss_parts:
            for k, values in self._loss_parts.items():
                logs[f"loss_{k}"] = round(sum(values) / len(values), 4)
            self._loss_parts.clear()
        super().log(logs, *args, **kwargs)


def _output_space(model) -> tuple[str, int]:
    """What the logits range over: a vocabulary (language models) or a label set."""
    if model.get_output_embeddings() is not None:
        return "vocabulary", model.config.vocab_size
    return "labels", model.config.num_labels
