"""The library behind ``dlpipe predict``: list the inputs, skip those already in the output, run the rest on
an engine (apps/batch/engines.py) and write the rows in durable chunks (apps/batch/results.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dlpipe.apps.batch.engines import ENGINES, row_builder
from dlpipe.apps.batch.inputs import list_inputs
from dlpipe.apps.batch.results import open_results
from dlpipe.runtime import load
from dlpipe.runtime.errors import UsageError


def _task_params(top_k: int, threshold: float, beam: int | None) -> dict[str, str]:
    """The options of every task's row function (apps/task_rows.py), as the strings it parses."""
    params = {"top_k": str(top_k), "threshold": str(threshold)}
    if beam is not None:
        params["beam"] = str(beam)
    return params


def predict_batch(model: str | Path, inputs: str | Path, out: str | Path, *, column: str | None = None,
                  batch_size: int = 64, workers: int | None = None, engine: str = "local",
                  address: str | None = None, device: str = "auto", top_k: int = 3, threshold: float = 0.5,
                  beam: int | None = None, max_pixels: int | None = None, chunk_size: int = 1000,
                  progress: bool = True, stop_after_chunks: int | None = None) -> dict[str, Any]:
    """Run ``model`` over ``inputs`` and append one row per input to ``out`` (``.parquet`` or ``.jsonl``):
    the input's name (``image``) and the task's outputs, or its ``error``. Inputs already in ``out`` are
    skipped, so re-running a killed run finishes it.

    Args:
        inputs: A folder (searched recursively), a list file of paths, or a ``.parquet`` table.
        column: The Parquet table's column of image bytes or paths (default: ``image``, ``bytes`` or ``path``).
        batch_size: Images per model run.
        workers: Runtime sessions (local threads or Ray actors; default: one per core).
        engine: ``local`` (this process) or ``ray`` (Ray Data; ``address`` names a cluster).
        top_k, threshold, beam: The classifier's, detector's and captioner's options.
        chunk_size: Rows per durable write (a kill loses at most the rows not yet written, which a re-run redoes).
        stop_after_chunks: Stop after writing this many chunks (a test of resuming; None: run to the end).

    Returns:
        A summary: the output, the task, inputs in all, skipped as already done, rows written now, errors
        among them, seconds and images per second.

    Raises:
        UsageError: a bad option (suffix of ``out``, engine, ``column``), a model of a task without images.
        InputError: ``inputs`` missing or unreadable. ModelFileError: a bad model file.
    """
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if address and engine != "ray":
        raise UsageError("--address names a Ray cluster; use it with --engine ray")
    results = open_results(out)
    found = list_inputs(inputs, column)
    predictor = load(model, device=device)  # fail early on a bad model, before any engine starts
    row_builder(predictor)
    done = results.done()
    pending = found.select([i for i, name in enumerate(found.names) if name not in done])
    workers = workers or os.cpu_count() or 1
    options = dict(batch_size=batch_size, workers=workers, device=device, max_pixels=max_pixels,
                   params=_task_params(top_k, threshold, beam))
    if engine == "ray":
        options["address"] = address
    written = errors = chunks = 0
    buffer: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(found), initial=len(found) - len(pending), unit="img", disable=not progress,
               desc=f"predict ({engine})")
    try:
        batches = ENGINES[engine](str(model), pending, **options) if len(pending) else iter(())
        for rows in batches:
            buffer.extend(rows)
            bar.update(len(rows))
            if len(buffer) >= chunk_size:
                results.write(buffer)
                written, errors, chunks = written + len(buffer), errors + _errors(buffer), chunks + 1
                buffer = []
                if stop_after_chunks is not None and chunks >= stop_after_chunks:
                    batches.close()
                    break
        if buffer:
            results.write(buffer)
            written, errors = written + len(buffer), errors + _errors(buffer)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return {"out": str(out), "model": str(model), "task": predictor.info.task, "engine": engine,
            "workers": workers, "batch_size": batch_size, "inputs": len(found), "skipped": len(found) - len(pending),
            "written": written, "errors": errors, "complete": len(found) - len(pending) + written == len(found),
            "seconds": round(seconds, 3), "images_per_s": round(written / seconds, 1) if seconds > 0 else None}


def _errors(rows: list[dict[str, Any]]) -> int:
    return sum("error" in row for row in rows)
