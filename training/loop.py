"""The one supervised training loop every task shares (ultralytics' ``BaseTrainer``, torchvision's
``references``): one :class:`TrainConfig`, resume, a progress bar, ``metrics.jsonl``, ``best.pt`` on the
task's validation metric, ``last.pt`` and early stopping. A task plugs in through its ``prepare`` hook,
which returns a :class:`TaskRun` (its data, one epoch of training, validation and the test)."""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.training import data as datasets
from dlpipe.training import distributed, plots, tracking
from dlpipe.training.checkpoint import best_score, checkpoint_payload, load_checkpoint, save_checkpoint
from dlpipe.training.registry import ModelSpec, get_spec

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
    """More keyword arguments for the model's builder (e.g. ``{"widths": [32, 64, 96, 128, 192]}``), over the
    recipe's."""
    schedule: str | None = None
    """Learning-rate schedule: none, step (x0.1 at 1/2 and 3/4), cosine or onecycle (per step); the recipe's
    when None."""
    augment: str | None = None
    """Augmentation: none, shift, affine (shift+rotation+scale), crop or flip; the recipe's when None."""
    label_smoothing: float | None = None
    """Cross-entropy label smoothing of classifiers (0: none); the recipe's when None."""
    recipe: str = "default"
    """The model's named recipe that fills the fields left None (``default``, ``quick``...)."""
    val_fraction: float = 0.1
    """Share of the training split held out for validation and best-checkpoint selection."""
    patience: int = 0
    """Early stopping after this many epochs without validation improvement; 0 disables it."""
    limit: int | None = None
    """Use only the first N training images (quick runs)."""
    test_limit: int | None = None
    """Use only the first N test images for the final test metric."""
    seed: int = 0
    """Seed for weights, split, shuffling and augmentation."""
    threads: int | None = None
    """torch intra-op threads; torch's default when None."""
    resume: str | None = None
    """Continue from this last.pt."""
    init_from: str | None = None
    """Start from the weights of this checkpoint wherever a parameter of the same name and shape exists (an
    RBM stack's or an autoencoder's encoder for unsupervised pretraining); the rest keep ``init``."""
    progress: bool = True
    """Show a progress bar."""
    examples: int = 32
    """Validation images stored (preprocessed) in the checkpoint for export parity checks."""
    amp: str | None = None
    """Mixed precision of the forward pass and loss: None/``off`` (float32), ``bf16`` or ``fp16`` (autocast;
    the weights and checkpoints stay float32)."""
    sync_bn: bool = False
    """Distributed runs: synchronise batch-norm statistics across processes (``SyncBatchNorm``, GPUs only)."""
    ddp_timeout: float = distributed.DEFAULT_TIMEOUT_S
    """Distributed runs: seconds a collective waits for the other processes before the run stops."""


@dataclass(frozen=True)
class Metric:
    """A task's validation metric: the key (``val_<key>``) that selects ``best.pt``, higher is better.

    Attributes:
        key: Figure name in the validation row and the evaluation report (``acc``, ``miou``...).
        name: In words (``accuracy``, ``mean IoU``...).
        shown: ``(key, words)`` of the validation figures printed after each epoch.
        tiebreak: A validation figure (lower is better) that decides between epochs of equal score.
    """

    key: str
    name: str
    shown: tuple[tuple[str, str], ...] = ()
    tiebreak: str | None = None

    def rank(self, row: dict[str, Any]) -> tuple[float, float]:
        """How good a validation row is (compared as a tuple: the metric, then the tie-break)."""
        return row[f"val_{self.key}"], -row[f"val_{self.tiebreak}"] if self.tiebreak else 0.0

    def describe(self, row: dict[str, Any]) -> str:
        """An epoch's row in words: the training loss (and accuracy) and the validation figures."""
        text = f"loss {row['train_loss']:.4f}"
        if "train_acc" in row:
            text += f" acc {row['train_acc']:.4f}"
        return text + "".join(f" {words} {row['val_' + k]:.4f}" for k, words in self.shown if f"val_{k}" in row)


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill ``None`` fields from the model's recipe (``cfg.recipe``, with the dataset's override) and validate
    the names and numbers (the task checks its dataset and what it supports when it prepares the data).
    Explicit values win field by field; the recipe's model arguments are merged under the user's."""
    spec = get_spec(cfg.model)
    out = TrainConfig(**asdict(cfg))
    out.dataset = cfg.dataset or spec.default_dataset
    recipe = spec.recipe_for(out.dataset, cfg.recipe)
    for name, value in recipe.items():
        if getattr(out, name) is None:
            setattr(out, name, value)
    out.model_args = {**recipe["model_args"], **(cfg.model_args or {})} or None
    for value, choices, what in [(out.optimizer, OPTIMIZERS, "optimizer"), (out.init, INITS, "init"),
                                 (out.schedule, SCHEDULES, "schedule"),
                                 (out.augment, datasets.AUGMENTATIONS, "augmentation")]:
        if value not in choices:
            raise InputError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    if out.epochs < 1 or out.batch_size < 1 or out.lr <= 0:
        raise InputError("epochs and batch size must be positive and the learning rate above zero")
    if not 0 <= out.label_smoothing < 1:
        raise InputError(f"label smoothing must be in [0, 1), got {out.label_smoothing}")
    if not 0 < out.val_fraction < 1:
        raise InputError(f"val_fraction must be between 0 and 1, got {out.val_fraction}")
    distributed.check_sync_bn(out.sync_bn)
    check_model_args(spec, out.model_args)
    return out


# builder arguments the dataset decides (and, for detectors, its normalisation and image scale)
DATASET_MODEL_ARGS = ("in_channels", "num_classes", "image_size", "image_mean", "image_std", "min_size", "max_size",
                      "vocab_size", "pad_id")


def check_model_args(spec: ModelSpec, extra: dict[str, Any] | None) -> None:
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


def build_model(spec: ModelSpec, model_args: dict[str, Any], extra: dict[str, Any] | None
                ) -> tuple[nn.Module, dict[str, Any]]:
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
    table = {"none": lambda: None,
             "step": lambda: s.MultiStepLR(optimizer, milestones=[total // 2, total * 3 // 4], gamma=0.1),
             "cosine": lambda: s.CosineAnnealingLR(optimizer, T_max=total),
             "onecycle": lambda: s.OneCycleLR(optimizer, max_lr=lr, total_steps=total)}
    if name not in table:
        raise InputError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    return table[name]()


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str) -> None:
    """Initialise conv and linear weights: He (ReLU), Xavier (Glorot) or LeCun; biases to zero."""
    if scheme == "default":
        return
    inits = {"he": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"), "xavier": nn.init.xavier_normal_,
             "lecun": lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear")}
    if scheme not in inits:
        raise InputError(f"unknown init {scheme!r}; choose from {', '.join(INITS)}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            inits[scheme](m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def load_matching(model: nn.Module, path: str | Path) -> list[str]:
    """Copy every tensor of the checkpoint at ``path`` whose name and shape ``model`` also has.

    Returns:
        The names copied.

    Raises:
        ModelFileError: the file holds no learned weight ``model`` can take (a checkpoint of an unrelated model,
            or of the same kind with other layer sizes): buffers alone matching would start from nothing.
    """
    source = load_checkpoint(path)["state_dict"]
    own = model.state_dict()
    names = [k for k, v in source.items() if k in own and own[k].shape == v.shape]
    weights = {n for n, _ in model.named_parameters()}
    if not weights.intersection(names):
        raise ModelFileError(f"'{path}' holds no weights of the same names and shapes as {type(model).__name__}'s; "
                             "nothing to start from (other layer sizes?)")
    for name in names:
        own[name].copy_(source[name])
    print(f"init-from: {len(names)} of {len(own)} tensors from {path}", file=sys.stderr)
    return names


def start_run(cfg: Any) -> Path:
    """Threads and seed as configured (any config with ``threads``, ``seed`` and ``out``); the output
    folder, created."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(training, validation)`` indices of a seeded random split holding out ``val_fraction``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def seeded_loader(dataset, batch_size: int, shuffle: bool, seed: int, collate_fn=None) -> DataLoader:
    """A DataLoader whose shuffling has its own seeded generator (saved in ``last.pt`` for resume); in a
    distributed run a shuffled loader serves this rank's shard (``DistributedSampler``, ``set_epoch``
    each epoch by :func:`fit`)."""
    if shuffle and distributed.active():
        return distributed.loader(dataset, batch_size, seed, collate_fn)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed),
                      collate_fn=collate_fn)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed as it is written (started afresh unless resuming)."""

    def __init__(self, path: str | Path, fresh: bool = True):
        self.path = Path(path)
        if fresh and distributed.is_main():  # rank 0 alone writes in a distributed run
            self.path.write_text("")

    def write(self, row: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tracking.log_row(row)  # the active tracker (--log tensorboard|mlflow), if any
        plots.curves(self.path)  # curves.png beside the file


@dataclass
class FitState:
    """Where a run stands: the next epoch, the best validation score so far and the rows so far."""

    epoch: int = 0
    best: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)
    best_rank: tuple[float, float] | None = None


@dataclass
class EpochHooks:
    """What one epoch does inside :func:`fit`: ``train(bar)`` returns the training figures and
    ``validate()`` the validation ones (stored with a ``val_`` prefix)."""

    train: Callable[[tqdm], dict[str, Any]]
    validate: Callable[[], dict[str, Any]]
    metric: Metric


def load_resume(path: str | Path, base: dict[str, Any]) -> dict[str, Any]:
    """A ``last.pt`` to continue from, checked to hold the same model with the same arguments as ``base``."""
    state = load_checkpoint(path)
    if "optimizer" not in state or state["model"] != base["model"] or state["model_args"] != base["model_args"]:
        raise ModelFileError(f"'{path}' is not a last.pt of {base['model']} with these arguments; cannot resume "
                             "from it")
    return state


def restore(state: dict[str, Any], model: nn.Module, optimizer, scheduler, generator: torch.Generator | None
            ) -> FitState:
    """Put a ``last.pt``'s weights, optimizer, scheduler and random states back; where the run stands."""
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    if "rng" in state:
        torch.set_rng_state(state["rng"])
    if generator is not None and state.get("loader_rng") is not None:
        generator.set_state(state["loader_rng"])
    return FitState(state["epoch"], best_score(state), list(state["history"]))


def fit(out: Path, base: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
        hooks: EpochHooks, state: FitState, *, end_epoch: int, images_per_epoch: int, log: MetricsLog,
        generator: torch.Generator | None = None, patience: int = 0, progress: bool = True, desc: str = "",
        row_extra: dict[str, Any] | None = None, train_loader=None, seed: int = 0) -> FitState:
    """Train epochs ``state.epoch`` .. ``end_epoch - 1``: a progress bar, one JSON line per epoch in
    ``log``, ``best.pt`` when the validation metric improves, ``last.pt`` (everything resume needs, random
    states included) after every epoch, and early stopping after ``patience`` epochs without improvement.

    In a distributed run (:mod:`dlpipe.training.distributed`) ``model`` is the unwrapped module (what the
    checkpoints hold); the training figures are averaged over the ranks, ``hooks.validate`` runs on rank 0
    and its figures are broadcast (every rank decides alike), ``train_loader``'s sampler gets the epoch,
    each rank reseeds from ``seed``, its rank and the epoch, and only rank 0 writes and shows progress.

    Returns:
        The state after the last epoch run (``epoch`` is the number of epochs done).
    """
    metric, stale, main = f"val_{hooks.metric.key}", 0, distributed.is_main()
    if state.best_rank is None and any(metric in r for r in state.history):  # resumed: rank ties as before
        state.best_rank = max(hooks.metric.rank(r) for r in state.history if metric in r)
    bar = tqdm(total=distributed.local_count(images_per_epoch) * max(0, end_epoch - state.epoch), unit="img",
               disable=not progress or not main, desc=desc, dynamic_ncols=True)
    while state.epoch < end_epoch:
        distributed.fault_point(state.epoch)
        distributed.set_epoch(train_loader, state.epoch)
        distributed.seed_rank(seed, state.epoch)
        row = {"epoch": state.epoch + 1, **(row_extra or {}), **distributed.reduce_figures(hooks.train(bar))}
        row.update({f"val_{k}": v for k, v in distributed.from_main(hooks.validate).items()})
        row["lr"] = optimizer.param_groups[0]["lr"]
        state.history.append(row)
        state.epoch += 1
        log.write(row)
        rank = hooks.metric.rank(row)
        improved = row[metric] > state.best if state.best_rank is None else rank > state.best_rank
        if improved:
            state.best, state.best_rank, stale = row[metric], rank, 0
            if main:
                save_checkpoint({**base, "state_dict": model.state_dict(), "epoch": state.epoch, "metric": metric,
                                 "metrics": {k: v for k, v in row.items() if k.startswith("val_")}}, out / "best.pt")
        else:
            stale += 1
        if main:
            bar.write(f"epoch {state.epoch}/{end_epoch}: {hooks.metric.describe(row)}{' *' if improved else ''}",
                      file=sys.stderr)
            save_checkpoint({**base, "state_dict": model.state_dict(), "epoch": state.epoch, "metric": metric,
                             "best_val_score": state.best, "history": state.history,
                             "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict() if scheduler is not None else None,
                             "rng": torch.get_rng_state(), "loader_rng": generator.get_state() if generator else None,
                             **(row_extra or {})}, out / "last.pt")
        if patience and stale >= patience:
            if main:
                bar.write(f"early stopping: no validation improvement in {patience} epochs", file=sys.stderr)
            break
    bar.close()
    return state


@dataclass
class TaskRun:
    """What a task's ``prepare(cfg, spec)`` hook gives the shared loop.

    Attributes:
        model_args: Builder arguments the data decides (channels, classes, vocabulary size...).
        train_loader: Training batches; its generator is saved for resume.
        images_per_epoch: Training items per epoch (the progress bar's unit).
        train_epoch: ``train_epoch(model, optimizer, scheduler, bar)`` trains one epoch; returns its figures.
        validate: ``validate(model)`` -> validation figures (the metric's key among them).
        test: ``test(model)`` -> test figures of the best checkpoint (stored with a ``test_`` prefix).
        examples: Real preprocessed inputs stored for the export's parity checks.
        dataset: ``name``, ``labels``, ``preprocessing`` for the checkpoint and the ONNX metadata.
        extra: Task content of every checkpoint (vocabulary, decoding defaults...).
        config: More configuration to store beside the :class:`TrainConfig`.
        preview: ``preview(model, path)`` draws a few validation predictions as a PNG, sent to the run's
            tracker each epoch when one is active (``--log``).
    """

    model_args: dict[str, Any]
    train_loader: DataLoader
    images_per_epoch: int
    train_epoch: Callable[..., dict[str, Any]]
    validate: Callable[[nn.Module], dict[str, Any]]
    test: Callable[[nn.Module], dict[str, Any]]
    examples: torch.Tensor
    dataset: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    preview: Callable[[nn.Module, Path], Any] | None = None


def run_supervised(cfg: TrainConfig, prepare: Callable[[TrainConfig, ModelSpec], TaskRun], metric: Metric,
                   task: str) -> dict[str, Any]:
    """Train ``cfg.model`` with the task's ``prepare`` hook on the shared loop; write best.pt (best
    validation ``metric``), last.pt and metrics.jsonl under ``cfg.out``, then score best.pt on the test split.
    Started by a launcher as one of several processes, it trains data-parallel
    (:mod:`dlpipe.training.distributed`): rank 0 writes and tests, the other ranks return ``{"rank": r}``.

    Returns:
        Paths, the metric's name and best validation score, the test figures (``test_<key>``), the
        history and the training time.
    """
    cfg = resolve_config(cfg)
    with distributed.session(cfg.ddp_timeout):
        return _run_supervised(cfg, prepare, metric, task)


def _run_supervised(cfg: TrainConfig, prepare: Callable[[TrainConfig, ModelSpec], TaskRun], metric: Metric,
                    task: str) -> dict[str, Any]:
    spec = get_spec(cfg.model)
    out = start_run(cfg)
    started, cpu_started = time.perf_counter(), time.process_time()
    run = prepare(cfg, spec)
    model, model_args = build_model(spec, run.model_args, cfg.model_args)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    init_weights(model, cfg.init)
    if cfg.init_from and not cfg.resume:
        load_matching(model, cfg.init_from)
    optimizer = build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad], cfg.lr,
                                cfg.momentum, cfg.weight_decay)
    scheduler = build_scheduler(cfg.schedule, optimizer, cfg.lr, cfg.epochs, len(run.train_loader))
    base = checkpoint_payload(model=cfg.model, task=task, model_args=model_args, config={**asdict(cfg), **run.config},
                              dataset=run.dataset, examples=run.examples, **run.extra)
    generator = run.train_loader.generator
    state = (restore(load_resume(cfg.resume, base), model, optimizer, scheduler, generator) if cfg.resume
             else FitState())
    trained = distributed.wrap(model, cfg.sync_bn)  # DDP in a distributed run; the checkpoints hold `model`
    hooks = EpochHooks(train=lambda bar: run.train_epoch(trained, optimizer, scheduler, bar),
                       validate=previewed(run, model, out, state.epoch), metric=metric)
    log = MetricsLog(out / "metrics.jsonl", fresh=state.epoch == 0)
    state = fit(out, base, model, optimizer, scheduler, hooks, state, end_epoch=cfg.epochs,
                images_per_epoch=run.images_per_epoch, log=log, generator=generator, patience=cfg.patience,
                progress=cfg.progress, desc=f"{cfg.model}/{cfg.dataset}", train_loader=run.train_loader,
                seed=cfg.seed)
    if not distributed.is_main():
        return {"rank": distributed.rank()}
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    test = score_best(out / "best.pt", model, run.test, train_seconds=seconds, train_cpu_seconds=cpu_seconds)
    return {"best": str(out / "best.pt"), "last": str(out / "last.pt"), "log": str(log.path), "task": task,
            "metric": f"val_{metric.key}", "metric_name": metric.name, "best_val_score": state.best,
            **{f"test_{k}": v for k, v in test.items()}, "history": state.history, "train_seconds": seconds,
            "train_cpu_seconds": cpu_seconds, "processes": distributed.world_size()}


def previewed(run: TaskRun, model: nn.Module, out: Path, epoch: int) -> Callable[[], dict[str, Any]]:
    """``run.validate(model)``, then, when a tracker is active, the epoch's sample predictions
    (``previews/epoch_NNN.png``) sent to it."""
    done = [epoch]

    def validate() -> dict[str, Any]:
        figures = run.validate(model)
        done[0] += 1
        if run.preview is not None and tracking.active():
            path = out / "previews" / f"epoch_{done[0]:03d}.png"
            with torch.no_grad():
                run.preview(model, path)
            tracking.log_image("predictions", path, done[0])
        return figures

    return validate


def score_best(path: Path, model: nn.Module, test: Callable[[nn.Module], dict[str, Any]], **more: Any
               ) -> dict[str, Any]:
    """Load best.pt into ``model``, run ``test`` on it and store its figures (``test_`` prefixed) in the file."""
    best = load_checkpoint(path)
    model.load_state_dict(best["state_dict"])
    figures = test(model)
    best["metrics"].update({f"test_{k}": v for k, v in figures.items()}, **more)
    save_checkpoint(best, path)
    return figures
