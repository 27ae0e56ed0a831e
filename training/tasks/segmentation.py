"""The segmentation task: image in, a class per pixel out (FCN-32s/16s/8s/4s/2s). Its epochs are
classification's per-pixel cross-entropy; best.pt is chosen on validation mean IoU."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.runtime.errors import InputError
from dlpipe.runtime.predictors import Segmenter
from dlpipe.training import data as datasets
from dlpipe.training import report_plots
from dlpipe.training.loop import Metric, TrainConfig, run_supervised
from dlpipe.training.tasks.base import DemoRow, QuantizationPolicy, Task
from dlpipe.training.tasks.classification import mean_iou, prepare_images
from dlpipe.training.tasks.common import (dataset_samples, model_images, single_graph, supervised_command,
                                          supervised_summary, top1_agreement)

METRIC = Metric("miou", "mean IoU", (("loss", "val_loss"), ("acc", "val_acc"), ("miou", "val_miou")))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a segmenter on the shared loop (best.pt on validation mean IoU)."""
    return run_supervised(cfg, functools.partial(prepare_images, dense=True), METRIC, "segmentation")


def evaluate_onnx(predictor: Segmenter, model: str | Path, dataset: str, split: str = "test",
                  limit: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Pixel accuracy, mean IoU and per-class IoU of an exported segmenter."""
    info = predictor.info
    images, masks = datasets.load_split(dataset, split, data_dir, limit)
    if masks.ndim != 3:  # a guard on user input: a dataset without masks
        raise InputError(f"dataset {dataset!r} has no segmentation masks")
    start = time.perf_counter()
    pred = predictor.masks(images)
    seconds = time.perf_counter() - start
    k = len(info.labels)
    confusion = np.bincount(masks.astype(np.int64).ravel() * k + pred.ravel(), minlength=k * k).reshape(k, k)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    return {"images": int(len(masks)), "accuracy": float(inter.sum() / confusion.sum()), "miou": mean_iou(confusion),
            "per_class_iou": {lbl: (float(inter[i] / union[i]) if union[i] else None)
                              for i, lbl in enumerate(info.labels)},
            "confusion": confusion.tolist(), "seconds": seconds}


TASK = Task(
    name="segmentation", description="image in, a class per pixel out (masks and overlays at the image's size)",
    data_parallel=True,
    metric=METRIC, train=train, command=supervised_command(train),
    summary=supervised_summary(METRIC, (("acc", "pixel accuracy"),)), graphs=single_graph,
    quantization=QuantizationPolicy(inputs=model_images, agreement=top1_agreement,
                                    agreement_name="per-pixel top-1 agreement"),
    evaluate=evaluate_onnx, plots=report_plots.class_iou, predictor=Segmenter,
    report=lambda r: f"mean IoU {r['miou']:.4f}, pixel accuracy {100 * r['accuracy']:.2f}%",
    demo=DemoRow(model="fcn2s", options=dict(dataset="shapes-scenes", epochs=8, limit=3000, lr=3e-3, batch_norm=True,
                                             model_args={"fusion": "conv"}, optimizer="adam", schedule="onecycle",
                                             test_limit=300),
                 quick=dict(epochs=1, limit=96, schedule="none", test_limit=50),
                 app=("segment", "{model}", "{images}", "--out", "{out}"),
                 describe=lambda rows: f"{len(rows)} overlays + masks written",
                 samples=dataset_samples("shapes-scenes")))
