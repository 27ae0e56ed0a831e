"""The task table: one declaration per task (:class:`~dlpipe.training.tasks.base.Task`), looked up by name.

Every stage asks this table what a task needs — its training on the shared loop, the graphs it exports
and their example inputs, its quantization policy, its evaluation, its runtime predictor and its demo —
and names no task itself. Adding a task is one module here that declares a ``TASK`` and one line below.
"""

from __future__ import annotations

from dlpipe.runtime.errors import InputError
from dlpipe.training.tasks import captioning, classification, control, detection, generation, segmentation
from dlpipe.training.tasks import features
from dlpipe.training.tasks import stylization
from dlpipe.training.tasks import reconstruction
from dlpipe.training.tasks.base import DemoRow, Graph, QuantizationPolicy, Task

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to the table; a second task of the same name is a programming error."""
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task called ``name`` (the ``task`` of a model, checkpoint or ONNX file).

    Raises:
        InputError: a task this version of dlpipe does not know, with the list of those it does.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"unknown task {name!r}; dlpipe serves {', '.join(TASKS)}") from None


for _module in (classification, segmentation, detection, captioning, control, features, generation, stylization,
                reconstruction):
    register_task(_module.TASK)

__all__ = ["TASKS", "Task", "Graph", "QuantizationPolicy", "DemoRow", "get_task", "register_task"]
