"""Training the feed-forward stylizer for one style (Johnson et al., 2016) as plain functions configured by
one :class:`StylizerConfig` (its own loop, as DQN has: there are no labels and no validation metric but the
perceptual loss).

Each step stylizes a batch of content images and pays the perceptual losses of :mod:`dlpipe.training.style`
(content features of the input, Gram matrices of the style image, total variation). Content images are what
is available offline: a registered image dataset (the shapes world, digit scenes), or a folder of photos cut
into random crops. ``best.pt`` is the epoch with the lowest validation loss; checkpoints have the format
``dlpipe train`` writes, with content images as ``examples`` and the style image inside.
"""

from __future__ import annotations

import base64
import io
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dlpipe.runtime.errors import InputError
from dlpipe.training import data as datasets
from dlpipe.training.checkpoint import checkpoint_payload, save_checkpoint
from dlpipe.training.loop import MetricsLog, start_run
from dlpipe.training.registry import get_spec
from dlpipe.training.style import (LossWeights, PerceptualNet, StyleTarget, load_perceptual, perceptual_losses,
                                   read_style, to_tensor)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
STYLIZERS = ("stylizer",)  # the registered models this loop trains


@dataclass
class StylizerConfig:
    """Everything one stylizer run depends on; stored in the checkpoint. ``None`` takes the model's recipe."""

    model: str = "stylizer"
    """Registered stylizer."""
    style: str | None = None
    """The style image file; the built-in procedural brush-stroke texture when None (or ``procedural``)."""
    dataset: str | None = None
    """Content images: a registered image dataset (``shapes-scenes``, ``mnist-scenes``...) or a folder of images
    (cut into random crops); the model's default dataset when None."""
    out: str = "runs/stylizer"
    """Output folder: best.pt, last.pt and metrics.jsonl."""
    data_dir: str | None = None
    """Data root of registered datasets."""
    epochs: int | None = None
    """Passes over the content images."""
    batch_size: int | None = None
    """Content images per step."""
    lr: float | None = None
    """Adam learning rate."""
    limit: int | None = 512
    """Content images to train on (a folder's crops count); None: all the dataset has."""
    image_size: int = 128
    """Side of the square training images (a multiple of 4)."""
    style_size: int = 256
    """Longer side of the style image the Gram matrices are taken from."""
    content_weight: float = LossWeights.content
    """Weight of the content loss."""
    style_weight: float = LossWeights.style
    """Weight of the style loss."""
    tv_weight: float = LossWeights.tv
    """Weight of the total-variation loss."""
    val_images: int = 8
    """Validation content images (a dataset's test split; a folder's centre crops)."""
    model_args: dict[str, Any] | None = None
    """Builder arguments (``width``, ``blocks``) over the recipe's."""
    weights: str | None = None
    """MobileNetV2 state dict of the perceptual network (default: $DLPIPE_PERCEPTUAL_WEIGHTS or the torch cache)."""
    seed: int = 0
    """Seed for weights, crops and shuffling."""
    threads: int | None = None
    """torch intra-op threads; torch's default when None."""
    progress: bool = True
    """Show a progress bar."""

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(self.content_weight, self.style_weight, self.tv_weight)


def resolve_config(cfg: StylizerConfig) -> StylizerConfig:
    """Fill ``None`` fields from the model's recipe and validate them."""
    spec = get_spec(cfg.model)  # an unknown name gets the registry's error
    if cfg.model not in STYLIZERS:
        raise InputError(f"{cfg.model} is not a stylizer; choose from {', '.join(STYLIZERS)}")
    out = StylizerConfig(**asdict(cfg))
    recipe = spec.recipe_for(cfg.dataset)
    for name in ("dataset", "epochs", "batch_size", "lr"):
        if getattr(out, name) is None:
            setattr(out, name, recipe[name])
    out.model_args = {**recipe["model_args"], **(cfg.model_args or {})}
    if out.epochs < 1 or out.batch_size < 1 or out.lr <= 0 or out.val_images < 4:
        raise InputError("epochs and batch size must be positive, the learning rate above zero and val_images >= 4")
    if out.image_size < 16 or out.image_size % 4 or out.style_size < 16:
        raise InputError(f"image size must be a multiple of 4 from 16 and style size at least 16, got "
                         f"{out.image_size} and {out.style_size}")
    return out


# ------------------------------------------------------------------------------------------- data

def _rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=3) if images.ndim == 3 else images


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR)) for a in images])


def folder_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (sorted), refused when there are none."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"content folder '{folder}' holds no PNG/JPEG/BMP images")
    return files


def _crops(files: list[Path], split: str, count: int, size: int, seed: int) -> np.ndarray:
    """Random crops (``train``: random file, scale and place) or centre crops (``test``) of the files."""
    pictures = [Image.open(f).convert("RGB") for f in files]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        pic = pictures[k % len(pictures)] if split != "train" else pictures[rng.integers(len(pictures))]
        short = min(pic.size)
        side = short if split != "train" else int(short * rng.uniform(0.35, 1.0))
        x = (pic.width - side) // 2 if split != "train" else int(rng.integers(0, pic.width - side + 1))
        y = (pic.height - side) // 2 if split != "train" else int(rng.integers(0, pic.height - side + 1))
        out.append(np.asarray(pic.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(out)


def content_images(source: str, split: str, count: int | None, size: int, data_dir: str | None = None,
                   seed: int = 0) -> np.ndarray:
    """Content images as ``N x size x size x 3`` uint8: a registered dataset's split (grey images as RGB), or
    crops of a folder's images (``count`` of them; 512 when None).

    Raises:
        InputError: an unknown dataset, or a folder without images. DataNotFoundError: missing dataset files.
    """
    if Path(source).is_dir():
        return _crops(folder_files(Path(source)), split, count or 512, size, seed)
    if "/" in source or Path(source).suffix:
        raise InputError(f"content folder '{source}' does not exist")
    images, _ = datasets.load_split(source, split, data_dir, limit=count)
    return _resized(_rgb(images), size)


def preprocessing(size: int) -> dict[str, Any]:
    """The stylizer's input contract: RGB pixels in [0, 1] at the image's own size (``size``: training's)."""
    return {"color": "RGB", "size": [size, size], "resize": "none", "scale": 1 / 255, "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0], "layout": "NCHW", "policy": "stretch"}


def png_base64(image: np.ndarray) -> str:
    """An ``H x W x 3`` uint8 image as base64 PNG text (the style image inside the model's metadata)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------- loop

def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)


@torch.no_grad()
def validate(model: torch.nn.Module, net: PerceptualNet, images: torch.Tensor, target: StyleTarget,
             weights: LossWeights) -> dict[str, float]:
    """The mean perceptual losses of the stylized ``images``."""
    model.eval()
    parts = perceptual_losses(net, model(images), net(images), target, weights)
    return {k: float(v) for k, v in parts.items()}


def train_step(model, net: PerceptualNet, optimizer, batch: torch.Tensor, target: StyleTarget,
               weights: LossWeights) -> dict[str, float]:
    """One gradient step on a batch of content images; its losses."""
    model.train()
    with torch.no_grad():
        content = net(batch)
    parts = perceptual_losses(net, model(batch), content, target, weights)
    optimizer.zero_grad()
    parts["total"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in parts.items()}


def train(cfg: StylizerConfig) -> dict[str, Any]:
    """Train a stylizer for ``cfg.style`` on ``cfg.dataset``'s images; write best.pt (lowest validation loss),
    last.pt and metrics.jsonl under ``cfg.out``.

    Raises:
        InputError: an unreadable style image, bad settings or content source. DataNotFoundError: no weights.
    """
    cfg = resolve_config(cfg)
    out = start_run(cfg)
    started = time.perf_counter()
    style_image, style_name = read_style(cfg.style, cfg.style_size)
    net = load_perceptual(cfg.weights)
    target = StyleTarget.of(net, to_tensor(style_image))
    train_images = _nchw(content_images(cfg.dataset, "train", cfg.limit, cfg.image_size, cfg.data_dir, cfg.seed))
    val = _nchw(content_images(cfg.dataset, "test", cfg.val_images, cfg.image_size, cfg.data_dir, cfg.seed + 1))
    model = get_spec(cfg.model).build(**cfg.model_args)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    base = checkpoint_payload(model=cfg.model, task="stylization", model_args=cfg.model_args, config=asdict(cfg),
                              dataset={"name": cfg.dataset, "labels": [],
                                       "preprocessing": preprocessing(cfg.image_size)},
                              examples=val, style={"name": style_name, "png": png_base64(style_image)})
    log, best, history = MetricsLog(out / "metrics.jsonl"), float("inf"), []
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=cfg.epochs * len(train_images), unit="img", disable=not cfg.progress, desc=cfg.model,
               dynamic_ncols=True)
    for epoch in range(1, cfg.epochs + 1):
        order, sums = torch.randperm(len(train_images), generator=generator), {}
        for start in range(0, len(order), cfg.batch_size):
            batch = train_images[order[start:start + cfg.batch_size]]
            if torch.rand(1, generator=generator).item() < 0.5:
                batch = batch.flip(3)
            parts = train_step(model, net, optimizer, batch, target, cfg.loss_weights)
            sums = {k: sums.get(k, 0.0) + v * len(batch) for k, v in parts.items()}
            bar.update(len(batch))
            bar.set_postfix(loss=f"{parts['total']:.3f}", refresh=False)
        row = {"epoch": epoch, **{f"train_{k}": v / len(order) for k, v in sums.items()},
               **{f"val_{k}": v for k, v in validate(model, net, val, target, cfg.loss_weights).items()}}
        row["val_neg_loss"] = -row["val_total"]
        history.append(row)
        log.write(row)
        improved = row["val_total"] < best
        state = {**base, "state_dict": model.state_dict(), "epoch": epoch, "metric": "val_neg_loss",
                 "metrics": {k: v for k, v in row.items() if k.startswith("val_")}}
        if improved:
            best = row["val_total"]
            save_checkpoint(state, out / "best.pt")
        save_checkpoint({**state, "best_val_score": -best, "history": history, "optimizer": optimizer.state_dict()},
                        out / "last.pt")
        bar.write(f"epoch {epoch}/{cfg.epochs}: loss {row['train_total']:.4f} validation: content "
                  f"{row['val_content']:.4f} style {row['val_style']:.4f} total {row['val_total']:.4f}"
                  f"{' *' if improved else ''}", file=sys.stderr)
    bar.close()
    return {"best": str(out / "best.pt"), "last": str(out / "last.pt"), "log": str(log.path), "task": "stylization",
            "style": style_name, "dataset": cfg.dataset, "images": len(train_images), "epochs": cfg.epochs,
            "metric": "val_neg_loss", "metric_name": "negated perceptual loss", "best_val_score": -best,
            "best_val_loss": best, "history": history, "train_seconds": round(time.perf_counter() - started, 1)}


# ----------------------------------------------------------------------------------------------- CLI
_FOR_OTHER_TASKS = ("optimizer", "weight_decay", "init", "batch_norm", "schedule", "augment", "label_smoothing",
                    "resume", "init_from", "test_limit", "env", "total_steps", "buffer_size", "double_dqn", "download")


def train_command(model: str, progress: bool = True, **opts: Any) -> dict[str, Any]:
    """``dlpipe train stylizer [--style FILE] [--dataset D|FOLDER]``: run :func:`train` from the command's options.

    Raises:
        InputError: an option that only other tasks understand was given.
    """
    given = [k for k in _FOR_OTHER_TASKS if opts.get(k) not in (None, False)]
    if given:
        raise InputError(f"{model} trains a style on content images; --{given[0].replace('_', '-')} does not apply "
                         "(use --style, --dataset, --epochs, --batch-size, --lr, --limit, --seed, --threads)")
    names = {f.name for f in fields(StylizerConfig)}
    return train(StylizerConfig(model=model, progress=progress,
                                **{k: v for k, v in opts.items() if k in names and v is not None}))


def summary(result: dict[str, Any]) -> str:
    """What ``dlpipe train stylizer`` prints."""
    epochs = f"{result['epochs']} epoch{'s' * (result['epochs'] != 1)}"
    return (f"style {result['style']} on {result['dataset']} ({result['images']} images, {epochs}): "
            f"best validation perceptual loss {result['best_val_loss']:.4f}\ncheckpoint: {result['best']}\n"
            f"next: dlpipe export {result['best']} --out stylizer.onnx && "
            "dlpipe stylize PHOTO.jpg --model stylizer.onnx --out styled/")
