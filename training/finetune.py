"""Transfer learning (issue 6): fine-tune a pretrained classifier on a user's own images.

The source is a dlpipe classifier checkpoint or a torchvision architecture with published weights from
the local torch cache (``torchvision:resnet18:DEFAULT``; nothing is downloaded). Its last linear layer
(the head) is replaced to match the new classes; the images are converted to the backbone's input
(colour mode, size, normalisation) with the runtime's own preprocessing, so training and serving see
the same pixels. Training runs in two stages: the new head alone (``head_epochs``, the "head only"
accuracy), then the network with the requested layers frozen and separate learning rates for the head
and the backbone (parameter groups). The result is the same checkpoint ``dlpipe train`` writes, so
export, quantize, evaluate, bench and classify work on it unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dlpipe.runtime.errors import DataNotFoundError, InputError
from dlpipe.runtime.images import preprocess
from dlpipe.runtime.metadata import Preprocessing
from dlpipe.training import data as datasets
from dlpipe.training import distributed, tracking
from dlpipe.training.checkpoint import (best_score, checkpoint_payload, load_checkpoint, model_from_checkpoint,
                                       save_checkpoint)
from dlpipe.training.dataset_info import DatasetInfo
from dlpipe.training.folders import per_class_indices, read_folder
from dlpipe.training.loop import (EpochHooks, FitState, MetricsLog, build_optimizer, build_scheduler, fit,
                                  init_weights, load_resume, restore, seeded_loader, start_run)
from dlpipe.training.precision import Precision
from dlpipe.training.pretrained import TORCHVISION_PREFIX, load_torchvision
from dlpipe.training.registry import get_spec
from dlpipe.training.tasks.classification import METRIC as ACCURACY, train_one_epoch
from dlpipe.training.train import final_curves, tracking_settings

SCHEDULES = ("none", "step", "cosine")  # onecycle would overwrite the per-group learning rates
# best.pt: the best validation accuracy; among equal ones (small validation sets), the lowest loss
METRIC = replace(ACCURACY, tiebreak="loss")


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run depends on; stored in the checkpoint."""

    source: str
    """A dlpipe classifier checkpoint, or ``torchvision:ARCH[:WEIGHTS]`` (WEIGHTS: an enum member such as
    DEFAULT or IMAGENET1K_V1, read from the local torch cache, or a state-dict file)."""
    data: str
    """An image folder (one sub-folder of images per class) or a registered dataset name."""
    out: str = "runs/finetune"
    """Output folder: best.pt, last.pt and metrics.jsonl."""
    per_class: int | None = None
    """Use at most this many labelled images per class (few-shot); the validation images come out of them."""
    freeze: str = "none"
    """In the second stage: ``backbone`` (train the head only), ``none``, or N (freeze the first N
    weighted layers of the backbone, each with the normalisation layers after it); ignored with ``scratch``."""
    head_epochs: int = 2
    """First stage: epochs training the new head alone (the backbone frozen)."""
    epochs: int = 5
    """Second stage: epochs with the freezing given by ``freeze``."""
    lr: float = 1e-4
    """Backbone learning rate (second stage); every layer's rate with ``scratch``."""
    head_lr: float = 1e-3
    """Head learning rate (both stages)."""
    optimizer: str = "adam"
    """One of dlpipe.training.train.OPTIMIZERS."""
    momentum: float = 0.9
    """Momentum for momentum/nesterov (and RMSprop)."""
    weight_decay: float = 0.0
    """L2 weight decay."""
    schedule: str = "cosine"
    """Per-stage learning-rate schedule: none, step or cosine."""
    batch_size: int = 32
    """Mini-batch size."""
    augment: str = "none"
    """Augmentation: none, shift, affine or crop."""
    image_size: int | None = None
    """Square input size for a torchvision source (default: the weights' crop size); a checkpoint's size
    is fixed by its training."""
    val_fraction: float = 0.2
    """Share of each class held out for validation and best-checkpoint selection."""
    test_limit: int | None = None
    """Registered datasets: use only the first N test images for the test accuracy."""
    scratch: bool = False
    """Baseline: the same network, images and budget (head_epochs + epochs) from random weights."""
    data_dir: str | None = None
    """Root of the registered datasets; $DLPIPE_DATA_DIR, else ~/.cache/dlpipe/data, when None."""
    seed: int = 0
    """Seed for the image choice, the split, the new head, shuffling and augmentation."""
    threads: int | None = None
    """torch intra-op threads; torch's default when None."""
    progress: bool = True
    """Show a progress bar."""
    examples: int = 32
    """Images stored (preprocessed) in the checkpoint for export parity checks."""
    patience: int = 0
    """Early stopping: end a stage after this many epochs without validation improvement; 0 disables it."""
    resume: str | None = None
    """Continue from this last.pt (the stage and epoch it stopped at)."""
    amp: str | None = None
    """Mixed precision of the forward pass and loss: None/``off``, ``bf16`` or ``fp16`` (weights stay fp32)."""
    ddp_timeout: float = distributed.DEFAULT_TIMEOUT_S
    """Distributed runs: seconds a collective waits for the other processes before the run stops."""


@dataclass
class Source:
    """A pretrained classifier: the module with its original head, how it rebuilds, and its input."""

    model: str
    model_args: dict[str, Any]
    module: nn.Module
    preprocessing: dict[str, Any]
    description: str


# ---------------------------------------------------------------------------------------------- sources

def load_source(text: str, image_size: int | None = None) -> Source:
    """The pretrained classifier named by ``text`` (a checkpoint path or ``torchvision:ARCH[:WEIGHTS]``).

    Raises:
        ModelFileError: a missing or unreadable checkpoint, or a weights file that does not fit.
        DataNotFoundError: torchvision weights that are not in the local torch cache.
        InputError: a source that is not a classifier, or an unknown architecture or weights name.
    """
    if text.startswith(TORCHVISION_PREFIX):
        return _torchvision_source(text, image_size)
    ckpt = load_checkpoint(text)
    spec = get_spec(ckpt["model"])
    if spec.task != "classification":
        raise InputError(f"'{text}' holds a {spec.task} model ({spec.name}); fine-tuning needs a classifier")
    if image_size is not None:
        raise InputError(f"--image-size is for torchvision sources; '{text}' takes the "
                         f"{'x'.join(map(str, ckpt['model_args']['image_size']))} images it was trained on")
    return Source(spec.name, dict(ckpt["model_args"]), model_from_checkpoint(ckpt),
                  dict(ckpt["dataset"]["preprocessing"]), f"{text} ({spec.name} on {ckpt['dataset']['name']})")


def _torchvision_source(text: str, image_size: int | None) -> Source:
    found = load_torchvision(text)
    arch, weights, file, module = found.arch, found.weights, found.file, found.module
    transforms = weights.transforms()
    size = image_size or int(transforms.crop_size[0])
    if size < 8:
        raise InputError(f"image size must be at least 8, got {size}")
    preprocessing = {"color": "RGB", "size": [size, size], "resize": "bilinear", "scale": 1 / 255,
                     "mean": list(transforms.mean), "std": list(transforms.std), "layout": "NCHW"}
    args = {"arch": arch, "in_channels": 3, "image_size": [size, size], "num_classes": len(weights.meta["categories"])}
    return Source("torchvision", args, module.eval(), preprocessing, f"torchvision {arch} ({weights}, '{file}')")


# ------------------------------------------------------------------------------------ head and freezing

def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classification head: the last ``nn.Linear`` of the model (its qualified name and module)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InputError(f"{type(model).__name__} has no linear output layer to replace")
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int, auxiliary: Sequence[str] = ()) -> str:
    """Put a freshly initialised ``Linear(in_features, num_classes)`` in place of the head (and of the
    ``auxiliary`` heads named, see :func:`auxiliary_heads`); returns the head's name."""
    name, _ = find_head(model)
    for target in (name, *auxiliary):
        old = model.get_submodule(target)
        parent_name, _, attr = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return name


@torch.no_grad()
def auxiliary_heads(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The linear layers whose outputs a training-mode forward returns beside the logits (GoogLeNet's
    auxiliary classifiers, issue 15): they predict the source's classes too, so they are replaced with the
    head. Found by running a copy of the model (its batch-norm statistics untouched) on ``example``."""
    probe = copy.deepcopy(model).train()
    produced: dict[int, str] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: produced.__setitem__(id(out), name))
             for name, m in probe.named_modules() if isinstance(m, nn.Linear)]
    outputs = probe(example)
    for hook in hooks:
        hook.remove()
    if not isinstance(outputs, (tuple, list)):
        return []
    # an output tensor stays alive to the end, so the last layer recorded under its id is the one that made it
    return [produced[id(out)] for out in outputs[1:] if id(out) in produced]


def backbone_layers(model: nn.Module, head: str) -> list[list[nn.Module]]:
    """The backbone's weighted layers in order, each (conv or linear) with the parameter-holding modules
    that follow it before the next one (normalisation layers): the units ``--freeze N`` counts."""
    layers: list[list[nn.Module]] = []
    for name, m in model.named_modules():
        if name == head or name.startswith(head + ".") or next(m.parameters(recurse=False), None) is None:
            continue
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or not layers:
            layers.append([m])
        else:
            layers[-1].append(m)
    return layers


def parse_freeze(value: str) -> str | int:
    """``backbone``, ``none`` or a non-negative layer count."""
    if value in ("backbone", "none"):
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise InputError(f"--freeze must be backbone, none or a number of layers, got {value!r}")
    return n


def freeze(model: nn.Module, head: str, how: str | int) -> list[nn.Module]:
    """Set ``requires_grad`` for ``how`` (``backbone``, ``none`` or N layers); the head always trains.

    Returns:
        The frozen modules (their normalisation layers must stay in eval mode while training).
    """
    layers = backbone_layers(model, head)
    how = parse_freeze(how) if isinstance(how, str) else how
    count = {"backbone": len(layers), "none": 0}.get(how, how)
    if count > len(layers):
        raise InputError(f"--freeze {count}: the backbone of {type(model).__name__} has only {len(layers)} layers")
    frozen = [m for layer in layers[:count] for m in layer]
    for p in model.parameters():
        p.requires_grad_(True)
    for m in frozen:
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    return frozen


# ------------------------------------------------------------------------------------------------- data

@dataclass
class FinetuneData:
    """uint8 NCHW images already at the backbone's input, split per class into train and validation."""

    name: str
    labels: list[str]
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor] | None


def to_input(images: list, color: str, size: tuple[int, int], names: list[str] | None = None) -> torch.Tensor:
    """Images (paths or arrays) -> uint8 NCHW at the backbone's colour mode and size, through the
    runtime's own conversion and resize, so training sees what ``dlpipe classify`` will feed the model."""
    channels = 1 if color == "L" else 3
    identity = Preprocessing(color=color, size=tuple(size), resize="bilinear", scale=1.0,
                             mean=(0.0,) * channels, std=(1.0,) * channels)
    chunk = 2048  # the runtime returns float32; convert a chunk at a time to keep memory at uint8 size
    return torch.cat([torch.from_numpy(preprocess(images[i:i + chunk], identity, names and names[i:i + chunk])
                                       .astype(np.uint8)) for i in range(0, len(images), chunk)])


def split_per_class(labels: np.ndarray, names: list[str], val_fraction: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: ``val_fraction`` of each class (at least one image) held out for validation."""
    train, val = [], []
    for k, name in enumerate(names):
        idx = rng.permutation(np.flatnonzero(labels == k))
        if len(idx) < 2:
            raise InputError(f"class {name!r} has {len(idx)} image(s); at least 2 are needed (one to train on, "
                             "one to validate)")
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_data(data: str, preprocessing: dict[str, Any], per_class: int | None = None, val_fraction: float = 0.2,
              seed: int = 0, data_dir: str | None = None, test_limit: int | None = None) -> FinetuneData:
    """The fine-tuning images at the backbone's input: an image folder or a registered dataset.

    Raises:
        DataNotFoundError: a folder that does not exist or has no class folders; dataset files missing.
        InputError: an empty class folder, a single class, an unreadable image (named), too few images.
    """
    rng = np.random.default_rng(seed)
    color, size = preprocessing["color"], tuple(preprocessing["size"])
    root = Path(data)
    test = None
    if root.is_dir():
        names, files, labels = read_folder(root, per_class, rng)
        images = to_input(files, color, size, [f"'{f}'" for f in files])
        name = str(root.resolve())
    elif data in datasets.DATASETS:
        info = datasets.get_dataset(data)
        if info.task != "classification":
            raise InputError(f"dataset {data!r} is for {info.task}; fine-tuning needs a classification dataset")
        raw, all_labels = datasets.load_split(data, "train", data_dir)
        keep = per_class_indices(all_labels, per_class, rng)
        names, labels, name = list(info.labels), all_labels[keep], data
        images = to_input(list(raw[keep]), color, size)
        test_raw, test_labels = datasets.load_split(data, "test", data_dir, test_limit)
        test = (to_input(list(test_raw), color, size), torch.from_numpy(test_labels))
    elif root.exists():
        raise InputError(f"'{data}' is a file; --data takes an image folder (one sub-folder per class) or a dataset")
    elif "/" in data or root.suffix:
        raise DataNotFoundError(f"image folder '{data}' does not exist")
    else:
        raise InputError(f"{data!r} is neither an image folder nor a registered dataset "
                         f"({', '.join(n for n, d in datasets.DATASETS.items() if d.task == 'classification')})")
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    train_idx, val_idx = split_per_class(labels, names, val_fraction, rng)
    y = torch.from_numpy(labels)
    return FinetuneData(name, names, (images[train_idx], y[train_idx]), (images[val_idx], y[val_idx]), test)


# --------------------------------------------------------------------------------------------- training

def _loader(images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, batch_size: int,
            augment: str = "none", seed: int = 0, shuffle: bool = False) -> DataLoader:
    ds = datasets.ImageTensorDataset(images, labels, info, datasets.augmentation(augment, info.image_size))
    return seeded_loader(ds, batch_size, shuffle, seed, datasets.batch_collate)


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler,
                frozen: list[nn.Module], progress: tqdm | None = None, precision: Precision | None = None
                ) -> dict[str, float]:
    """One pass over ``loader``; frozen modules stay in eval mode (batch-norm statistics unchanged)."""
    return train_one_epoch(model, loader, optimizer, scheduler, progress, frozen=frozen, precision=precision)


@torch.no_grad()
def score(model: nn.Module, loader: DataLoader, labels: list[str]) -> dict[str, Any]:
    """Loss, accuracy and per-class accuracy (None for a class without images)."""
    model.eval()
    total_loss, preds, truth = 0.0, [], []
    for images, y in loader:
        logits = model(images)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        preds.append(logits.argmax(1))
        truth.append(y)
    pred, true = torch.cat(preds), torch.cat(truth)
    per_class = {name: (float((pred[true == k] == k).float().mean()) if (true == k).any() else None)
                 for k, name in enumerate(labels)}
    return {"loss": total_loss / len(true), "acc": float((pred == true).float().mean()), "per_class": per_class}


def _param_groups(model: nn.Module, head: str, head_lr: float, lr: float) -> list[dict[str, Any]]:
    head_params = list(model.get_submodule(head).parameters())
    ids = {id(p) for p in head_params}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": head_params, "lr": head_lr, "name": "head"}]
    return groups + ([{"params": backbone, "lr": lr, "name": "backbone"}] if backbone else [])


def resolve_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """Validate the names and numbers of ``cfg`` (the freeze value is parsed later)."""
    if cfg.schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {cfg.schedule!r}; choose from {', '.join(SCHEDULES)}")
    if cfg.augment not in datasets.AUGMENTATIONS:
        raise InputError(f"unknown augmentation {cfg.augment!r}; choose from {', '.join(datasets.AUGMENTATIONS)}")
    if cfg.head_epochs < 0 or cfg.epochs < 0 or cfg.head_epochs + cfg.epochs < 1:
        raise InputError("head_epochs and epochs must not be negative, and at least one epoch must run")
    if cfg.batch_size < 1 or cfg.lr <= 0 or cfg.head_lr <= 0:
        raise InputError("the batch size must be positive and the learning rates above zero")
    if cfg.patience < 0:
        raise InputError(f"patience must not be negative, got {cfg.patience}")
    parse_freeze(cfg.freeze)
    return cfg


@dataclass
class _Session:
    """A fine-tuning run's network, data and bookkeeping, shared by its stages."""

    cfg: FinetuneConfig
    source: Source
    data: FinetuneData
    model: nn.Module
    head: str
    base: dict[str, Any]
    out: Path
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader | None
    log: MetricsLog
    precision: Precision

    def stages(self) -> list[tuple[str, int, str | int]]:
        cfg = self.cfg
        if cfg.scratch:
            return [("full", cfg.head_epochs + cfg.epochs, "none")]
        return [("head", cfg.head_epochs, "backbone"), ("finetune", cfg.epochs, parse_freeze(cfg.freeze))]

    def run_stage(self, stage: str, first: int, end: int, how: str | int, state: FitState,
                  resumed: dict | None) -> FitState:
        """Train the epochs up to ``end`` with ``how`` frozen on the shared loop (continuing a resumed stage)."""
        cfg, model, head = self.cfg, self.model, self.head
        frozen = freeze(model, head, how)
        frozen_count = {"backbone": len(backbone_layers(model, head)), "none": 0}.get(how, how)
        head_lr = cfg.lr if cfg.scratch else cfg.head_lr
        optimizer = build_optimizer(cfg.optimizer, _param_groups(model, head, head_lr, cfg.lr), head_lr,
                                    cfg.momentum, cfg.weight_decay)
        scheduler = build_scheduler(cfg.schedule, optimizer, head_lr, end - first, len(self.train_loader))
        generator = self.train_loader.generator
        if resumed is not None and resumed.get("stage") == stage:  # continue where the stage stopped
            state = restore(resumed, model, optimizer, scheduler, generator)
        trained = distributed.wrap(model)  # DDP made after freezing: it reduces what requires gradients now
        hooks = EpochHooks(train=lambda bar: train_epoch(trained, self.train_loader, optimizer, scheduler, frozen, bar,
                                                         self.precision),
                           validate=lambda: {k: v for k, v in score(model, self.val_loader, self.data.labels).items()
                                             if k != "per_class"}, metric=METRIC)
        return fit(self.out, self.base, model, optimizer, scheduler, hooks, state, end_epoch=end,
                   images_per_epoch=len(self.data.train[1]), log=self.log, generator=generator,
                   patience=cfg.patience, progress=cfg.progress, desc=f"finetune {self.source.model} ({stage})",
                   row_extra={"stage": stage, "frozen_layers": frozen_count}, train_loader=self.train_loader,
                   seed=cfg.seed)


def _session(cfg: FinetuneConfig) -> _Session:
    """Load the source and the data, put the new head on (or build the scratch baseline), make the loaders."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = load_source(cfg.source, cfg.image_size)
    pre = source.preprocessing
    data = load_data(cfg.data, pre, cfg.per_class, cfg.val_fraction, cfg.seed, cfg.data_dir, cfg.test_limit)
    info = DatasetInfo(data.name, 1 if pre["color"] == "L" else 3, tuple(pre["size"]), tuple(pre["mean"]),
                       tuple(pre["std"]), tuple(data.labels), loader=None)  # the data is loaded above
    out = start_run(cfg)
    model, model_args = source.module, {**source.model_args, "num_classes": len(data.labels)}
    if cfg.scratch:  # the baseline: the same network built afresh, with the model's usual initialisation
        model = get_spec(source.model).build(**model_args)
        init_weights(model, get_spec(source.model).recipe.init)
        head = find_head(model)[0]
    else:
        example = datasets.normalize(data.train[0][:2], info)
        head = replace_head(model, len(data.labels), auxiliary_heads(model, example))
    freeze(model, head, parse_freeze(cfg.freeze))  # a layer count beyond the backbone fails now, not later
    # real inputs for the export parity check: validation images first, then training images
    pool = torch.cat([data.val[0], data.train[0][:max(0, cfg.examples - len(data.val[1]))]])[:cfg.examples]
    if len(pool) < 4:
        raise InputError(f"'{cfg.data}' holds {len(pool)} images; at least 4 are needed")
    base = checkpoint_payload(model=source.model, task="classification", model_args=model_args, config=asdict(cfg),
                              dataset={"name": data.name, "labels": list(data.labels), "preprocessing": pre},
                              examples=datasets.normalize(pool, info),
                              transfer={"source": source.description, "head": head, "freeze": cfg.freeze,
                                        "scratch": cfg.scratch})
    return _Session(cfg, source, data, model, head, base, out,
                    _loader(*data.train, info, cfg.batch_size, cfg.augment, cfg.seed, shuffle=True),
                    _loader(*data.val, info, 256), _loader(*data.test, info, 512) if data.test is not None else None,
                    MetricsLog(out / "metrics.jsonl", fresh=cfg.resume is None), Precision(cfg.amp))


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.source`` on ``cfg.data`` on the shared loop, stage by stage (head only, then with
    ``cfg.freeze``); write best.pt (best validation accuracy over both stages), last.pt (``cfg.resume``
    continues from it) and metrics.jsonl under ``cfg.out``.

    Returns:
        Summary: checkpoint paths; per stage its epochs and best validation accuracy (``stages``); the stage
        best.pt came from (``best_stage``); the saved model's figures (``after``: best.pt loaded back and
        scored, validation and, for a registered dataset, test) and the head-only stage's best (``head_only``);
        per-class accuracy of the saved model, the history and the command to export.
    """
    with distributed.session(cfg.ddp_timeout):
        return _finetune(resolve_config(cfg))


def finetune_command(nproc: int | None = None, nnodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str = "dlpipe", **options: Any) -> dict[str, Any] | None:
    """``dlpipe finetune [options]``: :func:`finetune` of a :class:`FinetuneConfig`, in ``nproc``
    data-parallel processes (x ``nnodes`` machines) through torch's launcher when asked (global batch:
    ``batch_size`` x processes); None on a node that does not hold rank 0."""
    if ((nproc or 1) > 1 or nnodes > 1) and not distributed.launched():
        return distributed.launch(finetune_command, nproc=nproc or 1, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                                  rdzv_id=rdzv_id, **options)
    track = tracking_settings(options)
    with tracking.tracked(track, options.get("out") or "runs/finetune") as tracker:
        try:
            result = finetune(FinetuneConfig(**options))
        finally:
            final_curves(options.get("out"))  # curves.png with every row, once more
        if tracker is not None:
            tracker.summary, result["tracking"] = result, tracking.described(tracker)
    return result


def _finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    session = _session(cfg)
    resumed = load_resume(cfg.resume, session.base) if cfg.resume else None
    state, first, head_test = FitState(), 0, None
    if resumed is not None:
        state = FitState(resumed["epoch"], best_score(resumed), list(resumed["history"]))
        session.model.load_state_dict(resumed["state_dict"])
    for stage, epochs, how in session.stages():
        end, state.epoch = first + epochs, max(state.epoch, first)
        if state.epoch < end:
            state = session.run_stage(stage, first, end, how, state, resumed)
            if stage == "head" and session.test_loader is not None and distributed.is_main():  # best.pt: the head's
                head_test = _score_saved(session, load_checkpoint(session.out / "best.pt"), state.history)
        first = end
    if not distributed.is_main():  # rank 0 wrote best.pt and reports
        return {"rank": distributed.rank()}
    return _summary(session, state, head_test)


def stage_results(history: Sequence[dict[str, Any]], stages: Sequence[tuple[str, int]]) -> dict[str, dict[str, Any]]:
    """Per stage: the epochs asked for and run, and its best validation row (by the rule that picks best.pt:
    the accuracy, then the lower loss; the earlier epoch among equal ones). A stage that ran no epoch
    (``--head-epochs 0``, ``--epochs 0``) has ``None`` for its best."""
    results = {}
    for name, epochs in stages:
        rows = [r for r in history if r.get("stage") == name]
        best = max(rows, key=METRIC.rank, default=None)  # max keeps the first of equal ranks, as fit() does
        results[name] = {"epochs": epochs, "epochs_run": len(rows), "best_epoch": best and best["epoch"],
                         "best_val_acc": best and best["val_acc"], "best_val_loss": best and best["val_loss"]}
    return results


def _stage_of(history: Sequence[dict[str, Any]], epoch: int) -> str | None:
    return next((r.get("stage") for r in history if r["epoch"] == epoch), None)


def _score_saved(session: _Session, ckpt: dict[str, Any], history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A checkpoint's weights loaded into a fresh model (as export will load them) and scored on the
    validation images and the test split where there is one: the figures the saved model really has."""
    model, labels = model_from_checkpoint(ckpt), session.data.labels
    scores = {"stage": _stage_of(history, ckpt["epoch"]), "epoch": ckpt["epoch"],
              "val": score(model, session.val_loader, labels)}
    scores["test"] = score(model, session.test_loader, labels) if session.test_loader is not None else None
    return scores


def _head_only(stage: dict[str, Any] | None, head_test: dict[str, Any] | None) -> dict[str, Any] | None:
    """The head-only stage's best validation accuracy (and epoch), with the test accuracy of its weights
    where best.pt held them right after the stage (None when the stage ran no epoch)."""
    if not stage or stage["best_epoch"] is None:
        return None
    head_only = {"val_acc": stage["best_val_acc"], "epoch": stage["best_epoch"]}
    if head_test is not None and head_test["test"] is not None and head_test["epoch"] == stage["best_epoch"]:
        head_only["test_acc"] = head_test["test"]["acc"]
    return head_only


def _summary(session: _Session, state: FitState, head_test: dict[str, Any] | None) -> dict[str, Any]:
    """Load best.pt back, score it (validation; test split of a registered dataset) and describe the run."""
    cfg, model, out, data = session.cfg, session.model, session.out, session.data
    best = load_checkpoint(out / "best.pt")
    saved = _score_saved(session, best, state.history)
    stages = stage_results(state.history, [(name, epochs) for name, epochs, _ in session.stages()])
    if saved["stage"] == "head":  # the saved weights are the head stage's best: its test figure is theirs
        head_test = saved
    head_only = _head_only(stages.get("head"), head_test)
    after = {"val_acc": saved["val"]["acc"], "val_loss": saved["val"]["loss"]}
    final = saved["test"] or saved["val"]
    if saved["test"] is not None:
        after.update(test_acc=final["acc"], test_loss=final["loss"])
        best["metrics"].update(test_acc=final["acc"], test_loss=final["loss"])
    if head_only is not None:
        best["metrics"].update({f"head_only_{k}": v for k, v in head_only.items() if k != "epoch"})
    best["stage"] = saved["stage"]
    save_checkpoint(best, out / "best.pt")
    head = session.head
    return {"best": str(out / "best.pt"), "last": str(out / "last.pt"), "log": str(session.log.path),
            "source": session.source.description, "model": session.source.model, "dataset": data.name,
            "labels": data.labels, "head": head, "scratch": cfg.scratch,
            "backbone_layers": len(backbone_layers(model, head)),
            "frozen_layers": state.history[-1]["frozen_layers"] if state.history else 0,
            "images": {"train": len(data.train[1]), "val": len(data.val[1]),
                       "test": len(data.test[1]) if data.test is not None else None},
            "stages": stages, "best_stage": saved["stage"], "best_epoch": best["epoch"],
            "head_only": head_only, "after": after, "metric": "val_acc",
            "best_val_score": state.best, "per_class_split": "test" if session.test_loader is not None else "val",
            "per_class_accuracy": final["per_class"], "history": state.history,
            "export_command": f"dlpipe export {out / 'best.pt'} --out {out / 'model.onnx'}"}
