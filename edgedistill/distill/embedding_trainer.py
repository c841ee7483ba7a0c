"""The trainer of a sentence embedder: the student's pooled embedding learns the teacher's.

Built by ``DistillationTrainer(model=...)`` when the model carries a pooling in its config
(:mod:`edgedistill.pooling`; the sentence-embedding task puts it there when it loads a
model). The teacher's embeddings come precomputed in the ``teacher_embedding`` column
(:func:`.teacher_outputs.teacher_embeddings`), which also serves as the label of evaluation:
the validation score is the mean cosine between the student's embeddings and the teacher's.
A live teacher is needed only for layer matches (``distill.matches``). A student of another
width than its teacher learns either with a loss that compares similarities (not in
``POINTWISE``), in its own width, or with a pointwise loss through a projection onto the
teacher's width that the trainer adds (a sentence-transformers Dense layer, exported with it).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import EdgeDistillError
from ..evaluation import embedding_metrics
from ..pooling import (
    DENSE,
    Pooling,
    attach_dense,
    carried,
    carry,
    dense_apart,
    pool,
    write_sentence_files,
)
from .features import forward_with_features
from .losses import POINTWISE, embedding_loss, embedding_losses
from .teacher_outputs import TEACHER_EMBEDDING
from .trainer import DistillationTrainer

# training texts whose embeddings fit a new projection's starting weights (least squares)
LEAST_SQUARES_ROWS = 4096


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
        self._fit_width()

    def _fit_width(self) -> None:
        """Give the student the Dense layer its loss needs. A Dense layer that does not take
        the student's width goes (a random or width-pruned student of a teacher that has one
        keeps its config, not a layer that fits). Then, under a pointwise loss, a student whose
        embeddings are not of the teacher's width gets a new projection onto it (a linear
        Dense layer, replacing any it had), as sentence-transformers' model distillation adds
        one: the student's embeddings then live in the teacher's space, so an index the
        teacher built answers the student's queries."""
        student = self.accelerator.unwrap_model(self.model)
        width, dense = student.config.hidden_size, getattr(student, DENSE, None)
        plain = Pooling(self.pooling.mode, self.pooling.normalize)  # no Dense layer
        if self.pooling.dense and (dense is None or dense.in_features != width):
            if dense is not None:
                delattr(student, DENSE)
            self.pooling = plain
        target = None
        if TEACHER_EMBEDDING in getattr(self.train_dataset, "column_names", []):
            target = len(self.train_dataset[0][TEACHER_EMBEDDING])
        if (target and (self.pooling.dense or width) != target
                and self.args.distill_loss in POINTWISE):
            self.pooling = replace(plain, dense=target)
            attach_dense(student, self.pooling)
            self._least_squares_start(student)
        carry(student.config, self.pooling)

    def _check_settings(self, args_) -> None:
        check_embedding_settings(args_)
        self.embedding_loss = embedding_loss(args_.distill_loss)

    def _check_compatible(self, student, teacher) -> None:
        # the live teacher serves layer matches: both read the same token ids
        if student.config.vocab_size != teacher.config.vocab_size:
            raise EdgeDistillError("distill.matches compare the two models token by token and "
                                   "their vocabularies differ; drop distill.matches")

    def _least_squares_start(self, student) -> None:
        """Start a new projection at the linear map that best carries the student's pooled
        embeddings of (up to ``LEAST_SQUARES_ROWS``) training texts onto the teacher's, by
        least squares with a bias, instead of at random: the loss then trains a student whose
        vectors are already near the teacher's. all-MiniLM-L6-v2 under all-mpnet-base-v2 (6,000
        tweets) starts at cosine 0.82 to the teacher's vectors this way, and after two epochs of
        embedding_cosine its validation recall@10 is 0.578 (cosine 0.843) against 0.520 (0.799)
        from a random start trained at 20 times the learning rate. A few seconds of the
        student's forward pass; done again on a resume (the checkpoint's weights then replace
        it)."""
        import torch
        from torch.utils.data import DataLoader

        rows = self.train_dataset.select(range(min(LEAST_SQUARES_ROWS, len(self.train_dataset))))
        # the columns the model and the loss read, as the Trainer keeps them for training
        loader = DataLoader(self._remove_unused_columns(rows), batch_size=64,
                            collate_fn=self.data_collator)
        bare = replace(self.pooling, dense=None, normalize=False)  # what the layer receives
        found, wanted = [], []
        was_training = student.training
        student.eval()
        with torch.no_grad():
            for batch in loader:
                target = batch.pop(TEACHER_EMBEDDING)
                batch = {k: v.to(self.args.device) for k, v in batch.items()}
                hidden = student(**batch).last_hidden_state
                found.append(pool(hidden, batch["attention_mask"], bare).float().cpu())
                wanted.append(target.float())
        student.train(was_training)
        x = torch.cat(found)
        x = torch.cat([x, torch.ones(len(x), 1)], 1)
        solution = torch.linalg.lstsq(x, torch.cat(wanted)).solution  # (width + 1, target)
        layer = getattr(student, DENSE)
        with torch.no_grad():
            layer.weight.copy_(solution[:-1].T)
            layer.bias.copy_(solution[-1])

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
        embedding = pool(outputs.last_hidden_state, mask, self.pooling,
                         getattr(student, DENSE, None))
        if embedding.shape[-1] != target.shape[-1] and self.args.distill_loss in POINTWISE:
            raise EdgeDistillError(
                f"the student's embeddings have {embedding.shape[-1]} dimensions, the "
                f"teacher's {target.shape[-1]}; {self.args.distill_loss} compares them "
                "coordinate by coordinate and the student has no projection onto the "
                "teacher's width (the trainer adds one when it is built on the training "
                "set); or use a loss that compares similarities (embedding_similarity)")
        parts = {"distill": self.args.alpha_distill * self.embedding_loss(
            embedding, target.to(embedding.dtype))}
        if self.matches:
            _, t_features = self._teacher_features(inputs)
            self._add_matches(parts, student, s_features, t_features, mask)
        return self._finish(model, sum(parts.values()), parts, embedding, return_outputs)

    def save_model(self, output_dir=None, _internal_call: bool = False):
        """Save the student as a transformers model that sentence-transformers loads too. A
        Dense layer goes into checkpoints with the encoder's weights (a resume needs it), and
        into its own module folder in the model a user saves."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        student = self.accelerator.unwrap_model(self.model)
        with dense_apart(student) as dense:
            super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            write_sentence_files(output_dir or self.args.output_dir, student,
                                 self.processing_class, dense)
