"""DCGAN training (issue 16) as plain functions, configured by one :class:`GANConfig` (like DQN's own loop in
:mod:`dlpipe.training.dqn`): alternating discriminator and generator steps (the non-saturating generator
loss of Goodfellow et al., 2014), Adam 2e-4 with beta1 0.5 for both, a progress bar with both losses,
D(x) and D(G(z)) per epoch in ``metrics.jsonl``, a sample grid of fixed latents each epoch
(``samples/epoch_NNN.png``), ``best.pt`` chosen by the classifier-feature FID of generated images against
held-out training images (lower is better; :mod:`dlpipe.training.gan_quality`), and ``last.pt`` to resume.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from dlpipe.runtime.errors import InputError
from dlpipe.runtime.files import atomic_output
from dlpipe.runtime.generator import image_grid
from dlpipe.training import data as datasets
from dlpipe.training import tracking
from dlpipe.training.checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from dlpipe.training.gan_quality import QualityClassifier
from dlpipe.training.loop import MetricsLog, check_model_args, split_indices, start_run
from dlpipe.training.models.dcgan import DCGAN, GAN_BUILDERS
from dlpipe.training.registry import get_spec

METRIC_KEY = "val_fid"


@dataclass
class GANConfig:
    """Everything one GAN run depends on; stored in the checkpoint. ``None`` takes the model's recipe."""

    model: str = "dcgan"
    """Registered GAN (``dcgan``, or ``cdcgan`` conditioned on the class)."""
    classifier: str | None = None
    """Checkpoint of a dlpipe classifier trained on the dataset: its features judge the samples (required)."""
    dataset: str | None = None
    """Image dataset (mnist, fashion-mnist, shapes-64...); the model's default when None."""
    out: str = "runs/gan"
    """Output folder: best.pt, last.pt, metrics.jsonl and samples/."""
    data_dir: str | None = None
    """Data root; $DLPIPE_DATA_DIR, else ~/.cache/dlpipe/data, when None."""
    download: bool = False
    """Allow torchvision to download a missing dataset."""
    epochs: int | None = None
    """Epochs over the training images."""
    batch_size: int | None = None
    """Real images per discriminator step (and as many generated)."""
    lr: float | None = None
    """Adam learning rate of both networks (the paper's 2e-4)."""
    beta1: float = 0.5
    """Adam's beta1 (the paper's 0.5: 0.9 oscillated)."""
    model_args: dict[str, Any] | None = None
    """Builder arguments over the recipe's: ``latent_size``, ``width``."""
    recipe: str = "default"
    """The model's named recipe that fills the fields left None."""
    val_fraction: float = 0.1
    """Share of the training split held out as the real images the FID of each epoch compares with."""
    quality_samples: int = 2000
    """Generated images scored after each epoch (fixed latents)."""
    limit: int | None = None
    """Use only the first N training images (quick runs)."""
    seed: int = 0
    """Seed for weights, split, shuffling and latents."""
    threads: int | None = None
    """torch intra-op threads; torch's default when None."""
    resume: str | None = None
    """Continue from this last.pt."""
    progress: bool = True
    """Show a progress bar."""
    examples: int = 32
    """Latent vectors stored in the checkpoint for the export's parity checks."""
    grid: int = 64
    """Fixed latents drawn into each epoch's sample grid."""


def resolve_config(cfg: GANConfig) -> GANConfig:
    """Fill ``None`` fields from the model's recipe and validate them."""
    spec = get_spec(cfg.model)
    if spec.builder not in GAN_BUILDERS:
        raise InputError(f"{cfg.model} is a {spec.task} model, not a GAN")
    out = GANConfig(**asdict(cfg))
    out.dataset = cfg.dataset or spec.default_dataset
    recipe = spec.recipe_for(out.dataset, cfg.recipe)
    for name in ("epochs", "batch_size", "lr"):
        if getattr(out, name) is None:
            setattr(out, name, recipe[name])
    out.model_args = {**recipe["model_args"], **(cfg.model_args or {})}
    check_model_args(spec, out.model_args)
    if out.epochs < 1 or out.batch_size < 2 or out.lr <= 0 or not 0 <= out.beta1 < 1:
        raise InputError("epochs must be positive, the batch size at least 2, the learning rate above zero and "
                         "beta1 in [0, 1)")
    if not out.classifier:
        raise InputError("a GAN is judged by a classifier of its dataset: give its checkpoint (--classifier best.pt)")
    if out.quality_samples < 2 or not 0 < out.val_fraction < 1:
        raise InputError("quality_samples must be at least 2 and val_fraction between 0 and 1")
    return out


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> images in [0, 1]."""
    return ((x + 1) * 0.5).clamp(0, 1)


def latents(model: DCGAN, count: int, generator: torch.Generator, labels: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``count`` generator inputs (noise, and for conditional models the one-hot ``labels``, random when None)."""
    z = torch.randn(count, model.latent_size, generator=generator)
    if model.num_classes and labels is None:
        labels = torch.randint(0, model.num_classes, (count,), generator=generator)
    return model.condition(z, labels), (labels if model.num_classes else None)


def d_step(model: DCGAN, opt_d: torch.optim.Optimizer, real: torch.Tensor, labels: torch.Tensor | None,
           fake: torch.Tensor, fake_labels: torch.Tensor | None) -> dict[str, float]:
    """One discriminator step on real images (target 1) and generated ones (target 0; ``fake`` detached)."""
    d_real = model.discriminate(real, labels)
    d_fake = model.discriminate(fake.detach(), fake_labels)
    loss = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
            + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return {"loss_d": float(loss.detach()), "d_x": float(torch.sigmoid(d_real.detach()).mean()),
            "d_g_z": float(torch.sigmoid(d_fake.detach()).mean())}


def g_step(model: DCGAN, opt_g: torch.optim.Optimizer, fake: torch.Tensor, fake_labels: torch.Tensor | None
           ) -> dict[str, float]:
    """One generator step: the non-saturating loss ``-log D(G(z))`` (only the generator's weights move)."""
    d_fake = model.discriminate(fake, fake_labels)
    loss = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    return {"loss_g": float(loss.detach()), "d_g_z_after": float(torch.sigmoid(d_fake.detach()).mean())}


def optimizers(model: DCGAN, lr: float, beta1: float) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for the generator and for the discriminator (the paper's settings)."""
    return (torch.optim.Adam(model.generator.parameters(), lr=lr, betas=(beta1, 0.999)),
            torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=(beta1, 0.999)))


@dataclass
class _Run:
    """One GAN run's moving parts."""

    cfg: GANConfig
    model: DCGAN
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    images: torch.Tensor
    labels: torch.Tensor
    judge: QualityClassifier
    reference: np.ndarray
    base: dict[str, Any]
    out: Path
    noise: torch.Generator
    fixed: torch.Tensor
    scored: torch.Tensor
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    best: float = float("inf")


def train_epoch(run: _Run, bar) -> dict[str, float]:
    """One pass over the training images: a D step then a G step per batch. Returns the epoch's means."""
    cfg, model = run.cfg, run.model
    model.train()
    order = torch.randperm(len(run.images), generator=run.noise)
    sums: dict[str, float] = {}
    steps = 0
    for start in range(0, len(order) - 1, cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        real = run.images[idx].float() / 127.5 - 1
        z, fake_labels = latents(model, len(idx), run.noise)
        fake = model.generator(z)
        figures = {**d_step(model, run.opt_d, real, run.labels[idx] if model.num_classes else None, fake,
                            fake_labels),
                   **g_step(model, run.opt_g, fake, fake_labels)}
        for k, v in figures.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
        bar.update(len(idx))
        bar.set_postfix(loss_d=f"{figures['loss_d']:.3f}", loss_g=f"{figures['loss_g']:.3f}",
                        d_x=f"{figures['d_x']:.2f}", d_g_z=f"{figures['d_g_z']:.2f}", refresh=False)
    return {k: v / max(steps, 1) for k, v in sums.items()}


@torch.no_grad()
def generate(model: DCGAN, inputs: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Images in [0, 1] (N x C x H x W) for generator inputs, in eval mode (batch norm's running statistics)."""
    model.eval()
    return torch.cat([to_unit(model.generator(inputs[i:i + batch_size])) for i in range(0, len(inputs), batch_size)])


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """Images in [0, 1] (N x C x H x W) as one PNG grid, written atomically."""
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    grid = image_grid(arr, columns)
    with atomic_output(path) as tmp:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="PNG")


def _prepare(cfg: GANConfig) -> _Run:
    """Data (training images, the held-out reference), the judge, the model and its optimizers."""
    out = start_run(cfg)
    info = datasets.get_dataset(cfg.dataset)
    images, labels = datasets.load_split(cfg.dataset, "train", cfg.data_dir, limit=cfg.limit, download=cfg.download)
    images, labels = datasets.to_nchw(images), torch.as_tensor(labels)
    if labels.ndim != 1:
        raise InputError(f"dataset {cfg.dataset!r} has no one class per image; a GAN trains on an image dataset")
    train_idx, val_idx = split_indices(len(images), cfg.val_fraction, cfg.seed)
    judge = QualityClassifier(cfg.classifier)
    if judge.dataset != cfg.dataset:
        raise InputError(f"classifier '{cfg.classifier}' was trained on {judge.dataset!r}, not {cfg.dataset!r}")
    reference = judge.run(images[val_idx].float() / 255)[0]
    spec = get_spec(cfg.model)
    model_args = {"in_channels": info.channels, "image_size": info.image_size[0], "num_classes": len(info.labels),
                  **(cfg.model_args or {})}
    model = spec.build(**model_args)
    opt_g, opt_d = optimizers(model, cfg.lr, cfg.beta1)
    noise = torch.Generator().manual_seed(cfg.seed)
    fixed_labels = torch.arange(cfg.grid) % max(model.num_classes, 1)
    fixed = latents(model, cfg.grid, torch.Generator().manual_seed(cfg.seed + 1), fixed_labels)[0]
    scored = latents(model, cfg.quality_samples, torch.Generator().manual_seed(cfg.seed + 2))[0]
    examples = latents(model, cfg.examples, torch.Generator().manual_seed(cfg.seed + 3))[0]
    preprocessing = {"color": "L" if info.channels == 1 else "RGB", "size": list(info.image_size), "scale": 1 / 255,
                     "mean": [0.0], "std": [1.0], "layout": "NCHW", "resize": "bilinear"}
    base = checkpoint_payload(model=cfg.model, task="generation", model_args=model_args, config=asdict(cfg),
                              dataset={"name": cfg.dataset, "labels": list(info.labels),
                                       "preprocessing": preprocessing},
                              examples=examples, quality={"classifier": str(Path(cfg.classifier).resolve()),
                                                          "reference": f"{len(val_idx)} held-out training images"},
                              generator={"latent_size": model.latent_size, "conditional": bool(model.num_classes),
                                         "channels": info.channels, "size": list(info.image_size)})
    return _Run(cfg, model, opt_g, opt_d, images[train_idx], labels[train_idx], judge, reference, base, out, noise,
                fixed, scored)


def _restore(run: _Run, path: str) -> None:
    """Continue from a ``last.pt`` of the same model and arguments."""
    state = load_checkpoint(path)
    if state.get("model") != run.base["model"] or state.get("model_args") != run.base["model_args"] or \
            "optimizers" not in state:
        raise InputError(f"'{path}' is not a last.pt of {run.base['model']} with these arguments; cannot resume")
    run.model.load_state_dict(state["state_dict"])
    run.opt_g.load_state_dict(state["optimizers"]["generator"])
    run.opt_d.load_state_dict(state["optimizers"]["discriminator"])
    run.noise.set_state(state["noise"])
    run.epoch, run.best, run.history = state["epoch"], state["best_val_score"], list(state["history"])


def _end_epoch(run: _Run, figures: dict[str, float], log: MetricsLog, bar) -> None:
    """Score the epoch's generator, write its grid, its row, best.pt when the FID improved, and last.pt."""
    run.epoch += 1
    quality = run.judge.score(generate(run.model, run.scored), run.reference, kid_subsets=10)
    row = {"epoch": run.epoch, **figures, "val_fid": quality["fid"], "val_kid": quality["kid"],
           "val_confidence": quality["mean_confidence"], "val_classes_present": quality["classes_present"]}
    run.history.append(row)
    log.write(row)
    grid = run.out / "samples" / f"epoch_{run.epoch:03d}.png"
    save_grid(generate(run.model, run.fixed), grid, columns=run.model.num_classes or 8)  # conditional: a column per class
    tracking.log_image("samples", grid, run.epoch)  # the fixed latents' grid, epoch by epoch, in the tracker
    improved = row["val_fid"] < run.best
    state = {**run.base, "state_dict": run.model.state_dict(), "epoch": run.epoch, "metric": METRIC_KEY,
             "metrics": {k: v for k, v in row.items() if k.startswith("val_")}}
    if improved:
        run.best = row["val_fid"]
        save_checkpoint(state, run.out / "best.pt")
    save_checkpoint({**state, "best_val_score": run.best, "history": run.history, "noise": run.noise.get_state(),
                     "optimizers": {"generator": run.opt_g.state_dict(), "discriminator": run.opt_d.state_dict()},
                     "rng": torch.get_rng_state()}, run.out / "last.pt")
    bar.write(f"epoch {run.epoch}/{run.cfg.epochs}: loss_d {row['loss_d']:.4f} loss_g {row['loss_g']:.4f} "
              f"D(x) {row['d_x']:.3f} D(G(z)) {row['d_g_z']:.3f} FID {row['val_fid']:.3f} "
              f"confidence {row['val_confidence']:.3f}{' *' if improved else ''}", file=sys.stderr)


def train(cfg: GANConfig) -> dict[str, Any]:
    """Train a GAN; write best.pt (lowest validation FID), last.pt, metrics.jsonl and samples/ under ``cfg.out``.

    Returns:
        Checkpoint paths, the best validation FID (``best_val_score``) and the history.

    Raises:
        InputError: a bad configuration, dataset or classifier. DataNotFoundError: missing data.
    """
    cfg = resolve_config(cfg)
    run = _prepare(cfg)
    if cfg.resume:
        _restore(run, cfg.resume)
    log = MetricsLog(run.out / "metrics.jsonl", fresh=run.epoch == 0)
    started = time.perf_counter()
    bar = tqdm(total=len(run.images) * max(0, cfg.epochs - run.epoch), unit="img", disable=not cfg.progress,
               desc=f"{cfg.model}/{cfg.dataset}", dynamic_ncols=True, file=sys.stderr)
    while run.epoch < cfg.epochs:
        _end_epoch(run, train_epoch(run, bar), log, bar)
    bar.close()
    return {"best": str(run.out / "best.pt"), "last": str(run.out / "last.pt"), "log": str(log.path),
            "samples": str(run.out / "samples"), "task": "generation", "metric": METRIC_KEY,
            "metric_name": "classifier-feature FID (lower is better)", "best_val_score": run.best,
            "history": run.history, "train_seconds": time.perf_counter() - started,
            "classifier": run.judge.describe()}
