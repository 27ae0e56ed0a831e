"""Training as plain functions (torchvision's ``references/classification/train.py``):
:func:`train_one_epoch`, :func:`evaluate` and :func:`main`, configured by one :class:`TrainConfig`.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.training import data as datasets
from dlpipe.training.checkpoint import load_checkpoint, save_checkpoint
from dlpipe.training.registry import get_spec

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "radam")
INITS = ("default", "he", "xavier", "lecun")
SCHEDULES = ("none", "step", "cosine", "onecycle")


@dataclass
class TrainConfig:
    """Everything one training run depends on; stored in the checkpoint."""

    model: str
    """Registered model name (``dlpipe models`` lists them)."""
    dataset: str | None = None
    """Dataset name; the model's default dataset when None."""
    out: str = "runs/train"
    """Output folder: best.pt, last.pt and metrics.jsonl."""
    data_dir: str | None = None
    """Data root; $DLPIPE_DATA_DIR, else ~/.cache/dlpipe/data, when None."""
    download: bool = False
    """Allow torchvision to download a missing dataset."""
    epochs: int | None = None
    """Number of epochs; the model's recipe when None."""
    batch_size: int | None = None
    """Mini-batch size; the model's recipe when None."""
    lr: float | None = None
    """Peak learning rate; the model's recipe when None."""
    optimizer: str | None = None
    """One of OPTIMIZERS; the model's recipe when None."""
    momentum: float = 0.9
    """Momentum for momentum/nesterov (and RMSprop)."""
    weight_decay: float | None = None
    """L2 weight decay; the model's recipe when None."""
    init: str | None = None
    """Weight initialisation: default, he, xavier or lecun; the model's recipe when None."""
    batch_norm: bool | None = None
    """Insert batch normalisation; the model's own default when None."""
    model_args: dict[str, Any] | None = None
    """More keyword arguments for the model's builder (e.g. ``{"widths": [32, 64, 96, 128, 192]}``)."""
    schedule: str = "none"
    """Learning-rate schedule: none, step (x0.1 at 1/2 and 3/4), cosine or onecycle (per step)."""
    augment: str = "none"
    """Augmentation: none, shift, affine (shift+rotation+scale) or crop."""
    val_fraction: float = 0.1
    """Share of the training split held out for validation and best-checkpoint selection."""
    patience: int = 0
    """Early stopping after this many epochs without validation improvement; 0 disables it."""
    limit: int | None = None
    """Use only the first N training images (quick runs)."""
    test_limit: int | None = None
    """Use only the first N test images for the final test accuracy."""
    seed: int = 0
    """Seed for weights, split, shuffling and augmentation."""
    threads: int | None = None
    """torch intra-op threads; torch's default when None."""
    resume: str | None = None
    """Continue from this last.pt."""
    progress: bool = True
    """Show a progress bar."""
    examples: int = 32
    """Validation images stored (preprocessed) in the checkpoint for export parity checks."""


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill ``None`` fields from the model's recipe and validate the names."""
    spec = get_spec(cfg.model)
    r = spec.recipe
    out = TrainConfig(**asdict(cfg))
    out.dataset = cfg.dataset or spec.default_dataset
    for name in ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "init"):
        if getattr(out, name) is None:
            setattr(out, name, getattr(r, name))
    for value, choices, what in [(out.optimizer, OPTIMIZERS, "optimizer"), (out.init, INITS, "init"),
                                 (out.schedule, SCHEDULES, "schedule"), (out.augment, datasets.AUGMENTATIONS,
                                                                         "augmentation")]:
        if value not in choices:
            raise InputError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    if out.epochs < 1 or out.batch_size < 1 or out.lr <= 0:
        raise InputError("epochs and batch size must be positive and the learning rate above zero")
    if not 0 < out.val_fraction < 1:
        raise InputError(f"val_fraction must be between 0 and 1, got {out.val_fraction}")
    info = datasets.get_dataset(out.dataset)
    if info.task != spec.task:
        raise InputError(f"{out.model} is a {spec.task} model but dataset {out.dataset!r} is for {info.task}")
    if info.task == "detection" and out.augment not in ("none", "flip"):
        raise InputError(f"detection supports --augment none or flip (boxes follow the image), not {out.augment!r}")
    check_model_args(spec, out.model_args)
    return out


# builder arguments the dataset decides (and, for detectors, its normalisation and image scale)
DATASET_MODEL_ARGS = ("in_channels", "num_classes", "image_size", "image_mean", "image_std", "min_size", "max_size",
                      "vocab_size", "pad_id")


def check_model_args(spec, extra: dict[str, Any] | None) -> None:
    """Refuse builder arguments the builder does not take, and those the dataset sets."""
    if not extra:
        return
    params = inspect.signature(spec.builder).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = sorted(k for k in params if k not in DATASET_MODEL_ARGS and params[k].kind is inspect.Parameter.KEYWORD_ONLY)
    for key in extra:
        if key in DATASET_MODEL_ARGS:
            raise InputError(f"model argument {key!r} is set from the dataset; it cannot be given")
        if key not in params and not open_ended:
            raise InputError(f"{spec.name} takes no model argument {key!r}; it takes "
                             f"{', '.join(allowed) if allowed else 'none'}")


def build_model(spec, model_args: dict[str, Any], extra: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    """``spec``'s module from the dataset's ``model_args`` and the user's ``extra`` ones (both returned merged)."""
    model_args = {**model_args, **(extra or {})}
    try:
        return spec.build(**model_args), model_args
    except (TypeError, ValueError) as e:
        if not extra:
            raise
        raise InputError(f"cannot build {spec.name} with model arguments {extra}: {e}") from None


def build_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """A torch.optim optimizer by name (see :data:`OPTIMIZERS`)."""
    o = torch.optim
    table = {
        "sgd": lambda: o.SGD(params, lr=lr, weight_decay=weight_decay),
        "momentum": lambda: o.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay),
        "nesterov": lambda: o.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay),
        "adagrad": lambda: o.Adagrad(params, lr=lr, weight_decay=weight_decay),
        "rmsprop": lambda: o.RMSprop(params, lr=lr, weight_decay=weight_decay),
        "adadelta": lambda: o.Adadelta(params, lr=lr, weight_decay=weight_decay),
        "adam": lambda: o.Adam(params, lr=lr, weight_decay=weight_decay),
        "adamw": lambda: o.AdamW(params, lr=lr, weight_decay=weight_decay),
        "radam": lambda: o.RAdam(params, lr=lr, weight_decay=weight_decay),
    }
    if name not in table:
        raise InputError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return table[name]()


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, lr: float, epochs: int, steps_per_epoch: int):
    """A per-step learning-rate scheduler, or None."""
    total = epochs * steps_per_epoch
    s = torch.optim.lr_scheduler
    if name == "none":
        return None
    if name == "step":
        return s.MultiStepLR(optimizer, milestones=[total // 2, total * 3 // 4], gamma=0.1)
    if name == "cosine":
        return s.CosineAnnealingLR(optimizer, T_max=total)
    if name == "onecycle":
        return s.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    raise InputError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str) -> None:
    """Initialise conv and linear weights: He (ReLU), Xavier (Glorot) or LeCun; biases to zero."""
    if scheme == "default":
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "he":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif scheme == "xavier":
                nn.init.xavier_normal_(m.weight)
            elif scheme == "lecun":
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            else:
                raise InputError(f"unknown init {scheme!r}; choose from {', '.join(INITS)}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler=None,
                    progress: tqdm | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, accuracy and samples per second."""
    model.train()
    total_loss, correct, seen, targets = 0.0, 0, 0, 0
    start = time.perf_counter()
    for images, labels in loader:
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Mean loss and accuracy (per image, or per pixel for segmentation, which also gets mean IoU)."""
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
        if logits.ndim == 4:
            k = logits.shape[1]
            counts = torch.bincount(labels.flatten() * k + pred.flatten(), minlength=k * k).view(k, k)
            confusion = counts if confusion is None else confusion + counts
    out = {"loss": total_loss / max(seen, 1), "acc": correct / max(targets, 1)}
    if confusion is not None:
        out["miou"] = mean_iou(confusion.numpy())
    return out


def mean_iou(confusion) -> float:
    """Mean intersection over union over the classes present in the labels or the predictions."""
    import numpy as np

    inter = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 0.0


def _loader(ds: datasets.ImageTensorDataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=datasets.batch_collate)


def start_run(cfg: TrainConfig) -> Path:
    """Threads and seed as configured; the output folder, created."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def split_indices(n: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(validation, training)`` indices of a seeded random split holding out ``cfg.val_fraction``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_val = max(1, int(round(n * cfg.val_fraction)))
    return perm[:n_val], perm[n_val:]


def fit(cfg: TrainConfig, out: Path, base: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
        scheduler, train_loader: DataLoader, images_per_epoch: int, *, run_epoch: Callable, validate: Callable,
        score: Callable[[dict[str, Any]], float], describe: Callable[[dict[str, Any]], str]
        ) -> tuple[float, list[dict[str, Any]]]:
    """The epochs every task's training shares: resume from ``cfg.resume``, a progress bar, one JSON line
    per epoch in metrics.jsonl, best.pt on the validation ``score``, last.pt (everything ``--resume``
    needs, RNG states included) and early stopping.

    Args:
        base: What every checkpoint holds besides the weights (model name and args, dataset, examples...).
        run_epoch: ``run_epoch(bar)`` trains one epoch and returns its training figures.
        validate: Returns the validation figures (stored with a ``val_`` prefix).
        score: The value of a row that selects best.pt (higher is better).
        describe: The row in words for the epoch line.

    Returns:
        The best validation score and the history of rows.
    """
    start_epoch, best, history, stale = 0, -1.0, [], 0
    if cfg.resume:
        state = load_checkpoint(cfg.resume)
        if state["model"] != cfg.model or state["model_args"] != base["model_args"]:
            raise ModelFileError(f"'{cfg.resume}' holds a {state['model']} with other arguments; cannot resume "
                                 f"{cfg.model} on {cfg.dataset} from it")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"], state["best_val_acc"], list(state["history"])
        torch.set_rng_state(state["rng"])
        train_loader.generator.set_state(state["loader_rng"])
    log_path = out / "metrics.jsonl"
    if start_epoch == 0:
        log_path.write_text("")
    bar = tqdm(total=images_per_epoch * (cfg.epochs - start_epoch), unit="img", disable=not cfg.progress,
               desc=f"{cfg.model}/{cfg.dataset}", dynamic_ncols=True)
    for epoch in range(start_epoch, cfg.epochs):
        row = {"epoch": epoch + 1, **run_epoch(bar)}
        row.update({f"val_{k}": v for k, v in validate().items()})
        row["lr"] = optimizer.param_groups[0]["lr"]
        history.append(row)
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        improved = score(row) > best
        if improved:
            best, stale = score(row), 0
            save_checkpoint({**base, "state_dict": model.state_dict(), "epoch": epoch + 1,
                             "metrics": {k: v for k, v in row.items() if k.startswith("val_")}}, out / "best.pt")
        else:
            stale += 1
        bar.write(f"epoch {epoch + 1}/{cfg.epochs}: {describe(row)}{' *' if improved else ''}", file=sys.stderr)
        save_checkpoint({**base, "state_dict": model.state_dict(), "epoch": epoch + 1, "best_val_acc": best,
                         "history": history, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "rng": torch.get_rng_state(), "loader_rng": train_loader.generator.get_state()},
                        out / "last.pt")
        if cfg.patience and stale >= cfg.patience:
            bar.write(f"early stopping: no validation improvement in {cfg.patience} epochs", file=sys.stderr)
            break
    bar.close()
    return best, history


def main(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model``; write best.pt, last.pt and metrics.jsonl under ``cfg.out``.

    Returns:
        Summary with the checkpoint paths, the best validation accuracy, the test accuracy and the history.
    """
    if get_spec(cfg.model).task == "captioning":  # sentences, not labels: its own loop (issue 4)
        from dlpipe.training.captioning import train_captioner

        return train_captioner(cfg)
    cfg = resolve_config(cfg)
    spec = get_spec(cfg.model)
    if spec.task == "detection":  # lists of images and box targets: its own loop, same config and files
        from dlpipe.training import detection

        return detection.main(cfg)
    info = datasets.get_dataset(cfg.dataset)
    out = start_run(cfg)
    images, labels = datasets.load_split(cfg.dataset, "train", cfg.data_dir, cfg.limit, cfg.download)
    x, y = datasets.to_nchw(images), torch.from_numpy(labels)
    val_idx, train_idx = split_indices(len(y), cfg)
    train_ds = datasets.ImageTensorDataset(x[train_idx], y[train_idx], info,
                                           datasets.augmentation(cfg.augment, info.image_size))
    val_ds = datasets.ImageTensorDataset(x[val_idx], y[val_idx], info)
    train_loader = _loader(train_ds, cfg.batch_size, True, cfg.seed)
    val_loader = _loader(val_ds, 512, False, cfg.seed)

    model_args: dict[str, Any] = {"in_channels": info.channels, "image_size": list(info.image_size),
                                  "num_classes": len(info.labels)}
    if cfg.batch_norm is not None:
        model_args["batch_norm"] = cfg.batch_norm
    model, model_args = build_model(spec, model_args, cfg.model_args)
    init_weights(model, cfg.init)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = build_scheduler(cfg.schedule, optimizer, cfg.lr, cfg.epochs, len(train_loader))

    examples = torch.stack([val_ds[i][0] for i in range(min(cfg.examples, len(val_ds)))])
    base = {"model": cfg.model, "task": spec.task, "model_args": model_args, "config": asdict(cfg),
            "dataset": {"name": info.name, "labels": list(info.labels), "preprocessing": info.preprocessing()},
            "examples": examples, "versions": {"torch": str(torch.__version__)}}

    def describe(row: dict[str, Any]) -> str:
        miou = f" val_miou {row['val_miou']:.4f}" if "val_miou" in row else ""
        return (f"loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} val_loss {row['val_loss']:.4f} "
                f"val_acc {row['val_acc']:.4f}{miou}")

    best_acc, history = fit(cfg, out, base, model, optimizer, scheduler, train_loader, len(train_ds),
                            run_epoch=lambda bar: train_one_epoch(model, train_loader, optimizer, scheduler, bar),
                            validate=lambda: evaluate(model, val_loader),
                            score=lambda row: row.get("val_miou", row["val_acc"]),  # segmentation: mean IoU
                            describe=describe)
    log_path = out / "metrics.jsonl"

    best = load_checkpoint(out / "best.pt")
    model.load_state_dict(best["state_dict"])
    test_images, test_labels = datasets.load_split(cfg.dataset, "test", cfg.data_dir, cfg.test_limit, cfg.download)
    test_ds = datasets.ImageTensorDataset(datasets.to_nchw(test_images), torch.from_numpy(test_labels), info)
    test = evaluate(model, _loader(test_ds, 512, False, cfg.seed))
    best["metrics"].update({f"test_{k}": v for k, v in test.items()})
    save_checkpoint(best, out / "best.pt")
    return {"best": str(out / "best.pt"), "last": str(out / "last.pt"), "log": str(log_path),
            "best_val_acc": best_acc, "test_acc": test["acc"], "test_miou": test.get("miou"), "history": history}

