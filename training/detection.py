"""Training and COCO evaluation of the detection task (``rcnn``), on the same :class:`TrainConfig`,
checkpoint format and command as the other tasks. The metric is pycocotools' own COCOeval:
mAP@0.5 and mAP@[.5:.95] ("AP" in COCO's tables), not a re-implementation.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dlpipe.training import data as datasets
from dlpipe.training.checkpoint import load_checkpoint, save_checkpoint
from dlpipe.training.registry import get_spec


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


def _collate(batch):
    return batch


def _loader(ds: DetectionDataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed),
                      collate_fn=_collate)


def train_one_epoch(model, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler=None,
                    progress: tqdm | None = None) -> dict[str, float]:
    """One pass over ``loader`` summing torchvision's four detection losses; returns their means."""
    model.train()
    sums: dict[str, float] = {}
    seen = 0
    start = time.perf_counter()
    for images, targets in loader:
        losses = model.losses(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
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
                 labels: Sequence[str]) -> dict[str, float]:
    """COCO mAP of ``predictions`` against ``targets`` (same order), by pycocotools' COCOeval.

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
    return {"map": float(max(s[0], 0)), "map50": float(max(s[1], 0)), "map75": float(max(s[2], 0)),
            "mar100": float(max(s[8], 0))}


def evaluate(model, images: torch.Tensor, targets: Sequence[dict], labels: Sequence[str]) -> dict[str, float]:
    """COCO metrics of ``model`` on uint8 NCHW images."""
    return coco_metrics(targets, detect(model, images), labels)


def model_args_for(info: datasets.DatasetInfo) -> dict[str, Any]:
    """Builder arguments derived from the dataset: channels, classes, normalisation and image scale."""
    return {"in_channels": info.channels, "num_classes": len(info.labels), "image_mean": list(info.mean),
            "image_std": list(info.std), "min_size": min(info.image_size), "max_size": 4 * max(info.image_size)}


def main(cfg) -> dict[str, Any]:
    """Train a detector as :func:`dlpipe.training.train.main` trains the other tasks (``cfg`` resolved)."""
    from dlpipe.training.train import build_model, build_optimizer, build_scheduler, fit, split_indices, start_run

    spec = get_spec(cfg.model)
    info = datasets.get_dataset(cfg.dataset)
    out = start_run(cfg)
    images, targets = datasets.load_split(cfg.dataset, "train", cfg.data_dir, cfg.limit, cfg.download)
    x = datasets.to_nchw(images)
    val_idx, train_idx = split_indices(len(targets), cfg)
    train_ds = DetectionDataset(x[train_idx], [targets[i] for i in train_idx], flip=cfg.augment == "flip",
                                seed=cfg.seed)
    val_x, val_targets = x[val_idx], [targets[i] for i in val_idx]
    train_loader = _loader(train_ds, cfg.batch_size, True, cfg.seed)

    model, model_args = build_model(spec, model_args_for(info), cfg.model_args)
    optimizer = build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad], cfg.lr,
                                cfg.momentum, cfg.weight_decay)
    scheduler = build_scheduler(cfg.schedule, optimizer, cfg.lr, cfg.epochs, len(train_loader))

    examples = val_x[:cfg.examples].float() / 255
    base = {"model": cfg.model, "task": spec.task, "model_args": model_args, "config": asdict(cfg),
            "dataset": {"name": info.name, "labels": list(info.labels), "preprocessing": info.preprocessing()},
            "examples": examples, "versions": {"torch": str(torch.__version__)}}
    best, history = fit(cfg, out, base, model, optimizer, scheduler, train_loader, len(train_ds),
                        run_epoch=lambda bar: train_one_epoch(model, train_loader, optimizer, scheduler, bar),
                        validate=lambda: evaluate(model, val_x, val_targets, info.labels),
                        score=lambda row: row["val_map50"],
                        describe=lambda row: (f"loss {row['train_loss']:.4f} val mAP@0.5 {row['val_map50']:.4f} "
                                              f"mAP@[.5:.95] {row['val_map']:.4f}"))
    log_path = out / "metrics.jsonl"

    ckpt = load_checkpoint(out / "best.pt")
    model.load_state_dict(ckpt["state_dict"])
    test_images, test_targets = datasets.load_split(cfg.dataset, "test", cfg.data_dir, cfg.test_limit, cfg.download)
    test = evaluate(model, datasets.to_nchw(test_images), test_targets, info.labels)
    ckpt["metrics"].update({f"test_{k}": v for k, v in test.items()})
    save_checkpoint(ckpt, out / "best.pt")
    return {"best": str(out / "best.pt"), "last": str(out / "last.pt"), "log": str(log_path), "task": spec.task,
            "best_val_acc": best, "best_val_map50": best, "test_map50": test["map50"], "test_map": test["map"],
            "history": history}
