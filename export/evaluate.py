"""Evaluation of exported models through the runtime, and benchmarks that put the runtime beside
PyTorch eager on the same inputs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dlpipe.runtime.benchmark import LatencyStats, measure_interleaved, random_input
from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.runtime.predictors import Classifier, Detector, Segmenter, load
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint
from dlpipe.training.data import load_split
from dlpipe.training.train import mean_iou


def evaluate_onnx(model: str | Path, dataset: str | None = None, split: str = "test", limit: int | None = None,
                  data_dir: str | None = None, device: str = "auto", batch_size: int = 256) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of a classifier ONNX model on a dataset split,
    run through the runtime's own preprocessing from raw images."""
    predictor = load(model, device=device)
    if getattr(predictor, "task", None) == "captioning":  # BLEU-4 and exact matches of a captioner package (issue 4)
        from dlpipe.training.captioning import evaluate_captioner

        return evaluate_captioner(predictor, dataset, split, limit)
    if isinstance(predictor, Segmenter):
        return _evaluate_segmenter(predictor, model, dataset, split, limit, data_dir)
    if isinstance(predictor, Detector):
        return _evaluate_detector(predictor, model, dataset, split, limit, data_dir)
    if not isinstance(predictor, Classifier):
        raise ModelFileError(f"'{model}' is a {predictor.info.task} model; evaluate supports classification, "
                             "segmentation and detection")
    info = predictor.info
    dataset = _dataset_for(info, dataset, model)
    if Path(dataset).is_dir():  # an image folder, one sub-folder per class (issue 6)
        from dlpipe.training.finetune import folder_images

        images, labels = folder_images(dataset, info.labels, limit)
    else:
        images, labels = load_split(dataset, split, data_dir, limit)
    if len(info.labels) and labels.max() >= len(info.labels):
        raise InputError(f"dataset {dataset!r} has labels up to {labels.max()}, '{model}' knows {len(info.labels)} "
                         "classes")
    start = time.perf_counter()
    pred = predictor.logits(images, batch_size=batch_size).argmax(1)
    seconds = time.perf_counter() - start
    n = max(len(info.labels), int(labels.max()) + 1)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(1)
    per_class = {info.labels[i] if i < len(info.labels) else str(i): (float(confusion[i, i] / support[i])
                 if support[i] else None) for i in range(n)}
    return {"model": str(model), "precision": info.precision, "dataset": dataset, "split": split,
            "images": int(len(labels)), "accuracy": float((pred == labels).mean()), "per_class_accuracy": per_class,
            "confusion": confusion.tolist(), "labels": list(info.labels), "seconds": seconds,
            "providers": predictor.engine.providers}


def _dataset_for(info, dataset: str | None, model) -> str:
    """The dataset to evaluate on: the one given, else the one the model's metadata names."""
    dataset = dataset or info.raw.get("dataset")
    if not dataset:
        raise InputError(f"'{model}' does not name its dataset; pass --dataset")
    return dataset


def _evaluate_segmenter(predictor: Segmenter, model, dataset, split, limit, data_dir) -> dict[str, Any]:
    """Pixel accuracy, mean IoU and per-class IoU of a segmentation model."""
    info = predictor.info
    dataset = _dataset_for(info, dataset, model)
    images, masks = load_split(dataset, split, data_dir, limit)
    if masks.ndim != 3:
        raise InputError(f"dataset {dataset!r} has no segmentation masks")
    start = time.perf_counter()
    pred = predictor.masks(images)
    seconds = time.perf_counter() - start
    k = len(info.labels)
    confusion = np.bincount(masks.astype(np.int64).ravel() * k + pred.ravel(), minlength=k * k).reshape(k, k)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    return {"model": str(model), "precision": info.precision, "dataset": dataset, "split": split,
            "images": int(len(masks)), "accuracy": float(inter.sum() / confusion.sum()), "miou": mean_iou(confusion),
            "per_class_iou": {lbl: (float(inter[i] / union[i]) if union[i] else None)
                              for i, lbl in enumerate(info.labels)},
            "confusion": confusion.tolist(), "labels": list(info.labels), "seconds": seconds,
            "providers": predictor.engine.providers}


def _evaluate_detector(predictor: Detector, model, dataset, split, limit, data_dir) -> dict[str, Any]:
    """COCO mAP@0.5 and mAP@[.5:.95] (pycocotools) of a detector, every detection it returns scored."""
    from dlpipe.training.detection import coco_metrics

    info = predictor.info
    dataset = _dataset_for(info, dataset, model)
    images, targets = load_split(dataset, split, data_dir, limit)
    if not isinstance(targets, list):
        raise InputError(f"dataset {dataset!r} has no boxes")
    start = time.perf_counter()
    predictions = [dict(zip(("boxes", "labels", "scores"), predictor.raw(image))) for image in images]
    seconds = time.perf_counter() - start
    return {"model": str(model), "precision": info.precision, "dataset": dataset, "split": split,
            "images": int(len(images)), **coco_metrics(targets, predictions, info.labels),
            "objects": int(sum(len(t["labels"]) for t in targets)), "labels": list(info.labels), "seconds": seconds,
            "providers": predictor.engine.providers}


def benchmark(models: Sequence[str | Path], batches: Sequence[int] = (1, 64), checkpoint: str | Path | None = None,
              warmup: int = 10, iters: int = 100, threads: int | None = None,
              device: str = "cpu") -> list[LatencyStats]:
    """Latency of each ONNX model (and PyTorch eager from ``checkpoint``) at each batch size, interleaved.

    The ONNX runners call ``Engine.run`` (the runtime's path, input checks included) on the same
    random inputs that PyTorch eager gets; ``threads`` applies to both.
    """
    if not models and checkpoint is None:
        raise InputError("nothing to benchmark: give ONNX models and/or --vs-torch CHECKPOINT")
    engines = {str(m): Engine(m, device=device, threads=threads) for m in models}
    module = None
    if checkpoint is not None:
        if threads:
            torch.set_num_threads(threads)
        module = model_from_checkpoint(load_checkpoint(checkpoint))
    results: list[LatencyStats] = []
    if any(e.info is not None and e.info.task == "detection" for e in engines.values()) or (
            module is not None and load_checkpoint(checkpoint).get("task") == "detection"):
        batches = [1]  # detectors take one image at a time
    for batch in batches:
        runners = {}
        reference = None
        for name, engine in engines.items():
            feeds = random_input(engine, batch)
            reference = reference or feeds
            runners[f"{Path(name).name} [{engine.info.precision if engine.info else 'onnx'}]"] = (
                lambda e=engine, f=feeds: e.run(f))
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
        results.extend(measure_interleaved(runners, batch, warmup, iters).values())
    return results
