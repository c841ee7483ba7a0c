"""Distillation: losses, layer matching, student construction and the Trainer subclass."""

from .student import make_student
from .trainer import DistillationTrainer, DistillationTrainingArguments

__all__ = ["DistillationTrainer", "DistillationTrainingArguments", "make_student"]
