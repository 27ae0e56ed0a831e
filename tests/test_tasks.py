"""The task table: every model's task is declared once, with every hook each stage runs."""

from __future__ import annotations

import dataclasses

import pytest

from dlpipe.runtime.errors import InputError
from dlpipe.runtime.predictors import PACKAGES, PREDICTORS
from dlpipe.training.registry import get_spec, list_models
from dlpipe.training.tasks import TASKS, Task, get_task, register_task


def test_every_registered_model_has_a_declared_task():
    missing = {name: get_spec(name).task for name in list_models() if get_spec(name).task not in TASKS}
    assert not missing, missing
    assert {get_spec(name).task for name in list_models()} == set(TASKS)  # and no task without a model


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_declares_every_stage(name):
    task = TASKS[name]
    assert task.name == name and task.description and task.metric.key and task.metric.name
    for hook in ("train", "command", "summary", "graphs", "evaluate", "metadata"):
        assert callable(getattr(task, hook)), hook
    assert callable(task.quantization.inputs) and callable(task.quantization.agreement)
    # the runtime serves the task with the predictor the declaration names (packages by their manifest's task)
    assert {**PACKAGES, **PREDICTORS}[name] is task.predictor
    if task.demo is not None:
        assert get_spec(task.demo.model).task == name and task.demo.app and callable(task.demo.describe)


def test_unknown_task_is_a_clear_error_naming_the_known_ones():
    with pytest.raises(InputError, match="unknown task 'painting'.*classification.*control"):
        get_task("painting")


def test_a_task_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_task(dataclasses.replace(TASKS["classification"]))
    assert isinstance(TASKS["detection"], Task) and not TASKS["detection"].batched


def test_a_reported_figure_reads_the_tasks_metric():
    assert TASKS["segmentation"].describe({"miou": 0.5, "accuracy": 0.9}) == "mean IoU 0.5000, pixel accuracy 90.00%"
    assert TASKS["classification"].describe({"acc": 0.25}) == "accuracy 25.00%"
