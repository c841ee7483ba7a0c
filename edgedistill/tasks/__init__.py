"""Task plug-ins: one module per task, registered here by the name a recipe's ``task:`` uses.

Adding a task is one module with a :class:`~.base.Task` subclass and one
:func:`register_task` call (see docs/architecture.md)."""

from __future__ import annotations

import difflib

from ..errors import EdgeDistillError
from .base import Column, ReportView, Task
from .causal_lm import CausalLMTask
from .classification import ClassificationTask
from .question_answering import QuestionAnsweringTask
from .sentence_embedding import SentenceEmbeddingTask
from .token_classification import TokenClassificationTask

TASKS: dict[str, Task] = {}


# what a task must say itself: the base class has no answer for these
REQUIRED = ("selection", "training_sets", "evaluate", "bench")


def register_task(task: Task, replace: bool = False) -> Task:
    """Make ``task`` available to recipes as ``task: <task.name>``; what it lacks is refused
    here, not after its stages have run."""
    kind = type(task).__name__
    if not task.name:
        raise EdgeDistillError(f"{kind}: a task needs a name")
    if task.name in TASKS and not replace:
        raise EdgeDistillError(f"task '{task.name}' is registered already "
                               f"({type(TASKS[task.name]).__name__}); pass replace=True")
    missing = [m for m in REQUIRED if getattr(type(task), m) is getattr(Task, m)]
    if missing or task.auto_model is None or not isinstance(getattr(task, "report", None),
                                                            ReportView):
        raise EdgeDistillError(f"{kind}: a task defines {', '.join(REQUIRED)}, auto_model and "
                               f"a ReportView as report (missing: "
                               f"{', '.join(missing) or 'auto_model or report'})")
    headers = [c.header for c in task.report.columns]
    unknown = [h for h in task.report.summary if h not in headers]
    if unknown:
        raise EdgeDistillError(f"{kind}: report.summary names {', '.join(unknown)}, which are "
                               f"not among its columns ({', '.join(headers)})")
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
register_task(SentenceEmbeddingTask())
register_task(TokenClassificationTask())
register_task(QuestionAnsweringTask())

__all__ = ["Column", "ReportView", "TASKS", "Task", "get_task", "register_task"]
