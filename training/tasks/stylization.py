"""The stylization task: an image in, the same image painted in one style out (Johnson et al.'s feed-forward
stylizer, the style baked in). It trains with its own loop on the perceptual losses
(:mod:`dlpipe.training.style_train`), exports one graph with dynamic batch, height and width, and its fp16 and
int8 variants are judged by the PSNR of their images against fp32's (not by an argmax, which a picture has not).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dlpipe.runtime.errors import ModelFileError
from dlpipe.runtime.stylizer import Stylizer
from dlpipe.training import style_train
from dlpipe.training.loop import Metric, TrainConfig
from dlpipe.training.style import StyleTarget, load_perceptual, measure
from dlpipe.training.tasks.base import QuantizationPolicy, Task
from dlpipe.training.tasks.common import single_graph

METRIC = Metric("neg_loss", "negated perceptual loss")
# A variant's image must reach this PSNR (dB) against fp32's on a check image to count as agreeing: below it
# int8's activation steps show as visible noise (30 dB: an RMS error of 3% of the range, ~8 of 255 levels); a
# broken graph (wrong scales, a channel lost) falls far under it. fp16's rounding alone stays above 70 dB. One
# bound for every variant: the quantizer judges its int8 candidates before they are labelled int8.
PSNR_BOUND = 30.0


def train(cfg: TrainConfig) -> dict[str, Any]:
    """A :class:`TrainConfig` as a stylizer run (the built-in procedural style; ``dlpipe train stylizer --style
    FILE`` names another)."""
    return style_train.train(style_train.StylizerConfig(
        model=cfg.model, dataset=cfg.dataset, out=cfg.out, data_dir=cfg.data_dir, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, limit=cfg.limit or 512, model_args=cfg.model_args, seed=cfg.seed,
        threads=cfg.threads, progress=cfg.progress))


def style_image(info_or_ckpt: dict[str, Any]) -> np.ndarray:
    """The style image a model or checkpoint carries (``style.png``, base64 PNG), as ``H x W x 3`` uint8."""
    try:
        data = base64.b64decode(info_or_ckpt["style"]["png"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception as exc:  # a missing key, bad base64 or a damaged PNG
        raise ModelFileError(f"the model does not carry its style image ({type(exc).__name__})") from None


def content_inputs(model_path, source: str | None, split: str, count: int, data_dir: str | None = None,
                   offset: int = 0) -> np.ndarray:
    """Calibration and check inputs: content images (the model's training source, or ``source``) at the
    training size, as float32 NCHW in [0, 1]; a ``.npy`` array of such inputs is read as it is."""
    from dlpipe.runtime.engine import Engine

    if source and Path(source).suffix == ".npy":
        return np.load(source).astype(np.float32)[offset:offset + count]
    info = Engine(model_path, device="cpu").info
    size = info.preprocessing.size[0]
    images = style_train.content_images(source or info.raw.get("dataset") or "shapes-scenes", split, offset + count,
                                        size, data_dir, seed=17 if split == "train" else 18)
    return np.ascontiguousarray(images[offset:offset + count].transpose(0, 3, 1, 2), dtype=np.float32) / 255


def psnr(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of N x C x H x W images in [0, 1] (inf where identical)."""
    mse = ((reference.astype(np.float64) - other) ** 2).reshape(len(reference), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1.0 / mse)


def psnr_agreement(fp32: Stylizer, variant: Stylizer, checks: np.ndarray) -> tuple[float, float]:
    """Share of check images whose variant output is within :data:`PSNR_BOUND` of fp32's, and the largest
    pixel difference."""
    ref = np.concatenate([fp32.run(checks[i:i + 16]) for i in range(0, len(checks), 16)])
    got = np.concatenate([variant.run(checks[i:i + 16]) for i in range(0, len(checks), 16)])
    return float((psnr(ref, got) >= PSNR_BOUND).mean()), float(np.abs(ref - got).max())


def evaluate_onnx(predictor: Stylizer, model: str | Path, dataset: str | None, split: str = "test",
                  limit: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """The perceptual losses (content, style, total variation; MobileNetV2 features) of the exported stylizer's
    images of ``limit`` (default 16) held-out content images, against the style image it carries."""
    inputs = content_inputs(model, dataset, split, limit or 16, data_dir)
    outputs = np.concatenate([predictor.run(inputs[i:i + 8]) for i in range(0, len(inputs), 8)])
    net = load_perceptual()
    target = StyleTarget.of(net, torch.from_numpy(style_image(predictor.info.raw)).permute(2, 0, 1)[None].float() / 255)
    losses = measure(net, torch.from_numpy(outputs), torch.from_numpy(inputs), target)
    return {"images": len(inputs), **losses, "neg_loss": -losses["total"],
            "style_name": predictor.info.raw["style"]["name"]}


TASK = Task(
    name="stylization", description="image in, the same image in the style it was trained for out (any size)",
    metric=METRIC, train=train, command=style_train.train_command, summary=style_train.summary, graphs=single_graph,
    metadata=lambda ckpt: {"style": ckpt["style"]},
    # int8 quantizes the convolutions only: instance norm's per-channel scale has no axis 1 to quantize along
    quantization=QuantizationPolicy(inputs=content_inputs, agreement=psnr_agreement, int8_ops=("Conv",),
                                    agreement_name=f"share of images at PSNR >= {PSNR_BOUND:.0f} dB against fp32's"),
    evaluate=evaluate_onnx, predictor=Stylizer,
    report=lambda r: (f"perceptual loss {r['total']:.4f} (content {r['content']:.4f}, style {r['style']:.4f}, "
                      f"total variation {r['tv']:.4f}) over {r['images']} images"))
