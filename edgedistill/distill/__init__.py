"""Distillation: losses, layer matching, student construction and the Trainer subclasses
(``DistillationTrainer`` builds the one for the model's kind; the causal LM's and the sentence
embedder's register themselves by being imported here)."""

from .causal_trainer import CausalLMDistillationTrainer
from .embedding_trainer import EmbeddingDistillationTrainer
from .student import make_student
from .trainer import DistillationTrainer, DistillationTrainingArguments

__all__ = ["CausalLMDistillationTrainer", "DistillationTrainer", "DistillationTrainingArguments",
           "EmbeddingDistillationTrainer", "make_student"]
