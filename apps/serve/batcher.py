"""Dynamic batching with Triton's semantics, one batcher per served model.

Requests queue (a bounded queue: a full one refuses at once). A free session takes the head request and
every later one of the same shapes, up to ``max_batch_size`` rows (a request of several rows counts by its
rows). When a preferred batch size can be formed, the largest one runs at once; when the batch is full it
runs at once; otherwise it waits for more until the head request has waited ``max_queue_delay_ms``, then
runs what it has. With ``idle_run`` (the default) a model with no session busy runs what is queued at once,
so a lone client never waits out the delay; batches still form while a session computes. A model whose
batch axis is not dynamic runs one request at a time. Executions run in one worker thread per session
(onnxruntime releases the GIL), off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dlpipe.apps.serve.metrics import Metrics
from dlpipe.apps.serve.repository import ServedModel
from dlpipe.runtime.engine import Engine


class Overloaded(Exception):
    """The model's queue is full (answered 503 with Retry-After)."""


class NotReady(Exception):
    """The model is shutting down (answered 503)."""


class BatchTooLarge(ValueError):
    """A request of more rows than the model's ``max_batch_size`` (answered 400)."""


@dataclass
class Job:
    feeds: dict[str, np.ndarray]
    rows: int
    signature: tuple
    future: asyncio.Future
    enqueued: float


def _split(outputs: list[np.ndarray], jobs: list[Job]) -> list[list[np.ndarray]]:
    """Each job's rows of the batch's outputs."""
    total = sum(j.rows for j in jobs)
    if any(o.shape[:1] != (total,) for o in outputs):
        raise RuntimeError(f"the model returned outputs of shapes {[o.shape for o in outputs]} for a batch of "
                           f"{total} rows; its first axis is not a batch axis")
    parts, start = [], 0
    for job in jobs:
        parts.append([o[start:start + job.rows] for o in outputs])
        start += job.rows
    return parts


def _execute(engine: Engine, jobs: list[Job]) -> list[np.ndarray]:
    if len(jobs) == 1:
        return engine.run(jobs[0].feeds)
    feeds = {name: np.concatenate([j.feeds[name] for j in jobs]) for name in engine.input_names}
    return engine.run(feeds)


class Batcher:
    """The queue and workers of one model (see the module's docstring)."""

    def __init__(self, model: ServedModel, metrics: Metrics):
        self.model = model
        self.settings = model.settings
        self.batchable = model.batchable
        self.metrics = metrics
        self.label = model.name
        self.queue: deque[Job] = deque()
        self.busy = 0
        self.closing = False
        self._wake = asyncio.Event()
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"dlpipe-{model.name}-{i}")
                           for i in range(len(model.engines))]
        self._workers = [asyncio.create_task(self._work(engine, pool), name=f"batcher-{model.name}")
                         for engine, pool in zip(model.engines, self._executors)]

    async def submit(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Queue one request's inputs (already checked against the model) and wait for its outputs.

        Raises:
            NotReady, Overloaded, BatchTooLarge; whatever the model run raised.
        """
        if self.closing:
            raise NotReady(f"model '{self.model.name}' is shutting down")
        if len(self.queue) >= self.settings.max_queue:
            raise Overloaded(f"model '{self.model.name}' has {len(self.queue)} requests queued, its limit")
        first = next(iter(feeds.values()))
        rows = first.shape[0] if self.batchable and first.ndim else 1
        if self.batchable and rows > self.settings.max_batch_size:
            raise BatchTooLarge(f"the request has {rows} rows; model '{self.model.name}' takes at most "
                                f"{self.settings.max_batch_size} per request")
        signature = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(feeds.items()))
        job = Job(feeds, rows, signature, asyncio.get_running_loop().create_future(), time.perf_counter())
        self.queue.append(job)
        self.metrics.queue_depth.labels(self.label).set(len(self.queue))
        self._wake.set()
        return await job.future

    def _drop_abandoned(self) -> None:
        """Forget requests whose callers gave up (timed out or disconnected)."""
        if any(j.future.done() for j in self.queue):
            self.queue = deque(j for j in self.queue if not j.future.done())

    def _candidates(self) -> tuple[list[Job], bool]:
        """The head job and the later ones of its shapes that fit in one batch; whether the batch is full."""
        head = self.queue[0]
        if not self.batchable:
            return [head], True
        jobs, rows, limit = [], 0, self.settings.max_batch_size
        for job in self.queue:
            if job.signature != head.signature:
                continue
            if rows + job.rows > limit:
                return jobs, True
            jobs.append(job)
            rows += job.rows
        return jobs, rows >= limit

    def _take(self, jobs: list[Job], rows: int | None) -> list[Job]:
        """Remove from the queue the first of ``jobs`` that together hold at most ``rows`` rows (all: None)."""
        taken, total = [], 0
        for job in jobs:
            if rows is not None and taken and total + job.rows > rows:
                break
            taken.append(job)
            total += job.rows
        chosen = {id(j) for j in taken}
        self.queue = deque(j for j in self.queue if id(j) not in chosen)
        self.metrics.queue_depth.labels(self.label).set(len(self.queue))
        return taken

    async def _next_batch(self) -> list[Job] | None:
        """The next batch to run, once the rules allow; None when closing with nothing left."""
        while True:
            self._drop_abandoned()
            if not self.queue:
                if self.closing:
                    return None
                self._wake.clear()
                await self._wake.wait()
                continue
            jobs, full = self._candidates()
            rows = sum(j.rows for j in jobs)
            preferred = [p for p in self.settings.preferred_batch_size if p <= rows]
            if full or self.closing or (self.settings.idle_run and self.busy == 0):
                return self._take(jobs, None)
            if preferred:
                return self._take(jobs, max(preferred))
            left = self.queue[0].enqueued + self.settings.max_queue_delay_ms / 1000 - time.perf_counter()
            if left <= 0:
                return self._take(jobs, None)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                pass

    async def _work(self, engine: Engine, pool: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while (jobs := await self._next_batch()) is not None:
            self.busy += 1
            started = time.perf_counter()
            for job in jobs:
                self.metrics.queue_seconds.labels(self.label).observe(started - job.enqueued)
            try:
                outputs = await loop.run_in_executor(pool, _execute, engine, jobs)
                parts = _split(outputs, jobs) if self.batchable else [outputs]
            except Exception as exc:  # the model's error is each caller's answer, never the worker's end
                parts = [exc] * len(jobs)
            finally:
                self.busy -= 1
                self._wake.set()
            rows = sum(j.rows for j in jobs)
            self.metrics.compute_seconds.labels(self.label).observe(time.perf_counter() - started)
            self.metrics.batch_size.labels(self.label).observe(rows)
            self.metrics.rows.labels(self.label).inc(rows)
            self.metrics.executions.labels(self.label).inc()
            for job, part in zip(jobs, parts):
                if job.future.done():
                    continue
                if isinstance(part, Exception):
                    job.future.set_exception(part)
                else:
                    job.future.set_result(part)

    async def close(self, wait_s: float = 10.0) -> None:
        """Refuse new requests, finish the queued ones (waiting at most ``wait_s``), stop the workers."""
        self.closing = True
        self._wake.set()
        done, pending = await asyncio.wait(self._workers, timeout=wait_s)
        for task in pending:
            task.cancel()
        for job in self.queue:
            if not job.future.done():
                job.future.set_exception(NotReady(f"model '{self.model.name}' shut down before running the request"))
        for pool in self._executors:
            pool.shutdown(wait=False)
