"""Task plug-ins: one module per task, registered here by the name a recipe's ``task:`` uses.

Adding a task is one module with a :class:`~.base.Task` subclass and one
:func:`register_task` call (see docs/architecture.md)."""

from __future__ import annotations

import difflib

from ..errors import EdgeDistillError
from .base import Column, ReportView, Task
from .causal_lm import CausalLMTask
from .classification import ClassificationTask

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` available to recipes as ``task: <task.name>``."""
    if not task.name:
        raise EdgeDistillError(f"{type(task).__name__}: a task needs a name")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise EdgeDistillError(f"task: '{name}' is unknown; {hint}valid: {', '.join(TASKS)}")
    return TASKS[name]


register_task(ClassificationTask())
register_task(CausalLMTask())

__all__ = ["Column", "ReportView", "TASKS", "Task", "get_task", "register_task"]
