"""``dlpipe train``: look the model's task up in the task table and run its training.

The loop itself is :mod:`dlpipe.training.loop` (shared by every supervised task); each task's data and
epochs are its declaration's hooks (:mod:`dlpipe.training.tasks`). The names below are re-exported for
callers that train one model: ``train(TrainConfig(model=...))``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dlpipe.runtime.errors import UsageError
from dlpipe.training import distributed, plots, tracking
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


# options of the shared loop's distributed and mixed-precision training, refused by tasks not on it
PARALLEL_OPTIONS = ("amp", "sync_bn", "ddp_timeout")


def final_curves(out: str | None) -> None:
    """Redraw ``curves.png`` of the run in ``out`` once more, unthrottled, as a run ends (or stops), so it
    shows every row: on rank 0 (its ``RANK``: the process group is gone by now), where ``metrics.jsonl`` is."""
    metrics = Path(out or "") / "metrics.jsonl"
    if out and distributed.is_main() and os.environ.get("RANK", "0") == "0" and metrics.is_file():
        plots.curves(metrics, force=True)


def train_command(model: str, progress: bool = True, recipe: str = "default", nproc: int | None = None,
                  nnodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str = "dlpipe", **options: Any
                  ) -> tuple[dict[str, Any], str]:
    """``dlpipe train MODEL [options]``: the task's own command (a dataset or an environment) and what it
    prints. Options its task does not take are refused by name; options not given come from the model's
    ``recipe`` (``default``: what its benchmark measured).

    With ``nproc`` (and ``nnodes`` machines meeting at ``rdzv_endpoint``) the run is started again in that
    many data-parallel processes by torch's launcher (:func:`dlpipe.training.distributed.launch`); a
    process a launcher (``torchrun``) started trains as its rank. The global batch is the per-process
    batch size times the processes.

    Raises:
        UsageError: ``recipe`` is not one of the model's recipes; distributed or mixed-precision options
            for a task that trains in one process (DQN).
    """
    spec = get_spec(model)
    spec.recipe.settings(recipe=recipe)  # an unknown recipe is refused before any data is read
    task = get_task(spec.task)
    parallel = (nproc or 1) > 1 or nnodes > 1 or distributed.launched()
    given = [k for k in PARALLEL_OPTIONS if options.get(k) not in (None, False, "off")]
    if not task.data_parallel and (parallel or given):
        what = "--nproc/torchrun" if parallel else f"--{given[0].replace('_', '-')}"
        raise UsageError(f"{model} ({task.name}) trains in a single process; {what} is for the tasks on the "
                         "shared loop (classification, segmentation, detection, captioning)")
    if not task.data_parallel:
        options = {k: v for k, v in options.items() if k not in PARALLEL_OPTIONS}
    if parallel and not distributed.launched():
        found = distributed.launch(train_command, model, nproc=nproc or 1, nnodes=nnodes,
                                   rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, progress=progress, recipe=recipe,
                                   **options)
        return found or ({"rank0": "elsewhere"}, "this node's processes finished; rank 0 (on another node) wrote "
                                                 "the checkpoint")
    track = tracking_settings(options)
    with tracking.tracked(track, options.get("out") or "runs/train") as tracker:
        try:
            result = task.command(model, progress=progress, recipe=recipe, **options)
        finally:
            final_curves(options.get("out"))
        if tracker is not None:
            tracker.summary, result["tracking"] = result, tracking.described(tracker)
    if "best" not in result and "rank" in result:  # a rank other than 0: rank 0 reports
        return result, f"rank {result['rank']} finished"
    result["recipe"] = recipe
    measured = f", as measured by {spec.recipe.benchmark}" if recipe == "default" and spec.recipe.benchmark else ""
    return result, f"{task.summary(result)}\nrecipe: {recipe}{measured}{tracked_line(result)}"


def tracking_settings(options: dict[str, Any]) -> tracking.Tracking:
    """``--log``, ``--tracking-uri`` and ``--experiment``, taken out of a command's ``options`` (the tasks do
    not take them)."""
    return tracking.Tracking(backend=options.pop("log", None) or "none", uri=options.pop("tracking_uri", None),
                             experiment=options.pop("experiment", None) or "dlpipe")


def tracked_line(result: dict[str, Any]) -> str:
    """The line a tracked run adds to its summary: where to look."""
    found = result.get("tracking")
    if not found:
        return ""
    if found["backend"] == "mlflow":
        return f"\nmlflow run {found['run_id']} at {found['where']}"
    return f"\ntensorboard --logdir {found['where']}"
