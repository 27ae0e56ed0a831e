"""``dlpipe segment``: masks and colour overlays for image files, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from dlpipe.runtime import load
from dlpipe.runtime.errors import InputError
from dlpipe.runtime.files import atomic_output
from dlpipe.runtime.images import open_image
from dlpipe.runtime.predictors import Segmenter


def _save_png(array, path: Path) -> None:
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def segment_images(model: str | Path, images: list[str], out: str | Path, device: str = "auto") -> list[dict[str, Any]]:
    """Segment each image file; write ``<stem>_overlay.png`` and ``<stem>_mask.png`` (class ids) under ``out``.

    Every image is read and checked before anything is written.
    """
    predictor = load(model, device=device)
    if not isinstance(predictor, Segmenter):
        raise InputError(f"'{model}' is a {predictor.info.task} model, not a segmentation model")
    pictures = [open_image(p) for p in images]
    results = predictor.predict(pictures)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, picture, result in zip(images, pictures, results):
        stem = Path(path).stem
        overlay, mask = out / f"{stem}_overlay.png", out / f"{stem}_mask.png"
        _save_png(result.overlay(picture), overlay)
        _save_png(result.mask, mask)
        rows.append({"image": str(path), "overlay": str(overlay), "mask": str(mask), "shares": result.shares})
    return rows
