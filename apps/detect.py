"""``dlpipe detect``: images with labelled boxes drawn, and the detections as JSON, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlpipe.runtime import load
from dlpipe.runtime.errors import InputError
from dlpipe.runtime.files import atomic_output, write_json
from dlpipe.runtime.images import open_image
from dlpipe.runtime.predictors import Detector, draw_detections


def detect_images(model: str | Path, images: list[str], out: str | Path, threshold: float = 0.5,
                  device: str = "auto") -> list[dict[str, Any]]:
    """Detect objects in each image file; write ``<stem>_boxes.png`` and ``<stem>_boxes.json`` under ``out``.

    Every image is read and checked before anything is written.
    """
    predictor = load(model, device=device)
    if not isinstance(predictor, Detector):
        raise InputError(f"'{model}' is a {predictor.info.task} model, not a detection model")
    pictures = [open_image(p) for p in images]
    results = predictor.predict(pictures, threshold=threshold)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, picture, found in zip(images, pictures, results):
        stem = Path(path).stem
        drawn, listing = out / f"{stem}_boxes.png", out / f"{stem}_boxes.json"
        row = {"image": str(path), "width": picture.size[0], "height": picture.size[1], "threshold": threshold,
               "detections": [d.as_dict() for d in found]}
        with atomic_output(drawn) as tmp:
            draw_detections(picture, found).save(tmp, format="PNG")
        write_json(listing, row)
        rows.append({**row, "drawn": str(drawn), "json": str(listing)})
    return rows
