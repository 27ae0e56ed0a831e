"""Neural style transfer's perceptual losses (Gatys et al., 2016; Johnson et al., 2016) in the feature space
of torchvision's ImageNet MobileNetV2, and the original optimisation of the image itself.

VGG's ImageNet weights are not available offline here; MobileNetV2's are (issue 16). Its blocks end in
*linear* bottlenecks (no activation), which make poor texture statistics, so the losses read the ReLU6
*expansion* activations instead (``features[i].conv[0]``, the 1x1 convolution that widens each inverted
residual block): those are rectified and wide, as VGG's ``relu`` layers are. The style taps are the first
expansion at each resolution, just before its stride-2 depthwise convolution (blocks 2, 4, 7 and 14: 96,
144, 192 and 576 channels at 1/2, 1/4, 1/8 and 1/16 of the image), so the Gram matrices describe texture
from fine strokes to large blobs; the content tap is block 4's (1/4 of the image: the objects' layout
without their exact pixels, Johnson's ``relu2_2`` at one octave coarser).

Losses are *relative* so that one set of weights suits every layer and style: a layer's style loss is
``|G - G_style|^2 / |G_style|^2`` (Gram matrices normalised by the number of positions, so they do not depend
on the image size), the content loss is ``|F - F_content|^2 / |F_content|^2``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from dlpipe.runtime.errors import DataNotFoundError, InputError
from dlpipe.runtime.images import open_image

STYLE_LAYERS = (2, 4, 7, 14)
CONTENT_LAYER = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_ENV = "DLPIPE_PERCEPTUAL_WEIGHTS"  # a MobileNetV2 state dict to use instead of the torch cache's
PROCEDURAL = "procedural"  # the built-in style: a generated texture of brush strokes


class PerceptualNet(nn.Module):
    """MobileNetV2's expansion activations at the style and content taps (frozen, eval mode, ImageNet
    normalisation inside). Input: RGB in [0, 1]."""

    def __init__(self, features: nn.Sequential, taps: tuple[int, ...] = tuple(sorted({*STYLE_LAYERS, CONTENT_LAYER}))):
        super().__init__()
        self.taps = taps
        self.blocks = features[:max(taps) + 1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualNet":
        return super().train(False)  # batch norm keeps ImageNet's statistics whatever the caller does

    def forward(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        x = (image - self.mean) / self.std
        out: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if i in self.taps:
                out[i] = block.conv[0](x)
                if i == self.taps[-1]:
                    break
            x = block(x)
        return out


def perceptual_weights(weights: str | Path | None = None) -> str:
    """``torchvision:mobilenet_v2:...`` naming the weights to read: ``weights``, else ``$DLPIPE_PERCEPTUAL_WEIGHTS``,
    else the torch cache's ImageNet weights (never downloaded)."""
    chosen = weights or os.environ.get(WEIGHTS_ENV)
    return f"torchvision:mobilenet_v2:{chosen}" if chosen else "torchvision:mobilenet_v2:IMAGENET1K_V1"


def load_perceptual(weights: str | Path | None = None) -> PerceptualNet:
    """The perceptual network over torchvision's ImageNet MobileNetV2 (see :func:`perceptual_weights`).

    Raises:
        DataNotFoundError: no weights in the torch cache and none named. ModelFileError: a file that does not fit.
    """
    from dlpipe.training.pretrained import load_torchvision

    try:
        found = load_torchvision(perceptual_weights(weights))
    except DataNotFoundError as exc:
        raise DataNotFoundError(f"style transfer needs MobileNetV2's ImageNet weights: {exc}; or set "
                                f"{WEIGHTS_ENV}=FILE.pth") from None
    return PerceptualNet(found.module.features)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrices (N x C x C) of N x C x H x W features, divided by H*W (independent of the image size)."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (h * w)


@dataclass
class StyleTarget:
    """What an image is compared with: the style image's Gram matrices (one per style tap)."""

    grams: dict[int, torch.Tensor]

    @classmethod
    def of(cls, net: PerceptualNet, style: torch.Tensor) -> "StyleTarget":
        with torch.no_grad():
            feats = net(style)
        return cls({i: gram(feats[i]) for i in STYLE_LAYERS})


def style_loss(feats: dict[int, torch.Tensor], target: StyleTarget) -> torch.Tensor:
    """Mean over the style taps of ``|G - G_style|^2 / |G_style|^2`` (per image, averaged over the batch)."""
    losses = []
    for i in STYLE_LAYERS:
        g, t = gram(feats[i]), target.grams[i].expand(feats[i].shape[0], -1, -1)
        losses.append(((g - t) ** 2).sum((1, 2)) / (t ** 2).sum((1, 2)).clamp_min(1e-12))
    return torch.stack(losses).mean()


def content_loss(feats: dict[int, torch.Tensor], content: dict[int, torch.Tensor]) -> torch.Tensor:
    """``|F - F_content|^2 / |F_content|^2`` at the content tap (averaged over the batch)."""
    f, c = feats[CONTENT_LAYER], content[CONTENT_LAYER]
    return (((f - c) ** 2).sum((1, 2, 3)) / (c ** 2).sum((1, 2, 3)).clamp_min(1e-12)).mean()


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    """Total variation: mean absolute difference between neighbouring pixels (smooths high-frequency noise)."""
    return (image[..., 1:, :] - image[..., :-1, :]).abs().mean() + (image[..., :, 1:] - image[..., :, :-1]).abs().mean()


@dataclass(frozen=True)
class LossWeights:
    """How the three losses add up (the relative losses above make these a few units each)."""

    content: float = 1.0
    style: float = 10.0
    tv: float = 0.1


def perceptual_losses(net: PerceptualNet, image: torch.Tensor, content: dict[int, torch.Tensor],
                      target: StyleTarget, weights: LossWeights) -> dict[str, torch.Tensor]:
    """``content``, ``style``, ``tv`` and their weighted ``total`` for ``image`` (content features precomputed)."""
    feats = net(image)
    parts = {"content": content_loss(feats, content), "style": style_loss(feats, target), "tv": tv_loss(image)}
    parts["total"] = weights.content * parts["content"] + weights.style * parts["style"] + weights.tv * parts["tv"]
    return parts


# ------------------------------------------------------------------------------------------ images

def to_tensor(picture: Image.Image | np.ndarray) -> torch.Tensor:
    """An RGB picture (PIL or HxW[x3] uint8) as a 1 x 3 x H x W float tensor in [0, 1]."""
    arr = np.asarray(picture.convert("RGB") if isinstance(picture, Image.Image) else picture)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div(255).unsqueeze(0).contiguous()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A 1 x 3 x H x W tensor in [0, 1] as an H x W x 3 uint8 array."""
    return (image[0].detach().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def fit_longer_side(picture: Image.Image, size: int | None, multiple: int = 1) -> Image.Image:
    """``picture`` (RGB) resized so its longer side is ``size`` (unchanged when None), then cut down to
    multiples of ``multiple``."""
    picture = picture.convert("RGB")
    if size:
        scale = size / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.BICUBIC)
    w, h = picture.width - picture.width % multiple, picture.height - picture.height % multiple
    if (w, h) != picture.size:
        if not w or not h:
            raise InputError(f"an image of {picture.width}x{picture.height} pixels is too small (at least "
                             f"{multiple}x{multiple})")
        picture = picture.crop((0, 0, w, h))
    return picture


def procedural_style(size: int = 256, seed: int = 0) -> np.ndarray:
    """The built-in style image: bold brush strokes following a swirling flow field over a blotchy ground,
    in a blue-yellow palette (a real painting is not available offline). ``size x size x 3`` uint8."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    palette = np.array([(20, 40, 110), (40, 90, 170), (90, 150, 210), (240, 200, 60), (250, 235, 150),
                        (200, 120, 30), (30, 30, 50), (120, 170, 120)])
    coarse = rng.integers(0, len(palette), size=(6, 6))
    ground = Image.fromarray(palette[coarse].astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(ground)
    for _ in range(size * 6):
        x, y = rng.uniform(0, size, 2)
        angle = math.sin(x / size * 6.0) * 2.0 + math.cos(y / size * 5.0) * 2.0  # a smooth swirl
        length, width = rng.uniform(0.03, 0.08) * size, max(1, int(rng.uniform(0.008, 0.02) * size))
        colour = palette[rng.integers(len(palette))] + rng.integers(-25, 26, 3)
        dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
        draw.line((x - dx, y - dy, x + dx, y + dy), fill=tuple(int(c) for c in np.clip(colour, 0, 255)), width=width)
    return np.asarray(ground.filter(ImageFilter.SMOOTH))


def read_style(style: str | Path | None, size: int = 256, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    """The style image as ``H x W x 3`` uint8 with its longer side ``size``, and its name: a file, or
    None / ``procedural`` for the built-in texture.

    Raises:
        InputError: the file is missing or is not a readable image (one line naming it).
    """
    if style in (None, PROCEDURAL):
        return procedural_style(size), PROCEDURAL
    try:
        picture = open_image(str(style), max_pixels)
    except InputError as exc:
        raise InputError(f"style image: {exc}") from None
    try:
        return np.asarray(fit_longer_side(picture, size)), Path(style).name
    except OSError as exc:  # truncated files fail when their pixels are first read
        raise InputError(f"style image '{style}' cannot be read: {exc}") from None


# -------------------------------------------------------------------------------- the optimisation

@dataclass(frozen=True)
class OptimizeConfig:
    """The optimisation of the image itself (Gatys et al.)."""

    steps: int = 200
    """Optimiser steps (L-BFGS iterations count as one each)."""
    method: str = "adam"
    """``adam`` on the pixels (lr ``lr``) or ``lbfgs`` (the paper's)."""
    lr: float = 0.05
    """Adam's step size (on the logits of the pixels)."""
    weights: LossWeights = LossWeights()
    """Loss weights."""


def optimize_image(net: PerceptualNet, content: torch.Tensor, target: StyleTarget,
                   cfg: OptimizeConfig = OptimizeConfig(),
                   progress: bool = False, on_step: Callable[[int, dict[str, float]], None] | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Optimise the pixels of ``content`` (1 x 3 x H x W in [0, 1], the starting point) towards ``target``'s style
    while keeping its content features.

    Returns:
        The stylized image (in [0, 1]) and its final losses.
    """
    if cfg.steps < 1 or cfg.method not in ("adam", "lbfgs"):
        raise InputError(f"optimisation needs at least 1 step and method adam or lbfgs, got {cfg.steps}, "
                         f"{cfg.method!r}")
    with torch.no_grad():
        content_feats = net(content)
    # optimise an unbounded parameter whose sigmoid is the image: it stays in [0, 1] without clamping
    logit = torch.logit(content.clamp(1e-3, 1 - 1e-3)).contiguous().requires_grad_(True)
    optimizer = (torch.optim.Adam([logit], lr=cfg.lr) if cfg.method == "adam"
                 else torch.optim.LBFGS([logit], lr=1.0, max_iter=1, history_size=20))
    last: dict[str, torch.Tensor] = {}

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        parts = perceptual_losses(net, torch.sigmoid(logit), content_feats, target, cfg.weights)
        parts["total"].backward()
        last.update(parts)
        return parts["total"]

    for step in tqdm(range(cfg.steps), disable=not progress, desc="optimising", unit="step", leave=False):
        optimizer.step(closure)
        if on_step is not None:
            on_step(step, {k: float(v.detach()) for k, v in last.items()})
    with torch.no_grad():
        image = torch.sigmoid(logit)
        final = perceptual_losses(net, image, content_feats, target, cfg.weights)
    return image.detach(), {k: float(v) for k, v in final.items()}


def measure(net: PerceptualNet, image: torch.Tensor, content: torch.Tensor, target: StyleTarget,
            weights: LossWeights = LossWeights()) -> dict[str, float]:
    """The losses of a stylized ``image`` against its ``content`` image and the style (no gradients)."""
    with torch.no_grad():
        return {k: float(v) for k, v in perceptual_losses(net, image, net(content), target, weights).items()}
