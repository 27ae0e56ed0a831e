"""``dlpipe classify``: the top-k labels of image files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlpipe.apps.images import failure_row, open_images, predict_readable
from dlpipe.runtime import Classification, Classifier, load
from dlpipe.runtime.errors import UsageError
from dlpipe.runtime.images import Failure


def classify_images(model: str | Path, images: list[str], top_k: int = 3, device: str = "auto",
                    fail_fast: bool = False, max_pixels: int | None = None) -> list[dict[str, Any]]:
    """Classify each image file; an unreadable one gets a row with its ``error`` (``fail_fast``: raise).

    Returns:
        Per image: the file, the best label and its probability, and the top-k list; or the file and its
        ``error``.
    """
    predictor = load(model, device=device)
    if not isinstance(predictor, Classifier):
        raise UsageError(f"'{model}' is a {predictor.info.task} model, not a classifier")
    pictures = open_images(images, fail_fast, max_pixels)
    results = predict_readable(lambda imgs, errors: predictor.predict(imgs, top_k=top_k, errors=errors),
                               pictures, fail_fast)
    return result_rows(images, results)


def result_rows(names: list[str], results: list[Classification | Failure]) -> list[dict[str, Any]]:
    """One row per image: its name, best label and probability and the top-k list, or its ``error``."""
    return [failure_row(r, name) if isinstance(r, Failure) else
            {"image": str(name), "label": r.label, "score": r.score,
             "top_k": [{"label": label, "score": score} for label, score in r.top_k]}
            for name, r in zip(names, results)]
