"""``dlpipe detect``: images with labelled boxes drawn, and the detections as JSON, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlpipe.apps.images import failure_row, open_images, output_paths, predict_readable
from dlpipe.runtime import load
from dlpipe.runtime.errors import UsageError
from dlpipe.runtime.files import atomic_output, write_json
from dlpipe.runtime.images import Failure
from dlpipe.runtime.predictors import Detector, draw_detections


def detect_images(model: str | Path, images: list[str], out: str | Path, threshold: float = 0.5,
                  device: str = "auto", overwrite: bool = False, fail_fast: bool = False,
                  max_pixels: int | None = None) -> list[dict[str, Any]]:
    """Detect objects in each image file; write ``<name>_boxes.png`` and ``<name>_boxes.json`` under ``out``.

    Output names are unique and no existing file is replaced unless ``overwrite`` (as for
    :func:`~dlpipe.apps.segment.segment_images`); an unreadable image gets a row with its ``error``.
    """
    predictor = load(model, device=device)
    if not isinstance(predictor, Detector):
        raise UsageError(f"'{model}' is a {predictor.info.task} model, not a detection model")
    targets = output_paths(images, out, ("_boxes.png", "_boxes.json"), overwrite)
    pictures = open_images(images, fail_fast, max_pixels)
    results = predict_readable(lambda imgs, errors: predictor.predict(imgs, threshold=threshold, errors=errors),
                               pictures, fail_fast)
    rows = []
    for path, picture, found, (drawn, listing) in zip(images, pictures, results, targets):
        if isinstance(found, Failure):
            rows.append(failure_row(found, path))
            continue
        row = detection_row(path, picture, found, threshold)
        with atomic_output(drawn) as tmp:
            draw_detections(picture, found).save(tmp, format="PNG")
        write_json(listing, row)
        rows.append({**row, "drawn": str(drawn), "json": str(listing)})
    return rows


def detection_row(name: str, picture, found: list, threshold: float) -> dict[str, Any]:
    """One image's detections as a result row: the image, its size, the threshold and the detections."""
    return {"image": str(name), "width": picture.size[0], "height": picture.size[1], "threshold": threshold,
            "detections": [d.as_dict() for d in found]}
