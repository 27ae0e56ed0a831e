"""Evaluation of exported models through the runtime (each task's metric, from its declaration), and
benchmarks that put the runtime beside PyTorch eager on the same inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from dlpipe.runtime.benchmark import LatencyStats, engine_runners, measure_interleaved, random_input
from dlpipe.runtime.captioner import is_package, read_manifest
from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import InputError, UsageError
from dlpipe.runtime.files import write_json
from dlpipe.runtime.predictors import load
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint
from dlpipe.training.tasks import get_task


def evaluate_onnx(model: str | Path, dataset: str | None = None, split: str = "test", limit: int | None = None,
                  data_dir: str | None = None, device: str = "auto") -> dict[str, Any]:
    """The task metrics of an exported model (any precision, file or package) on a dataset split, run through
    the runtime from raw inputs (the task's ``evaluate``): accuracy and confusion for classifiers, mean IoU
    for segmenters, COCO mAP for detectors, BLEU-4 for captioners, the mean return for policies.

    Args:
        dataset: A dataset (or environment) name, or an image folder; the one the model names when None.
    """
    predictor = load(model, device=device)
    task = get_task(predictor.info.task)
    dataset = dataset or predictor.info.raw.get("dataset")
    if not dataset:
        raise InputError(f"'{model}' does not name its dataset; pass --dataset")
    report = task.evaluate(predictor, model, dataset, split, limit, data_dir)
    return {"model": str(model), "task": task.name, "precision": predictor.info.precision, "dataset": dataset,
            "split": split, "metric": task.metric.key, "metric_name": task.metric.name,
            "labels": list(predictor.info.labels), "providers": predictor.engine.providers, **report}


def plots_folder(folder: str | Path) -> Path:
    """The folder ``dlpipe evaluate --plots`` writes into, made when missing (checked before evaluating).

    Raises:
        UsageError: ``folder`` is an existing file, or cannot be made.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--plots '{folder}' is a file; give a folder (it is made when missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--plots '{folder}': cannot make the folder ({e.strerror or e})") from None
    return folder


def save_report(report: dict[str, Any], path: str | Path) -> list[Path]:
    """Write an :func:`evaluate_onnx` report as JSON at ``path`` and its task's plots beside it (the task's
    ``plots`` hook); the files written, the JSON first (only the JSON for a task without plots)."""
    path = write_json(path, report)
    task = get_task(report["task"])
    return [path, *(task.plots(report, path) if task.plots is not None else [])]


def _engines(models: Sequence[str | Path], device: str, threads: int | None) -> dict[str, Engine]:
    """One engine per ONNX file, and one per graph of a model package (a folder or a manifest), keyed
    ``package:part`` (``package:part.fp16`` for a variant's graphs) so each is timed under its own name."""
    engines = {}
    for model in models:
        if not is_package(model):
            engines[str(model)] = Engine(model, device=device, threads=threads)
            continue
        manifest, doc = read_manifest(model)
        for file in doc["graphs"].values():
            engines[f"{manifest.parent}:{Path(file).stem}"] = Engine(manifest.parent / file, device=device,
                                                                     threads=threads)
    return engines


def benchmark(models: Sequence[str | Path], batches: Sequence[int] = (1, 64), checkpoint: str | Path | None = None,
              warmup: int = 10, iters: int = 100, threads: int | None = None,
              device: str = "cpu", rounds: int = 5, attempts: int = 2) -> list[LatencyStats]:
    """Latency of each ONNX model (and PyTorch eager from ``checkpoint``) at each batch size, interleaved.

    The ONNX runners call ``Engine.run`` (the runtime's path, input checks included) on the same
    random inputs that PyTorch eager gets; ``threads`` applies to both. On CUDA each model is also timed
    through IO binding with its inputs and outputs in the GPU's memory (``[..., io-binding]``): the gap to
    the plain row is what the host-device copies cost. Each batch size is timed in
    ``rounds`` round-robin blocks with rests between them, and timed again (up to ``attempts`` passes in
    all) while some runner's spread is too wide to trust (``dlpipe.runtime.benchmark.SPREAD_LIMIT``); each
    result carries its spread and that flag.
    """
    if not models and checkpoint is None:
        raise InputError("nothing to benchmark: give ONNX models and/or --vs-torch CHECKPOINT")
    engines = _engines(models, device, threads)
    module = None
    if checkpoint is not None:
        if threads:
            torch.set_num_threads(threads)
        module = model_from_checkpoint(load_checkpoint(checkpoint))
    results: list[LatencyStats] = []
    tasks = {e.info.task for e in engines.values() if e.info is not None}
    if module is not None:
        tasks.add(load_checkpoint(checkpoint)["task"])
    if not all(get_task(t).batched for t in tasks):
        batches = [1]  # graphs without a batch axis (detectors) take one input at a time
    for batch in batches:
        runners = {}
        reference = None
        for name, engine in engines.items():
            feeds = random_input(engine, batch)
            reference = reference or feeds
            label = f"{Path(name).name} [{engine.info.precision if engine.info else 'onnx'}"
            runners.update(engine_runners(f"{label}]", engine, feeds, bound_name=f"{label}, io-binding]"))
        if module is not None:
            if reference is None:
                ckpt = load_checkpoint(checkpoint)
                c, (h, w) = ckpt["model_args"]["in_channels"], ckpt["model_args"]["image_size"]
                x = torch.randn(batch, c, h, w)
            else:
                x = torch.from_numpy(next(iter(reference.values())))

            def eager(m=module, x=x):
                with torch.inference_mode():
                    return m(x)

            runners["pytorch eager [fp32]"] = eager
        results.extend(measure_interleaved(runners, batch, warmup, iters, rounds, attempts=attempts).values())
    return results
