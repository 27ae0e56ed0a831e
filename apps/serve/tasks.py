"""Task endpoints for people and web pages: ``POST /v1/models/{name}/predict`` with uploaded image files
(multipart) or raw image bytes, answered with the task's JSON rows, the same rows (less the files written)
as ``dlpipe classify``, ``segment`` and ``detect`` print with ``--json``. One table maps a task to the
function that runs it; images are decoded exactly as the CLI decodes them (``open_image``, with its
decompression-bomb limit)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from dlpipe.apps.task_rows import classify, detect, segment
from dlpipe.runtime.errors import InputError
from dlpipe.runtime.images import Failure, open_image
from dlpipe.runtime.predictors import Predictor

MAX_IMAGES = 64  # images in one request


@dataclass(frozen=True)
class Upload:
    """One uploaded image: the name the client gave it and its bytes."""

    filename: str
    data: bytes


# the rows themselves are built in apps/task_rows.py, shared with `dlpipe predict`
# task -> how its images are answered
TASK_ENDPOINTS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "classification": classify, "segmentation": segment, "detection": detect}


def decode(uploads: list[Upload], max_pixels: int | None) -> list[Image.Image | Failure]:
    """Each upload decoded as the CLI decodes a file (through a temporary file of the same suffix), or a
    :class:`Failure` naming the upload."""
    pictures: list[Image.Image | Failure] = []
    with tempfile.TemporaryDirectory(prefix="dlpipe-serve-") as folder:
        for i, upload in enumerate(uploads):
            path = Path(folder) / f"upload-{i}{Path(upload.filename).suffix[:16]}"
            path.write_bytes(upload.data)
            try:
                pictures.append(open_image(path, max_pixels))
            except InputError as exc:
                pictures.append(Failure(upload.filename, InputError(str(exc).replace(str(path), upload.filename))))
    return pictures


def predict(predictor: Predictor, uploads: list[Upload], params: dict[str, str],
            max_pixels: int | None) -> list[dict[str, Any]]:
    """The task's rows for the uploads (blocking: run it in a worker thread).

    Raises:
        InputError: no images, too many, a task without an image endpoint, or a bad query parameter.
    """
    run = TASK_ENDPOINTS.get(predictor.info.task)
    if run is None:
        raise InputError(f"'{predictor.info.task}' models have no image endpoint; use /v2/models/.../infer")
    if not uploads:
        raise InputError("no image given: upload files (multipart/form-data) or post the image bytes")
    if len(uploads) > MAX_IMAGES:
        raise InputError(f"{len(uploads)} images in one request; at most {MAX_IMAGES}")
    return run(predictor, [u.filename for u in uploads], decode(uploads, max_pixels), params)
