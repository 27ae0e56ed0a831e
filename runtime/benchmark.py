"""Latency measurement (torch-free): warm-up, then per-call timings of several runners interleaved
round by round, so that a noisy shared machine slows every runner alike and ratios stay honest."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from dlpipe.runtime.engine import Engine


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency percentiles (milliseconds) and throughput (items per second) at one batch size."""

    name: str
    batch: int
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float

    def as_dict(self) -> dict:
        return asdict(self)


def measure_interleaved(runners: dict[str, Callable[[], object]], batch: int, warmup: int = 10, iters: int = 100,
                        rounds: int = 5, pause_s: float = 0.05) -> dict[str, LatencyStats]:
    """Time each runner ``iters`` times in total, in ``rounds`` alternating blocks, after ``warmup`` calls.

    Between blocks the machine rests ``pause_s`` seconds: thread pools (onnxruntime's, OpenMP's
    under torch) keep spinning for a while after their last call, and that spinning must not be
    billed to the next runner on a machine with few cores.
    """
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    per_round = max(1, iters // rounds)
    for _ in range(rounds):
        for name, fn in runners.items():
            time.sleep(pause_s)
            fn()  # first call after the pause wakes the thread pool; not timed
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        a = np.asarray(ts) * 1000
        p50 = float(np.percentile(a, 50))
        out[name] = LatencyStats(name, batch, len(a), p50, float(np.percentile(a, 90)), float(np.percentile(a, 99)),
                                 float(a.mean()), batch / (p50 / 1000))
    return out


def random_input(engine: Engine, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every input of ``engine`` with the batch axis set to ``batch``.

    Symbolic axes other than the batch take the size from the model's metadata (image height/width).
    """
    rng = np.random.default_rng(seed)
    size = engine.info.preprocessing.size if engine.info else (32, 32)
    feeds = {}
    for i, spec in enumerate(engine.inputs):
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif axis == 0:
                shape.append(batch)
            else:
                shape.append(size[0] if axis == len(spec.shape) - 2 else size[1])
        feeds[spec.name] = rng.standard_normal(shape).astype(engine.input_dtype(i))
    return feeds
