"""Distilling a causal language model: next-token cross-entropy plus a token-level divergence
from the teacher, from its live hidden states or a stored top-k, and on-policy batches (GKD)
the student continues itself."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..errors import EdgeDistillError
from .teacher_cache import TOPK_INDICES, TOPK_LOGPROBS, TeacherCacheDataset, decoder_of
from .teacher_generations import (
    PROMPT_LENGTH,
    eos_ids,
    pack_row,
    pad_id,
    sampling_config,
)
from .teacher_outputs import is_causal_lm
from .token_kd import dense_token_kd, sparse_token_kd
from .trainer import DistillationTrainer, check_causal_lm_settings


class CausalLMDistillationTrainer(DistillationTrainer):
    """The trainer ``DistillationTrainer(model=<a causal LM>, ...)`` builds."""

    reshard_teacher_root = False  # the head runs after the forward: token_kd reshards it

    @staticmethod
    def handles(model) -> bool:
        return is_causal_lm(model)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.lmbda > 0:
            self._check_on_policy()
        # its own stream, so that the on-policy batches are the same in every run
        self._on_policy_rng = random.Random(self.args.seed)
        self._on_policy_batches = 0

    def _check_settings(self, args_) -> None:
        if not is_causal_lm(self.model):
            raise EdgeDistillError(f"{type(self).__name__}: {type(self.model).__name__} is not a "
                                   "causal LM; train it with DistillationTrainer")
        check_causal_lm_settings(args_)

    def _check_on_policy(self) -> None:
        if self.teacher is None or isinstance(self.train_dataset, TeacherCacheDataset):
            raise EdgeDistillError(
                "lmbda: on-policy batches need the live teacher to score what the student "
                "generates, and a teacher cache only holds its outputs on fixed rows; pass "
                "teacher_model and no cache (distill.cache_teacher: false), or set lmbda=0")

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
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
        if not model.training or not has_teacher or args.alpha_distill == 0:
            ce = F.cross_entropy(s_logits.reshape(-1, s_logits.size(-1)), targets.reshape(-1),
                                 ignore_index=-100)
            return self._total(model, {"ce": ce}, logits, return_outputs)
        # one pass over the vocabulary for both terms: the KD loss adds the cross-entropy from
        # the same student log-softmax (see token_kd), instead of a second full softmax
        weights = dict(targets=targets, kd_weight=args.alpha_distill, ce_weight=args.alpha_ce,
                       parts={}, **(args.loss_options or {}))
        if topk[0] is not None:
            loss = sparse_token_kd(s_logits, topk[0][:, :-1], topk[1][:, :-1], mask,
                                   args.distill_loss, args.temperature, args.kd_chunk_tokens,
                                   **weights)
        else:
            try:
                hidden = self._teacher_hidden(inputs)
                loss = dense_token_kd(s_logits, hidden[:, :-1],
                                      self.teacher.get_output_embeddings(), mask,
                                      args.distill_loss, args.temperature, args.kd_chunk_tokens,
                                      **weights)
            finally:
                if self.teacher_sharded:
                    self.teacher.reshard()  # the root unit, gathered for the head
        parts = weights["parts"]
        logged = {"ce": args.alpha_ce * parts["ce"], "distill": args.alpha_distill * parts["distill"]}
        return self._finish(model, loss, logged, logits, return_outputs)

    def _on_policy(self, model, inputs: dict, prompt_length: torch.Tensor) -> dict:
        """``inputs`` with each generated row's continuation sampled anew by the student.

        GKD's on-policy step: the student continues the row's prompt (eval mode, no gradients)
        and the row is rebuilt as :func:`~edgedistill.distill.teacher_generations.teacher_generations`
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

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.args.lmbda > 0:
            logs["on_policy_batches"] = self._on_policy_batches
        super().log(logs, *args, **kwargs)
