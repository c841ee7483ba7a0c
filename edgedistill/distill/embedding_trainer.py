"""The trainer of a sentence embedder: the student's pooled embedding learns the teacher's.

Built by ``DistillationTrainer(model=...)`` when the model carries a pooling in its config
(:mod:`edgedistill.pooling`; the sentence-embedding task puts it there when it loads a
model). The teacher's embeddings come precomputed in the ``teacher_embedding`` column
(:func:`.teacher_outputs.teacher_embeddings`), which also serves as the label of evaluation:
the validation score is the mean cosine between the student's embeddings and the teacher's.
A live teacher is needed only for layer matches (``distill.matches``). A student narrower than
its teacher learns with a loss that compares similarities (not in ``POINTWISE``).
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgeDistillError
from ..evaluation import embedding_metrics
from ..pooling import carried, pool, write_sentence_transformers_files
from .features import forward_with_features
from .losses import POINTWISE, embedding_loss, embedding_losses
from .teacher_outputs import TEACHER_EMBEDDING
from .trainer import DistillationTrainer


def check_embedding_settings(settings, prefix: str = "") -> None:
    """What distilling a sentence embedder refuses, on training arguments or a recipe's
    ``distill`` block (the task's preflight and the trainer both call this)."""
    if settings.distill_loss not in embedding_losses():
        raise EdgeDistillError(
            f"{prefix}distill_loss: '{settings.distill_loss}' does not compare sentence "
            f"embeddings; a sentence embedder takes one of {', '.join(embedding_losses())} "
            "(embedding_mse learns the teacher's vectors)")
    if settings.alpha_distill <= 0:
        raise EdgeDistillError(f"{prefix}alpha_distill: {settings.alpha_distill}; a sentence "
                               "embedder learns from the teacher's embeddings alone: set it > 0")
    if getattr(settings, "lmbda", 0.0) > 0:
        raise EdgeDistillError(f"{prefix}lmbda: on-policy batches are for causal LMs; set 0")
    if settings.class_weights not in (None, "none"):
        raise EdgeDistillError(f"{prefix}class_weights: a sentence embedder has no classes; "
                               "leave it unset")


def embedding_agreement(prediction) -> dict:
    """The validation scores, from the student's embeddings (predictions) and the teacher's
    (the label column) as compute_metrics receives them: the Spearman correlation of the two
    models' similarities of pairs of texts (the score that chooses the epoch, whatever the two
    widths), and the mean cosine of each text's two embeddings where the widths match."""
    s, t = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
    scores = embedding_metrics(s, t, k=1)
    return {k: scores[k] for k in ("spearman", "cosine") if scores[k] is not None}


class EmbeddingDistillationTrainer(DistillationTrainer):
    """``loss = alpha_distill * L(pool(student), teacher embedding) + sum of matches``."""

    @staticmethod
    def handles(model) -> bool:
        config = getattr(getattr(model, "module", model), "config", None)
        return config is not None and carried(config) is not None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pooling = carried(self.model.config)
        # the teacher's embedding is the label an evaluation compares the student with
        self.label_names = [TEACHER_EMBEDDING]

    def _check_settings(self, args_) -> None:
        check_embedding_settings(args_)
        self.embedding_loss = embedding_loss(args_.distill_loss)

    def _check_compatible(self, student, teacher) -> None:
        # the live teacher serves layer matches: both read the same token ids
        if student.config.vocab_size != teacher.config.vocab_size:
            raise EdgeDistillError("distill.matches compare the two models token by token and "
                                   "their vocabularies differ; drop distill.matches")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if TEACHER_EMBEDDING not in self._signature_columns:
            self._signature_columns.append(TEACHER_EMBEDDING)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        target = inputs.pop(TEACHER_EMBEDDING, None)
        if target is None:
            raise EdgeDistillError(f"the training set has no {TEACHER_EMBEDDING} column: "
                                   "compute it with teacher_outputs.teacher_embeddings")
        student = self.accelerator.unwrap_model(model)
        outputs, s_features = forward_with_features(
            model, inputs, {(m.feature, m.student_layer) for m in self.matches}, student)
        mask = inputs["attention_mask"]
        embedding = pool(outputs.last_hidden_state, mask, self.pooling)
        if embedding.shape[-1] != target.shape[-1] and self.args.distill_loss in POINTWISE:
            raise EdgeDistillError(
                f"the student's embeddings have {embedding.shape[-1]} dimensions, the "
                f"teacher's {target.shape[-1]}; {self.args.distill_loss} compares them "
                "coordinate by coordinate: use a student of the teacher's width, or a loss "
                "that compares similarities (embedding_similarity)")
        parts = {"distill": self.args.alpha_distill * self.embedding_loss(
            embedding, target.to(embedding.dtype))}
        if self.matches:
            _, t_features = self._teacher_features(inputs)
            self._add_matches(parts, student, s_features, t_features, mask)
        return self._finish(model, sum(parts.values()), parts, embedding, return_outputs)

    def save_model(self, output_dir=None, _internal_call: bool = False):
        """Save the student as a transformers model that sentence-transformers loads too."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            config = self.accelerator.unwrap_model(self.model).config
            length = min(getattr(self.processing_class, "model_max_length", 512),
                         config.max_position_embeddings)
            write_sentence_transformers_files(output_dir or self.args.output_dir, self.pooling,
                                              config.hidden_size, length)
