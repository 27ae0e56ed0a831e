"""Detection data, epochs and COCO evaluation (``rcnn``); :mod:`dlpipe.training.tasks.detection` puts
them on the shared loop. The metric is pycocotools' own COCOeval:
mAP@0.5 and mAP@[.5:.95] ("AP" in COCO's tables), not a re-implementation.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dlpipe.training import data as datasets
from dlpipe.training import distributed
from dlpipe.training.precision import Precision


class DetectionDataset(Dataset):
    """In-memory uint8 images with their box targets, served a batch at a time as torchvision's
    detection models take them: a list of ``CxHxW`` float images in [0, 1] and a list of target dicts."""

    def __init__(self, images: torch.Tensor, targets: Sequence[dict[str, np.ndarray]], flip: bool = False,
                 seed: int = 0):
        self.images, self.targets, self.flip = images, list(targets), flip
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        images, targets = self.__getitems__([index])
        return images[0], targets[0]

    def __getitems__(self, indices: list[int]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        images, targets = [], []
        for i in indices:
            image = self.images[i].float() / 255
            boxes = torch.as_tensor(self.targets[i]["boxes"], dtype=torch.float32).reshape(-1, 4)
            if self.flip and torch.rand(1, generator=self.generator).item() < 0.5:
                width = image.shape[-1]
                image = image.flip(-1)
                boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            images.append(image)
            targets.append({"boxes": boxes, "labels": torch.as_tensor(self.targets[i]["labels"], dtype=torch.int64)})
        return images, targets


def detection_collate(batch):
    """Collate function for :class:`DetectionDataset`: the batch (lists of images and targets) is already made."""
    return batch


def train_one_epoch(model, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler=None,
                    progress: tqdm | None = None, precision: Precision | None = None) -> dict[str, float]:
    """One pass over ``loader`` summing torchvision's four detection losses; returns their means.
    ``model`` may be DDP-wrapped (its ``losses`` then runs through DDP's forward); ``precision``
    autocasts the losses' computation (``--amp``)."""
    precision = precision or Precision()
    model.train()
    sums: dict[str, float] = {}
    seen = 0
    start = time.perf_counter()
    for images, targets in loader:
        with precision.autocast():
            losses = distributed.call(model, "losses", images, targets)
            loss = sum(losses.values())
        precision.step(loss, optimizer, clip=model.parameters(), max_norm=10.0)
        if scheduler is not None:
            scheduler.step()
        n = len(images)
        seen += n
        sums["train_loss"] = sums.get("train_loss", 0.0) + loss.item() * n
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item() * n
        if progress is not None:
            progress.update(n)
            progress.set_postfix(loss=f"{sums['train_loss'] / seen:.4f}", refresh=False)
    seconds = time.perf_counter() - start
    out = {k: v / max(seen, 1) for k, v in sums.items()}
    out.update(samples_per_s=seen / seconds if seconds > 0 else math.nan, seconds=seconds)
    return out


@torch.no_grad()
def detect(model, images: torch.Tensor, batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """Detections of a uint8 NCHW batch as numpy dicts (boxes, labels, scores)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [img.float() / 255 for img in images[start:start + batch_size]]
        out += [{k: v.numpy() for k, v in d.items()} for d in model.detect(chunk)]
    return out


def coco_metrics(targets: Sequence[dict[str, np.ndarray]], predictions: Sequence[dict[str, np.ndarray]],
                 labels: Sequence[str], curves: bool = False) -> dict[str, Any]:
    """COCO mAP of ``predictions`` against ``targets`` (same order), by pycocotools' COCOeval.

    Args:
        curves: Also return ``pr_curves`` (``dlpipe evaluate --plots``): COCOeval's own interpolated
            precision at its 101 recall points per class, at IoU 0.5, all areas, 100 detections.

    Returns:
        ``map50`` (AP at IoU 0.5), ``map`` (AP averaged over IoU 0.5:0.95), ``map75`` and the mean recall
        at 100 detections ``mar100``; 0 when nothing was predicted.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for i, (t, p) in enumerate(zip(targets, predictions)):
        images.append({"id": i + 1})
        for box, label in zip(np.asarray(t["boxes"]).reshape(-1, 4), t["labels"]):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        for box, label, score in zip(np.asarray(p["boxes"]).reshape(-1, 4), p["labels"], p["scores"]):
            x0, y0, x1, y1 = (float(v) for v in box)
            results.append({"image_id": i + 1, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": float(score)})
    if not results or not annotations:
        return {"map50": 0.0, "map": 0.0, "map75": 0.0, "mar100": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": k, "name": name} for k, name in enumerate(labels) if k > 0]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    s = evaluator.stats
    out = {"map": float(max(s[0], 0)), "map50": float(max(s[1], 0)), "map75": float(max(s[2], 0)),
           "mar100": float(max(s[8], 0))}
    return {**out, "pr_curves": pr_curves(evaluator, labels)} if curves else out


def pr_curves(evaluator, labels: Sequence[str], iou: float = 0.5) -> dict[str, Any]:
    """Per class, an accumulated COCOeval's precision at its recall points (``eval["precision"]``, indexed
    [IoU threshold, recall, class, area, max detections]) at IoU ``iou``, all areas and the most detections;
    None for a class without ground truth (COCOeval's -1), 4 decimals to keep the report small."""
    params = evaluator.params
    t = int(np.argmin(np.abs(np.asarray(params.iouThrs) - iou)))
    precision = np.asarray(evaluator.eval["precision"])[t, :, :, params.areaRngLbl.index("all"), -1]
    per_class = {}
    for k, cat in enumerate(params.catIds):
        column = precision[:, k]
        name = labels[cat] if cat < len(labels) else str(cat)
        per_class[name] = None if (column < 0).all() else [round(float(v), 4) for v in column]
    return {"iou": float(params.iouThrs[t]), "max_detections": int(params.maxDets[-1]),
            "recall": [round(float(r), 2) for r in params.recThrs], "precision": per_class}


def evaluate(model, images: torch.Tensor, targets: Sequence[dict], labels: Sequence[str]) -> dict[str, float]:
    """COCO metrics of ``model`` on uint8 NCHW images."""
    return coco_metrics(targets, detect(model, images), labels)


def model_args_for(info: datasets.DatasetInfo) -> dict[str, Any]:
    """Builder arguments derived from the dataset: channels, classes, normalisation and image scale."""
    return {"in_channels": info.channels, "num_classes": len(info.labels), "image_mean": list(info.mean),
            "image_std": list(info.std), "min_size": min(info.image_size), "max_size": 4 * max(info.image_size)}
