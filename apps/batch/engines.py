"""The two ways ``dlpipe predict`` runs batches: in this process on a pool of runtime sessions (``local``),
or on Ray Data with one runtime session per actor (``ray``). Both decode and answer a batch with the same
function (:func:`batch_rows`), so their rows are the same."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np

from dlpipe.apps.batch.inputs import Inputs, decode
from dlpipe.apps.task_rows import TASK_ROWS
from dlpipe.runtime import load
from dlpipe.runtime.errors import UsageError
from dlpipe.runtime.predictors import Predictor

Rows = list[dict[str, Any]]


def row_builder(predictor: Predictor):
    """The task's row function for ``predictor`` (apps/task_rows.py).

    Raises:
        UsageError: a task that answers no images (a control policy).
    """
    run = TASK_ROWS.get(predictor.info.task)
    if run is None:
        raise UsageError(f"'{predictor.path}' is a {predictor.info.task} model; dlpipe predict runs "
                         f"{', '.join(TASK_ROWS)} models over images")
    return run


def batch_rows(predictor: Predictor, names: list[str], sources: Sequence[str | bytes], params: dict[str, str],
               max_pixels: int | None) -> Rows:
    """Decode a batch of inputs and answer it: one row per input, in order (an unreadable one: its error)."""
    pictures = [decode(name, source, max_pixels) for name, source in zip(names, sources)]
    return row_builder(predictor)(predictor, names, pictures, params)


def session_threads(workers: int) -> int:
    """Intra-op threads per session: the cores shared out, so that the sessions do not oversubscribe them."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_local(model: str, inputs: Inputs, *, batch_size: int, workers: int, device: str,
              params: dict[str, str], max_pixels: int | None) -> Iterator[Rows]:
    """Rows of the inputs, a batch at a time in input order, from ``workers`` threads each holding its own
    runtime session. Each thread decodes its batch and runs it, so one batch's decoding overlaps another's
    inference (Pillow's decoders and onnxruntime release the GIL); at most two batches per worker wait."""
    local = threading.local()
    threads = session_threads(workers)

    def work(start: int) -> Rows:
        if not hasattr(local, "predictor"):
            local.predictor = load(model, device=device, threads=threads)
        stop = start + batch_size
        return batch_rows(local.predictor, inputs.names[start:stop], inputs.sources[start:stop], params,
                          max_pixels)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dlpipe-predict")
    waiting: deque = deque()
    try:
        for start in range(0, len(inputs), batch_size):
            waiting.append(pool.submit(work, start))
            if len(waiting) >= 2 * workers:
                yield waiting.popleft().result()
        while waiting:
            yield waiting.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class RayBatchRows:
    """A Ray Data actor: one runtime session, answering numpy batches of ``image``/``path``/``data`` columns
    with a ``row`` column of JSON rows (nested rows are not numpy columns; JSON round-trips floats exactly)."""

    def __init__(self, model: str, device: str, threads: int, params: dict[str, str], max_pixels: int | None):
        self.predictor = load(model, device=device, threads=threads)
        self.params = params
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [str(n) for n in batch["image"]]
        sources = [str(p) if p else bytes(d) for p, d in zip(batch["path"], batch["data"])]
        rows = batch_rows(self.predictor, names, sources, self.params, self.max_pixels)
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object)}


def _start_ray(address: str | None, workers: int) -> bool:
    """Connect to the cluster at ``address``, or start a local Ray on 127.0.0.1 without a dashboard.
    Returns whether this call started it (and so should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    else:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 _node_ip_address="127.0.0.1")
    return True


def run_ray(model: str, inputs: Inputs, *, batch_size: int, workers: int, device: str, params: dict[str, str],
            max_pixels: int | None, address: str | None = None) -> Iterator[Rows]:
    """Rows of the inputs from Ray Data: ``from_items`` -> ``map_batches`` on an actor pool of ``workers``
    :class:`RayBatchRows` (numpy batches), rows streamed back to this process as they finish (in no set
    order). The same code runs on a local Ray and on a cluster (``address``, e.g. ``ray://head:10001``;
    there the paths must be readable on every node and dlpipe installed).

    Files are read by dlpipe's decoder in the actors rather than by ``ray.data.read_images``: it keeps the
    pixel limit, EXIF orientation and 16-bit scaling of the other commands, and a damaged file becomes an
    error row instead of failing the whole dataset.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError("--engine ray needs Ray Data: pip install 'dlpipe[ray]'") from None
    started = _start_ray(address, workers)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # dlpipe's own bar counts the rows written
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run INFO lines would break the bar
        items = [{"image": name, "path": source if isinstance(source, str) else "",
                  "data": source if isinstance(source, bytes) else b""}
                 for name, source in zip(inputs.names, inputs.sources)]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size, 200)))
        answered = dataset.map_batches(
            RayBatchRows, fn_constructor_kwargs={"model": str(model), "device": device, "threads": 1,
                                                 "params": params, "max_pixels": max_pixels},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1, num_gpus=1 if device == "cuda" else None)
        for batch in answered.iter_batches(batch_size=None, batch_format="numpy"):
            yield [json.loads(text) for text in batch["row"]]
    finally:
        if started:
            ray.shutdown()


ENGINES = {"local": run_local, "ray": run_ray}
