"""Each task's result rows for decoded images, built once for everything that answers with them: the server's
``POST /v1/models/{name}/predict`` (apps/serve/tasks.py) and ``dlpipe predict`` (apps/batch). A row is the
same content ``dlpipe classify``, ``segment``, ``detect`` and ``caption`` print with ``--json`` (less the
files they write). ``params`` are string options (a server's query parameters, the CLI's flags)."""

from __future__ import annotations

import base64
import io
from typing import Any, Callable

from PIL import Image

from dlpipe.apps.caption import caption_rows
from dlpipe.apps.classify import result_rows
from dlpipe.apps.detect import detection_row
from dlpipe.apps.images import failure_row, predict_readable
from dlpipe.runtime.errors import InputError
from dlpipe.runtime.images import Failure


def png_base64(array) -> str:
    """A uint8 image array as a base64 PNG (JSON answers carry pictures this way)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def flag_param(params: dict[str, str], key: str) -> bool:
    return params.get(key, "false").lower() in ("1", "true", "yes")


def number_param(params: dict[str, str], key: str, kind: type, default, low, high):
    try:
        value = kind(params.get(key, default))
    except ValueError:
        raise InputError(f"query parameter {key} must be a {kind.__name__}, got {params[key]!r}") from None
    if not low <= value <= high:
        raise InputError(f"query parameter {key} must be between {low} and {high}, got {value}")
    return value


def classify(predictor, names, pictures, params) -> list[dict[str, Any]]:
    top_k = number_param(params, "top_k", int, 3, 1, 1000)
    results = predict_readable(lambda imgs, errors: predictor.predict(imgs, top_k=top_k, errors=errors),
                               pictures, False)
    return result_rows(names, results)


def segment(predictor, names, pictures, params) -> list[dict[str, Any]]:
    results = predict_readable(predictor.predict, pictures, False)
    rows = []
    for name, picture, r in zip(names, pictures, results):
        if isinstance(r, Failure):
            rows.append(failure_row(r, name))
            continue
        row = {"image": name, "shares": r.shares}
        if flag_param(params, "mask"):
            row["mask_png"] = png_base64(r.mask)
        if flag_param(params, "overlay"):
            row["overlay_png"] = png_base64(r.overlay(picture))
        rows.append(row)
    return rows


def detect(predictor, names, pictures, params) -> list[dict[str, Any]]:
    threshold = number_param(params, "threshold", float, 0.5, 0.0, 1.0)
    results = predict_readable(lambda imgs, errors: predictor.predict(imgs, threshold=threshold, errors=errors),
                               pictures, False)
    return [failure_row(r, name) if isinstance(r, Failure) else detection_row(name, p, r, threshold)
            for name, p, r in zip(names, pictures, results)]


def caption(predictor, names, pictures, params) -> list[dict[str, Any]]:
    width = number_param(params, "beam", int, predictor.decoding.get("beam", 1), 1, 64)
    results = predict_readable(lambda imgs, errors: predictor.predict(imgs, beam=width, errors=errors),
                               pictures, False)
    return caption_rows(names, results, width)


# task -> how its decoded images become rows
TASK_ROWS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "classification": classify, "segmentation": segment, "detection": detect, "captioning": caption}
