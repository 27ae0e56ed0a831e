"""The classification task: image in, one class out (the deep MLP, LeNet-5, the VGG-style convnet, the
small ResNet, fine-tuned and torchvision classifiers). Its epochs also serve segmentation, whose
per-pixel cross-entropy is the same loop."""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dlpipe.runtime.errors import InputError
from dlpipe.runtime.predictors import Classifier
from dlpipe.training import data as datasets
from dlpipe.training import plots, report_plots
from dlpipe.training.folders import folder_images
from dlpipe.training.loop import Metric, TaskRun, TrainConfig, run_supervised, seeded_loader, split_indices
from dlpipe.training.precision import Precision
from dlpipe.training.registry import ModelSpec
from dlpipe.training.tasks.base import DemoRow, QuantizationPolicy, Task
from dlpipe.training.tasks.common import (dataset_info, dataset_samples, model_images, model_labels, single_graph,
                                          supervised_command, supervised_summary, top1_accuracy, top1_agreement)

METRIC = Metric("acc", "accuracy", (("loss", "val_loss"), ("acc", "val_acc")))
AUX_LOSS_WEIGHT = 0.3  # GoogLeNet's auxiliary classifiers (Szegedy et al., 2015)


def classification_loss(outputs: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor,
                        label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a classifier's logits, and the logits.

    A model whose training-mode forward returns ``(logits, *auxiliary logits)`` (GoogLeNet's auxiliary
    classifiers) adds each auxiliary loss weighted by :data:`AUX_LOSS_WEIGHT`; in eval mode (and in its ONNX
    graph) it returns the logits alone.
    """
    logits, *aux = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    for extra in aux:
        loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(extra, labels, label_smoothing=label_smoothing)
    return loss, logits


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler=None,
                    progress: tqdm | None = None, frozen: Sequence[nn.Module] = (), label_smoothing: float = 0.0,
                    precision: Precision | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, accuracy (per image, or per pixel) and samples per second.
    ``frozen`` modules stay in eval mode (fine-tuning: their batch-norm statistics do not move);
    ``label_smoothing`` softens the training targets (Szegedy et al., 2016; validation loss stays plain);
    ``precision`` autocasts the forward pass and the loss (``--amp``). ``model`` may be DDP-wrapped."""
    precision = precision or Precision()
    model.train()
    for m in frozen:
        m.eval()
    total_loss, correct, seen, targets = 0.0, 0, 0, 0
    start = time.perf_counter()
    for images, labels in loader:
        with precision.autocast():
            loss, logits = classification_loss(model(images), labels, label_smoothing)
        precision.step(loss, optimizer)
        if scheduler is not None:
            scheduler.step()
        n = labels.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == labels).sum().item()
        seen += n
        targets += labels.numel()  # images, or pixels for segmentation
        if progress is not None:
            progress.update(n)
            progress.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / targets:.4f}", refresh=False)
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(targets, 1),
            "samples_per_s": seen / seconds if seconds > 0 else math.nan, "seconds": seconds}


def mean_iou(confusion) -> float:
    """Mean intersection over union over the classes present in the labels or the predictions."""
    inter = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 0.0


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, iou: bool = False) -> dict[str, float]:
    """Mean loss and accuracy (per image, or per pixel); with ``iou`` also the mean IoU of dense outputs."""
    model.eval()
    total_loss, correct, seen, targets = 0.0, 0, 0, 0
    confusion = None
    for images, labels in loader:
        logits = model(images)
        total_loss += F.cross_entropy(logits, labels, reduction="mean").item() * labels.shape[0]
        pred = logits.argmax(1)
        correct += (pred == labels).sum().item()
        seen += labels.shape[0]
        targets += labels.numel()
        if iou:
            k = logits.shape[1]
            counts = torch.bincount(labels.flatten() * k + pred.flatten(), minlength=k * k).view(k, k)
            confusion = counts if confusion is None else confusion + counts
    out = {"loss": total_loss / max(seen, 1), "acc": correct / max(targets, 1)}
    if confusion is not None:
        out["miou"] = mean_iou(confusion.numpy())
    return out


def prepare_images(cfg: TrainConfig, spec: ModelSpec, dense: bool = False) -> TaskRun:
    """Images and labels (or masks, ``dense``) of a registered dataset, split, batched and normalised."""
    info = dataset_info(cfg, spec)
    precision = Precision(cfg.amp)  # one per run: an fp16 loss scale carries over from epoch to epoch
    images, labels = datasets.load_split(cfg.dataset, "train", cfg.data_dir, cfg.limit, cfg.download)
    x, y = datasets.to_nchw(images), torch.from_numpy(labels)
    train_idx, val_idx = split_indices(len(y), cfg.val_fraction, cfg.seed)
    train_ds = datasets.ImageTensorDataset(x[train_idx], y[train_idx], info,
                                           datasets.augmentation(cfg.augment, info.image_size), masks=dense)
    val_ds = datasets.ImageTensorDataset(x[val_idx], y[val_idx], info, masks=dense)
    train_loader = seeded_loader(train_ds, cfg.batch_size, True, cfg.seed, datasets.batch_collate)
    val_loader = seeded_loader(val_ds, 512, False, cfg.seed, datasets.batch_collate)
    model_args: dict[str, Any] = {"in_channels": info.channels, "image_size": list(info.image_size),
                                  "num_classes": len(info.labels)}
    if cfg.batch_norm is not None:
        model_args["batch_norm"] = cfg.batch_norm

    def test(model: nn.Module) -> dict[str, float]:
        test_images, test_labels = datasets.load_split(cfg.dataset, "test", cfg.data_dir, cfg.test_limit,
                                                       cfg.download)
        test_ds = datasets.ImageTensorDataset(datasets.to_nchw(test_images), torch.from_numpy(test_labels), info)
        return evaluate(model, seeded_loader(test_ds, 512, False, cfg.seed, datasets.batch_collate), iou=dense)

    return TaskRun(model_args, train_loader, len(train_ds),
                   train_epoch=lambda model, opt, sched, bar: train_one_epoch(
                       model, train_loader, opt, sched, bar, label_smoothing=cfg.label_smoothing or 0.0,
                       precision=precision),
                   validate=lambda model: evaluate(model, val_loader, iou=dense), test=test,
                   examples=torch.stack([val_ds[i][0] for i in range(min(cfg.examples, len(val_ds)))]),
                   dataset={"name": info.name, "labels": list(info.labels), "preprocessing": info.preprocessing()},
                   preview=functools.partial(preview, val_ds, info.labels, dense=dense))


def preview(dataset: Dataset, labels: Sequence[str], model: nn.Module, path: Path, dense: bool = False,
            count: int = 8) -> None:
    """The first ``count`` validation images with ``model``'s predictions, drawn to ``path``."""
    pairs = [dataset[i] for i in range(min(count, len(dataset)))]
    images, truths = torch.stack([p[0] for p in pairs]), torch.stack([torch.as_tensor(p[1]) for p in pairs])
    model.eval()
    plots.predictions(images.numpy(), truths.numpy(), model(images).float().numpy(), labels, path, dense=dense)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a classifier on the shared loop (best.pt on validation accuracy)."""
    return run_supervised(cfg, prepare_images, METRIC, "classification")


def evaluate_onnx(predictor: Classifier, model: str | Path, dataset: str, split: str = "test",
                  limit: int | None = None, data_dir: str | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of an exported classifier on a dataset split or an
    image folder (one sub-folder per class), through the runtime's own preprocessing from raw images."""
    info = predictor.info
    if Path(dataset).is_dir():  # an image folder, one sub-folder per class
        images, labels = folder_images(dataset, info.labels, limit)
    else:
        images, labels = datasets.load_split(dataset, split, data_dir, limit)
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
    return {"acc": float((pred == labels).mean()), "accuracy": float((pred == labels).mean()),
            "images": int(len(labels)), "per_class_accuracy": per_class, "confusion": confusion.tolist(),
            "seconds": seconds}


def _describe_samples(rows: list[dict[str, Any]]) -> str:
    return f"classified {len(rows)} files: " + ", ".join(f"{Path(r['image']).name} {r['label']}" for r in rows)


TASK = Task(
    name="classification", description="image in, one class out (top-k labels and probabilities)", metric=METRIC,
    data_parallel=True,
    train=train, command=supervised_command(train), summary=supervised_summary(METRIC), graphs=single_graph,
    quantization=QuantizationPolicy(inputs=model_images, agreement=top1_agreement, labels=model_labels,
                                    labelled_metric=top1_accuracy),
    evaluate=evaluate_onnx, plots=report_plots.confusion, predictor=Classifier,
    report=lambda r: f"accuracy {100 * r['acc']:.2f}%",
    demo=DemoRow(model="lenet5", options=dict(dataset="shapes", epochs=8, schedule="onecycle", lr=3e-3,
                                              optimizer="adam"),
                 quick=dict(epochs=1, limit=1200, test_limit=300, schedule="none", lr=None, optimizer=None),
                 app=("classify", "{model}", "{images}"), describe=_describe_samples,
                 quantize={"calibration_size": 256, "min_agreement": 0.98, "check_size": 512},
                 samples=dataset_samples("shapes")))
