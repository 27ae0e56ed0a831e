"""The detection task: image in, labelled boxes out (``rcnn``: Faster R-CNN exported whole, one image at
a time). best.pt is chosen on validation COCO mAP@0.5 (pycocotools)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.runtime.predictors import Detector
from dlpipe.training import data as datasets
from dlpipe.training import plots, report_plots
from dlpipe.training.detection import (DetectionDataset, coco_metrics, detect, detection_collate, evaluate, model_args_for,
                                       train_one_epoch)
from dlpipe.training.loop import Metric, TaskRun, TrainConfig, run_supervised, seeded_loader, split_indices
from dlpipe.training.precision import Precision
from dlpipe.training.registry import ModelSpec, get_spec
from dlpipe.training.tasks.base import DemoRow, Graph, QuantizationPolicy, Task
from dlpipe.training.tasks.common import (dataset_info, dataset_samples, model_images, supervised_command,
                                          supervised_summary)

METRIC = Metric("map50", "mAP@0.5", (("map50", "val mAP@0.5"), ("map", "mAP@[.5:.95]")))
# fp16 converts the networks (backbone, RPN head, box head) only; the resizing, anchor and box arithmetic,
# RoIAlign, NMS and the shape computations around them stay float32.
FP16_SCOPES = ("/detector/backbone/", "/detector/rpn/head/", "/detector/roi_heads/box_head/",
               "/detector/roi_heads/box_predictor/")
# int8 quantizes the convolutions (backbone and RPN) only; the box head's fully connected layers, RoIAlign,
# box decoding, NMS and the resizing stay float32 (quantizing them costs mAP).
INT8_OPS = ("Conv",)
REPORTED_FP32_OPS = ("Gemm", "MatMul", "RoiAlign", "NonMaxSuppression", "Resize", "TopK", "Exp")


def prepare(cfg: TrainConfig, spec: ModelSpec) -> TaskRun:
    """Images with their box targets, split; ``--augment flip`` moves the boxes with the image."""
    info = dataset_info(cfg, spec)
    if cfg.augment not in ("none", "flip"):
        raise InputError(f"detection supports --augment none or flip (boxes follow the image), not {cfg.augment!r}")
    precision = Precision(cfg.amp)
    images, targets = datasets.load_split(cfg.dataset, "train", cfg.data_dir, cfg.limit, cfg.download)
    x = datasets.to_nchw(images)
    train_idx, val_idx = split_indices(len(targets), cfg.val_fraction, cfg.seed)
    train_ds = DetectionDataset(x[train_idx], [targets[i] for i in train_idx], flip=cfg.augment == "flip",
                                seed=cfg.seed)
    val_x, val_targets = x[val_idx], [targets[i] for i in val_idx]
    train_loader = seeded_loader(train_ds, cfg.batch_size, True, cfg.seed, detection_collate)

    def test(model) -> dict[str, float]:
        test_images, test_targets = datasets.load_split(cfg.dataset, "test", cfg.data_dir, cfg.test_limit,
                                                        cfg.download)
        return evaluate(model, datasets.to_nchw(test_images), test_targets, info.labels)

    return TaskRun(model_args_for(info), train_loader, len(train_ds),
                   train_epoch=lambda model, opt, sched, bar: train_one_epoch(model, train_loader, opt, sched, bar,
                                                                              precision),
                   validate=lambda model: evaluate(model, val_x, val_targets, info.labels), test=test,
                   examples=val_x[:cfg.examples].float() / 255,
                   dataset={"name": info.name, "labels": list(info.labels), "preprocessing": info.preprocessing()},
                   preview=lambda model, path: preview(model, val_x[:6], info.labels, path))


def preview(model, images: torch.Tensor, labels, path: Path, threshold: float = 0.5) -> None:
    """``images`` (uint8 NCHW) with ``model``'s detections above ``threshold``, drawn to ``path``."""
    found = detect(model, images)
    boxes = [[(*map(float, box), f"{labels[int(k)] if int(k) < len(labels) else k} {s:.2f}")
              for box, k, s in zip(d["boxes"], d["labels"], d["scores"]) if s >= threshold] for d in found]
    plots.annotated(images.numpy(), [f"{len(b)} detections" for b in boxes], path, boxes)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a detector on the shared loop (best.pt on validation mAP@0.5)."""
    return run_supervised(cfg, prepare, METRIC, "detection")


def graphs(ckpt: dict[str, Any], model: torch.nn.Module, dynamic_batch: bool) -> list[Graph]:
    """One ``CxHxW`` image per call: exported on a real image, checked on another at its own size and on a
    third resized to another height and width."""
    del dynamic_batch  # no batch axis
    examples = ckpt["examples"]
    if len(examples) < 3:
        raise ModelFileError("the checkpoint holds fewer than 3 example images; cannot prove parity")
    h, w = examples.shape[-2:]
    other = torch.nn.functional.interpolate(examples[2:3], size=(h + h // 2, w + w // 4), mode="bilinear",
                                            align_corners=False)[0]
    return [Graph(None, model, get_spec(ckpt["model"]).contract, (examples[0],), [(examples[1],), (other,)])]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``x0,y0,x1,y1`` box with each of ``boxes``."""
    if not len(boxes):
        return np.zeros(0)
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def agreement(fp32, variant, checks: np.ndarray) -> tuple[float, float]:
    """Confident (score >= 0.5) fp32 detections matched by a variant detection of the same class at
    IoU >= 0.5, over the larger of the two counts; the difference is over matched boxes."""
    name = fp32.engine.input_names[0]
    matched, total, max_abs = 0, 0, 0.0
    for image in checks:
        (rb, rl, rs), (gb, gl, gs) = fp32.engine.run({name: image})[:3], variant.engine.run({name: image})[:3]
        rb, rl, gb, gl = rb[rs >= 0.5], rl[rs >= 0.5], gb[gs >= 0.5], gl[gs >= 0.5]
        total += max(len(rb), len(gb))
        used = np.zeros(len(gb), dtype=bool)
        for box, label in zip(rb, rl):
            iou = _iou(box, gb) * (gl == label) * ~used
            if len(iou) and iou.max() >= 0.5:
                j = int(iou.argmax())
                used[j] = True
                matched += 1
                max_abs = max(max_abs, float(np.abs(gb[j] - box).max()))
    return (matched / total if total else 1.0), max_abs


def evaluate_onnx(predictor: Detector, model: str | Path, dataset: str, split: str = "test",
                  limit: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """COCO mAP@0.5 and mAP@[.5:.95] (pycocotools) of an exported detector, every detection it returns scored."""
    info = predictor.info
    images, targets = datasets.load_split(dataset, split, data_dir, limit)
    if not isinstance(targets, list):  # a guard on user input: a dataset without boxes
        raise InputError(f"dataset {dataset!r} has no boxes")
    start = time.perf_counter()
    predictions = [dict(zip(("boxes", "labels", "scores"), predictor.raw(image))) for image in images]
    seconds = time.perf_counter() - start
    return {"images": int(len(images)), **coco_metrics(targets, predictions, info.labels, curves=True),
            "objects": int(sum(len(t["labels"]) for t in targets)), "seconds": seconds}


TASK = Task(
    name="detection", description="image in, labelled boxes out (in the image's own pixels)", metric=METRIC,
    data_parallel=True,
    train=train, command=supervised_command(train),
    summary=supervised_summary(METRIC, (("map", "mAP@[.5:.95]"),)), graphs=graphs,
    quantization=QuantizationPolicy(inputs=model_images, agreement=agreement,
                                    agreement_name="confident detections matched", fp16_scopes=FP16_SCOPES,
                                    int8_ops=INT8_OPS, reported_fp32_ops=REPORTED_FP32_OPS),
    evaluate=evaluate_onnx, plots=report_plots.precision_recall, predictor=Detector, batched=False,
    report=lambda r: f"mAP@0.5 {r['map50']:.4f}, mAP@[.5:.95] {r['map']:.4f}",
    demo=DemoRow(model="rcnn", options=dict(dataset="shapes-boxes", epochs=4, limit=2400, lr=2e-3, optimizer="adam",
                                            schedule="onecycle", test_limit=300),
                 quick=dict(epochs=1, limit=96, schedule="none", test_limit=50),
                 app=("detect", "{model}", "{images}", "--out", "{out}"),
                 describe=lambda rows: f"{sum(len(r['detections']) for r in rows)} objects found, drawn",
                 # the 4-epoch demo detector's confident detections match fp32's at 88-90% in int8 (the
                 # benchmark's fully trained one loses 0.04 points of mAP); the demo reports the mAP of each
                 quantize={"calibration_size": 64, "min_agreement": 0.85, "check_size": 64},
                 samples=dataset_samples("shapes-boxes")))
