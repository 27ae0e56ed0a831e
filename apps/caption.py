"""``dlpipe caption``: one sentence per image file from a captioner package (issue 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlpipe.apps.images import failure_row, open_images, predict_readable
from dlpipe.runtime import load
from dlpipe.runtime.errors import UsageError
from dlpipe.runtime.images import Failure


def caption_images(model: str | Path, images: list[str], beam: int | None = None, device: str = "auto",
                   fail_fast: bool = False, max_pixels: int | None = None) -> list[dict[str, Any]]:
    """Caption each image file; an unreadable one gets a row with its ``error`` (``fail_fast``: raise).

    Returns:
        Per image: the file, the caption, its length-normalised log-probability (``score``), the raw
        log-probability and the beam width used; or the file and its ``error``.
    """
    captioner = load(model, device=device)
    if getattr(captioner, "task", None) != "captioning":
        raise UsageError(f"'{model}' is a {captioner.info.task} model, not a captioner package")
    width = int(captioner.decoding.get("beam", 1) if beam is None else beam)
    pictures = open_images(images, fail_fast, max_pixels)
    results = predict_readable(lambda imgs, errors: captioner.predict(imgs, beam=width, errors=errors),
                               pictures, fail_fast)
    return caption_rows(images, results, width)


def caption_rows(names: list[str], results: list, width: int) -> list[dict[str, Any]]:
    """One row per image: its name, caption, scores and the beam width, or its ``error``."""
    return [failure_row(r, name) if isinstance(r, Failure) else
            {"image": str(name), "caption": r.sentence, "score": r.score, "log_prob": r.log_prob, "beam": width}
            for name, r in zip(names, results)]
