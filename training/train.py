"""``dlpipe train``: look the model's task up in the task table and run its training.

The loop itself is :mod:`dlpipe.training.loop` (shared by every supervised task); each task's data and
epochs are its declaration's hooks (:mod:`dlpipe.training.tasks`). The names below are re-exported for
callers that train one model: ``train(TrainConfig(model=...))``.
"""

from __future__ import annotations

from typing import Any

from dlpipe.training.loop import (INITS, OPTIMIZERS, SCHEDULES, TrainConfig, build_optimizer, build_scheduler,
                                  init_weights, resolve_config)
from dlpipe.training.registry import get_spec
from dlpipe.training.tasks import get_task
from dlpipe.training.tasks.classification import evaluate, mean_iou, train_one_epoch

__all__ = ["train", "train_command", "TrainConfig", "OPTIMIZERS", "INITS", "SCHEDULES", "build_optimizer",
           "build_scheduler", "init_weights", "resolve_config", "train_one_epoch", "evaluate", "mean_iou"]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` as its task trains; write best.pt, last.pt and metrics.jsonl under ``cfg.out``.

    Returns:
        The task's summary: checkpoint paths, the metric and its best validation score, the test figures
        (``test_<key>``) and the history.
    """
    return get_task(get_spec(cfg.model).task).train(cfg)


def train_command(model: str, progress: bool = True, recipe: str = "default", **options: Any
                  ) -> tuple[dict[str, Any], str]:
    """``dlpipe train MODEL [options]``: the task's own command (a dataset or an environment) and what it
    prints. Options its task does not take are refused by name; options not given come from the model's
    ``recipe`` (``default``: what its benchmark measured).

    Raises:
        UsageError: ``recipe`` is not one of the model's recipes.
    """
    spec = get_spec(model)
    spec.recipe.settings(recipe=recipe)  # an unknown recipe is refused before any data is read
    task = get_task(spec.task)
    result = task.command(model, progress=progress, recipe=recipe, **options)
    result["recipe"] = recipe
    measured = f", as measured by {spec.recipe.benchmark}" if recipe == "default" and spec.recipe.benchmark else ""
    return result, f"{task.summary(result)}\nrecipe: {recipe}{measured}"
