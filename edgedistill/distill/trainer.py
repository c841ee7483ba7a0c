"""DistillationTrainer: a transformers.Trainer whose loss mixes hard labels and a teacher.

Only ``compute_loss`` (and logging of the loss parts) is overridden, so everything a Trainer
does (checkpoints, resume, evaluation, DDP / FSDP / DeepSpeed through ``torchrun`` or
``accelerate launch``) works unchanged. With no teacher it trains on the labels alone, which is
how the teacher is fine-tuned and how the labels-only baseline is trained.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from ..errors import EdgeDistillError
from .features import forward_with_features
from .generations import PROMPT_LENGTH, eos_ids, pack_row, pad_id, sampling_config
from .losses import LOGIT_LOSSES, get_loss
from .losses.token import TOKEN_LOSSES, get_token_loss
from .matching import PROJECTIONS, attach_projections, check_match_spec, resolve_matches
from .teacher_cache import TOPK_INDICES, TOPK_LOGPROBS, TeacherCacheDataset, decoder_of
from .token_kd import dense_token_kd, sparse_token_kd

TEACHER_LOGITS = "teacher_logits"


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    """TrainingArguments plus the distillation settings.

    ``loss = alpha_ce * CE(student, labels) + alpha_distil * L_logit(student, teacher; T)
    + sum over matches of weight * L_match(student feature, teacher feature)``.
    """

    temperature: float = field(default=2.0, metadata={"help": "Soft-target temperature T."})
    alpha_ce: float = field(default=0.5, metadata={"help": "Weight of the hard-label loss."})
    alpha_distil: float = field(default=0.5, metadata={"help": "Weight of the soft-target loss."})
    distil_loss: str = field(default="soft_cross_entropy", metadata={"help": (
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

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
            self.evaluation_strategy = None
        if self.fp16 and not torch.cuda.is_available():
            warnings.warn("fp16=True needs a CUDA GPU and none is present; training in fp32")
            self.fp16 = False
        check_distill_settings(self)
        super().__post_init__()


def check_distill_settings(settings, prefix: str = "") -> None:
    """Validate the distillation fields of ``settings`` (training arguments or a recipe's
    ``distill`` block) as far as possible without models; ``prefix`` names where they came
    from in the error."""
    if settings.temperature <= 0:
        raise EdgeDistillError(f"{prefix}temperature: {settings.temperature} must be > 0")
    for name in ("alpha_ce", "alpha_distil"):
        if getattr(settings, name) < 0:
            raise EdgeDistillError(f"{prefix}{name}: {getattr(settings, name)} must be >= 0")
    if settings.distil_loss in TOKEN_LOSSES:  # checks the options' names and ranges too
        get_token_loss(settings.distil_loss, f"{prefix}distil_loss",
                       **(settings.loss_options or {}))
    else:
        get_loss(settings.distil_loss, {**LOGIT_LOSSES, **TOKEN_LOSSES}, f"{prefix}distil_loss")
        if settings.loss_options:
            raise EdgeDistillError(f"{prefix}loss_options: {settings.distil_loss} takes no "
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


class DistillationTrainer(Trainer):
    """Trainer that distils ``teacher_model`` into ``model``.

    Accepts ``tokenizer=`` as well as ``processing_class=``. The teacher runs in eval mode
    without gradients and is never wrapped by DDP: it only produces targets. Under FSDP2 it is
    sharded over the processes like the student (:meth:`_shard_teacher_fsdp2`). When the data
    carry a ``teacher_logits`` column (see :func:`add_teacher_logits`), those are used instead
    of running the teacher for the logit loss.
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
        self.causal = is_causal_lm(self.model)
        if self.causal:
            self._check_causal_settings(args_)
        else:
            self.logit_loss = get_loss(args_.distil_loss, LOGIT_LOSSES, "distil_loss")
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
        if args_.lmbda > 0:
            self._check_on_policy()
        # its own stream, so that the on-policy batches are the same in every run
        self._on_policy_rng = random.Random(args_.seed)
        self._on_policy_batches = 0

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

        from .student import find_blocks

        kwargs = dict(mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
                      offload_policy=plugin.cpu_offload)
        mesh = getattr(self.accelerator, "torch_device_mesh", None)
        if mesh is not None:
            kwargs["mesh"] = mesh[tuple(self.accelerator.parallelism_config.fsdp_dim_names)]
        for block in find_blocks(self.teacher)[2]:
            fully_shard(block, reshard_after_forward=True, **kwargs)
        # A causal LM's head runs after the forward pass, chunk by chunk (token_kd): its unit,
        # the root, stays gathered after the forward until _causal_loss reshards it.
        fully_shard(self.teacher, reshard_after_forward=not self.causal, **kwargs)
        return True

    def _teacher_hidden(self, inputs: dict) -> torch.Tensor:
        """The causal teacher's last hidden states (the input of its head)."""
        decoder = decoder_of(self.teacher)
        if not self.teacher_sharded:
            with torch.inference_mode():
                return decoder(**inputs).last_hidden_state
        # FSDP2 gathers a unit in hooks around its module's forward, and the first forward must
        # enter through the root: run the decoder through the teacher's own forward.
        patched = "forward" in vars(self.teacher)
        saved = self.teacher.forward
        self.teacher.forward = lambda **kw: decoder(**kw)
        try:
            with torch.no_grad():
                return self.teacher(**inputs).last_hidden_state
        finally:
            if patched:
                self.teacher.forward = saved
            else:
                del self.teacher.forward

    def _check_causal_settings(self, args_) -> None:
        if args_.distil_loss not in TOKEN_LOSSES:
            raise EdgeDistillError(
                f"distil_loss: '{args_.distil_loss}' compares classifier outputs; a causal LM "
                f"takes a token-level loss: {', '.join(TOKEN_LOSSES)}")
        if args_.matches:
            raise EdgeDistillError("matches: feature and relation losses are not supported for "
                                   "causal LMs yet; remove distill.matches")
        if args_.class_weights is not None:
            raise EdgeDistillError("class_weights: a causal LM has no classes; leave it unset")
        if args_.kd_chunk_tokens < 1:
            raise EdgeDistillError(f"kd_chunk_tokens: {args_.kd_chunk_tokens} must be >= 1")

    def _check_on_policy(self) -> None:
        if not self.causal:
            raise EdgeDistillError("lmbda: on-policy batches are for causal LMs (the student "
                                   "generates); set lmbda=0")
        if self.teacher is None or isinstance(self.train_dataset, TeacherCacheDataset):
            raise EdgeDistillError(
                "lmbda: on-policy batches need the live teacher to score what the student "
                "generates, and a teacher cache only holds its outputs on fixed rows; pass "
                "teacher_model and no cache (distill.cache_teacher: false), or set lmbda=0")

    def _check_compatible(self, student, teacher) -> None:
        """Fail before training when the two models cannot be compared at all."""
        s_vocab, t_vocab = student.config.vocab_size, teacher.config.vocab_size
        if s_vocab != t_vocab:
            raise EdgeDistillError(
                f"teacher and student vocabularies differ (teacher {t_vocab} tokens, student "
                f"{s_vocab}); both read the same token ids, so the student needs the teacher's "
                "tokenizer")
        if self.args.alpha_distil > 0:
            s_what, s_size = _output_space(student)
            t_what, t_size = _output_space(teacher)
            if (s_what, s_size) != (t_what, t_size):
                raise EdgeDistillError(
                    f"teacher and student outputs differ (teacher: {t_what} {t_size}, student: "
                    f"{s_what} {s_size}); a logit loss needs the same output space: build the "
                    "student from the teacher (make_student) or set alpha_distil=0")

    def _set_signature_columns_if_needed(self):
        # Keep a precomputed `teacher_logits` column: the Trainer drops columns the model's
        # forward() does not take.
        super()._set_signature_columns_if_needed()
        for name in (TEACHER_LOGITS, TOPK_LOGPROBS, TOPK_INDICES, PROMPT_LENGTH):
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.causal:
            return self._causal_loss(model, inputs, return_outputs)
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
        if self.teacher is not None and (self.matches or (cached is None and args.alpha_distil > 0)):
            # no_grad, not inference_mode: the teacher's outputs enter the student's autograd
            # graph as constants, which inference tensors are not allowed to do.
            with torch.no_grad():
                t_out, t_features = forward_with_features(
                    self.teacher, inputs, {(m.feature, m.teacher_layer) for m in self.matches})
            t_logits = t_out.logits if cached is None else cached
        if t_logits is not None and args.alpha_distil > 0:
            parts["distil"] = args.alpha_distil * self.logit_loss(
                logits, t_logits.to(logits.dtype), args.temperature)
        projections = getattr(student, PROJECTIONS, {})
        mask = inputs.get("attention_mask")
        for i, m in enumerate(self.matches):
            s = s_features[m.feature, m.student_layer]
            if str(i) in projections:
                s = projections[str(i)](s)
            value = m.weight * m.spec.fn(s, t_features[m.feature, m.teacher_layer], mask,
                                         **m.options)
            parts[m.loss] = parts[m.loss] + value if m.loss in parts else value

        return self._total(model, parts, logits, return_outputs)

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

    def _causal_loss(self, model, inputs, return_outputs):
        """Next-token cross-entropy plus a token-level divergence from the teacher.

        The teacher's distribution comes from its stored top-k (a batch from a teacher cache)
        or from running its decoder under inference_mode; its logits are then formed chunk by
        chunk inside the loss (see token_kd), never for the whole batch at once. In evaluation
        the loss is the plain next-token cross-entropy, so ``eval_loss`` is the log of the
        validation perplexity whatever the distillation settings.
        """
        args = self.args
        inputs = dict(inputs)
        prompt_length = inputs.pop(PROMPT_LENGTH, None)
        if model.training and args.lmbda > 0 and self._on_policy_rng.random() < args.lmbda:
            if inputs.get(TOPK_LOGPROBS) is not None:
                raise EdgeDistillError(
                    "lmbda: an on-policy batch carries cached teacher top-k, which cannot score "
                    "the student's own tokens; train without the teacher cache or set lmbda=0")
            if prompt_length is not None and bool((prompt_length > 0).any()):
                inputs = self._on_policy(model, inputs, prompt_length)
                self._on_policy_batches += 1
        labels = inputs.pop("labels")
        topk = inputs.pop(TOPK_LOGPROBS, None), inputs.pop(TOPK_INDICES, None)
        logits = model(**inputs).logits
        # position i predicts token i + 1
        s_logits, targets = logits[:, :-1], labels[:, 1:]
        mask = targets != -100
        has_teacher = self.teacher is not None or topk[0] is not None
        if not model.training or not has_teacher or args.alpha_distil == 0:
            ce = F.cross_entropy(s_logits.reshape(-1, s_logits.size(-1)), targets.reshape(-1),
                                 ignore_index=-100)
            return self._total(model, {"ce": ce}, logits, return_outputs)
        # one pass over the vocabulary for both terms: the KD loss adds the cross-entropy from
        # the same student log-softmax (see token_kd), instead of a second full softmax
        weights = dict(targets=targets, kd_weight=args.alpha_distil, ce_weight=args.alpha_ce,
                       parts={}, **(args.loss_options or {}))
        if topk[0] is not None:
            loss = sparse_token_kd(s_logits, topk[0][:, :-1], topk[1][:, :-1], mask,
                                   args.distil_loss, args.temperature, args.kd_chunk_tokens,
                                   **weights)
        else:
            try:
                hidden = self._teacher_hidden(inputs)
                loss = dense_token_kd(s_logits, hidden[:, :-1],
                                      self.teacher.get_output_embeddings(), mask,
                                      args.distil_loss, args.temperature, args.kd_chunk_tokens,
                                      **weights)
            finally:
                if self.teacher_sharded:
                    self.teacher.reshard()  # the root unit, gathered for the head
        parts = weights["parts"]
        logged = {"ce": args.alpha_ce * parts["ce"], "distil": args.alpha_distil * parts["distil"]}
        return self._finish(model, loss, logged, logits, return_outputs)

    def _on_policy(self, model, inputs: dict, prompt_length: torch.Tensor) -> dict:
        """``inputs`` with each generated row's continuation sampled anew by the student.

        GKD's on-policy step: the student continues the row's prompt (eval mode, no gradients)
        and the row is rebuilt as :func:`~edgedistill.distill.generations.teacher_generations`
        builds it; the loss then compares the student with the live teacher on those tokens.
        Rows with ``prompt_length`` 0 (ordinary text) are left as they are.
        """
        args = self.args
        student = self.accelerator.unwrap_model(model)
        ids = inputs["input_ids"]
        length = ids.shape[1]
        pad, eos = pad_id(student, self.processing_class), eos_ids(student, self.processing_class)
        rows = {k: inputs[k].clone() for k in ("input_ids", "attention_mask", "labels")}
        student.eval()
        try:
            with torch.no_grad():
                # one generate call per prompt length: prompts of one length need no padding
                for p in sorted(set(prompt_length.tolist()) - {0}):
                    new = min(args.generation_new_tokens, length - p)
                    which = (prompt_length == p).nonzero().flatten().tolist()
                    if new < 1:
                        continue
                    prompts = ids[which, :p]
                    config = sampling_config(new, args.generation_temperature,
                                             args.generation_top_p, pad, eos)
                    out = student.generate(input_ids=prompts,
                                           attention_mask=torch.ones_like(prompts),
                                           generation_config=config, use_model_defaults=False)
                    for i, seq in zip(which, out[:, p:].tolist()):
                        row = pack_row(ids[i, :p].tolist(), seq, length, pad, eos)
                        for k in rows:
                            rows[k][i] = torch.tensor(row[k], dtype=rows[k].dtype)
        finally:
            student.train()
        return {**inputs, **rows}

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
        if "loss" in logs and self.args.lmbda > 0:
            logs["on_policy_batches"] = self._on_policy_batches
        super().log(logs, *args, **kwargs)


def add_teacher_logits(dataset, teacher, collator, batch_size: int = 64):
    """Return ``dataset`` with a ``teacher_logits`` column, computed once.

    The teacher is frozen and in eval mode, so its logits for an example are the same in every
    epoch; computing them once instead of in every training step cut the default recipe's
    distillation from 228 s to 160 s (the teacher's forward pass is most of a 2-layer
    student's step). Feature losses still need the live teacher's hidden states.
    """
    from torch.utils.data import DataLoader

    device = next(teacher.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)
    rows = []
    teacher.eval()
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            rows += teacher(**batch).logits.float().cpu().tolist()
    return dataset.add_column(TEACHER_LOGITS, rows)


def is_causal_lm(model) -> bool:
    """Whether ``model`` (possibly wrapped by DDP) is a transformers causal language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model = getattr(model, "module", model)
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _output_space(model) -> tuple[str, int]:
    """What the logits range over: a vocabulary (language models) or a label set."""
    if model.get_output_embeddings() is not None:
        return "vocabulary", model.config.vocab_size
    return "labels", model.config.num_labels
