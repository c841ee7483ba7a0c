"""The trainer of an extractive question answerer: the student learns where the teacher puts
an answer's first and last token.

Built by ``DistillationTrainer(model=...)`` for a ``*ForQuestionAnswering`` model. Each
training row is one window of a context with the question in front (see
:mod:`edgedistill.tasks.question_answering`); its labels are ``start_positions`` and
``end_positions`` (0, the first token, when the answer is not inside the window, as
transformers' own question-answering examples do). The teacher runs live: its targets are two
distributions over the window's tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .features import forward_with_features
from .trainer import DistillationTrainer

# the span of each row, stacked as (batch, 2, tokens): start and end logits
SPAN_LOGITS = ("start_logits", "end_logits")
SPAN_LABELS = ("start_positions", "end_positions")
# a padded token's logit in both models' distributions: it takes no probability in either
# (a question answerer's head scores padding too; it is not a place an answer can be)
_PADDING = -1e4


def span_logits(outputs) -> torch.Tensor:
    """A question answerer's start and end logits as one (batch, 2, tokens) tensor."""
    return torch.stack([outputs[name] for name in SPAN_LOGITS], 1)


class QuestionAnsweringDistillationTrainer(DistillationTrainer):
    """``loss = alpha_ce * CE(span, gold span) + alpha_distill * L(span, teacher span; T)
    + sum of matches``, each averaged over the start and the end distribution."""

    @staticmethod
    def handles(model) -> bool:
        return type(getattr(model, "module", model)).__name__.endswith("ForQuestionAnswering")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args, inputs = self.args, dict(inputs)
        gold = [inputs.pop(name, None) for name in SPAN_LABELS]
        student = self.accelerator.unwrap_model(model)
        outputs, s_features = forward_with_features(
            model, inputs, {(m.feature, m.student_layer) for m in self.matches}, student)
        span, mask = span_logits(outputs), inputs["attention_mask"]
        parts: dict[str, torch.Tensor] = {}
        if gold[0] is not None:
            ce = F.cross_entropy(span.flatten(0, 1), torch.stack(gold, 1).flatten())
            parts["ce"] = args.alpha_ce * ce if self.teacher is not None else ce
        t_features = {}
        if self.teacher is not None and (self.matches or args.alpha_distill > 0):
            t_out, t_features = self._teacher_features(inputs)
            if args.alpha_distill > 0:
                padding = ~mask.bool().unsqueeze(1)
                s = span.masked_fill(padding, _PADDING).flatten(0, 1)
                t = span_logits(t_out).to(span.dtype).masked_fill(padding, _PADDING).flatten(0, 1)
                parts["distill"] = args.alpha_distill * self.logit_loss(s, t, args.temperature)
        self._add_matches(parts, student, s_features, t_features, mask)
        return self._total(model, parts, span, return_outputs)
