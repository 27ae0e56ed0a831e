"""``dlpipe caption``: one sentence per image file from a captioner package (issue 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlpipe.runtime import load
from dlpipe.runtime.errors import InputError
from dlpipe.runtime.images import open_image


def caption_images(model: str | Path, images: list[str], beam: int | None = None,
                   device: str = "auto") -> list[dict[str, Any]]:
    """Caption each image file (every file is read and checked before any decoding).

    Returns:
        Per image: the file, the caption, its length-normalised log-probability (``score``), the raw
        log-probability and the beam width used.
    """
    captioner = load(model, device=device)
    if getattr(captioner, "task", None) != "captioning":
        raise InputError(f"'{model}' is a {captioner.info.task} model, not a captioner package")
    pictures = [open_image(p) for p in images]
    width = int(captioner.decoding.get("beam", 1) if beam is None else beam)
    results = captioner.predict(pictures, beam=width)
    return [{"image": str(path), "caption": r.sentence, "score": r.score, "log_prob": r.log_prob, "beam": width}
            for path, r in zip(images, results)]
