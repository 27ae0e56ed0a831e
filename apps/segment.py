"""``dlpipe segment``: masks and colour overlays for image files, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from dlpipe.apps.images import failure_row, open_images, output_paths, predict_readable
from dlpipe.runtime import load
from dlpipe.runtime.errors import UsageError
from dlpipe.runtime.files import atomic_output
from dlpipe.runtime.images import Failure
from dlpipe.runtime.predictors import Segmenter


def _save_png(array, path: Path) -> None:
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def segment_images(model: str | Path, images: list[str], out: str | Path, device: str = "auto",
                   overwrite: bool = False, fail_fast: bool = False,
                   max_pixels: int | None = None) -> list[dict[str, Any]]:
    """Segment each image file; write ``<name>_overlay.png`` and ``<name>_mask.png`` (class ids) under ``out``.

    Output names are unique (``a/horse.png`` and ``b/horse.png`` give ``a_horse_*`` and ``b_horse_*``), and no
    existing file is replaced unless ``overwrite``. An unreadable image gets a row with its ``error`` and
    nothing written; the others are still processed (``fail_fast``: the first error stops everything,
    before anything is written).
    """
    predictor = load(model, device=device)
    if not isinstance(predictor, Segmenter):
        raise UsageError(f"'{model}' is a {predictor.info.task} model, not a segmentation model")
    targets = output_paths(images, out, ("_overlay.png", "_mask.png"), overwrite)
    pictures = open_images(images, fail_fast, max_pixels)
    results = predict_readable(predictor.predict, pictures, fail_fast)
    rows = []
    for path, picture, result, (overlay, mask) in zip(images, pictures, results, targets):
        if isinstance(result, Failure):
            rows.append(failure_row(result, path))
            continue
        _save_png(result.overlay(picture), overlay)
        _save_png(result.mask, mask)
        rows.append({"image": str(path), "overlay": str(overlay), "mask": str(mask), "shares": result.shares})
    return rows
