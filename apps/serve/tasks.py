"""Task endpoints for people and web pages: ``POST /v1/models/{name}/predict``, answered with the task's JSON
rows. One table (``TASK_ENDPOINTS``) says, per task, what a request carries and which function answers it:

- image tasks (classification, segmentation, detection, captioning, stylization, reconstruction) take
  uploaded image files (multipart) or raw image bytes; the rows of the first four are those ``dlpipe
  classify``, ``segment``, ``detect`` and ``caption`` print with ``--json`` (less the files they write), built
  by the same functions (apps/task_rows.py); stylized and reconstructed pictures come back as base64 PNGs at
  the upload's size, as ``dlpipe stylize`` and ``denoise`` write them;
- control (a DQN policy) takes observations: a JSON ``{"observation": [...]}`` or ``{"observations":
  [[...], ...]}``, or a ``.npy`` array, and answers each one's greedy action and Q-values;
- generation takes nothing but query parameters (``n``, ``seed``, ``class``, ``columns``) and answers the
  grid ``dlpipe generate`` draws, as a base64 PNG.

Images are decoded exactly as the CLI decodes them (``open_image``, with its decompression-bomb limit)."""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from dlpipe.apps.images import failure_row, predict_readable
from dlpipe.apps.task_rows import TASK_ROWS, number_param, png_base64
from dlpipe.runtime.errors import InputError
from dlpipe.runtime.generator import image_grid
from dlpipe.runtime.images import Failure, open_image

MAX_IMAGES = 64  # images in one request
MAX_OBSERVATIONS = 4096  # observations in one request
MAX_GENERATED = 256  # images one generation request draws


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the client gave it and its bytes."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class Request:
    """What a task request carries: uploads (images or an array file), a JSON document, query parameters."""

    uploads: list[Upload]
    params: dict[str, str]
    document: Any = None


@dataclass(frozen=True)
class Endpoint:
    """How a task answers ``POST /v1/models/{name}/predict``.

    Attributes:
        body: What the request carries: ``images`` (files or image bytes), ``observations`` (JSON or a
            ``.npy``) or ``none`` (query parameters only).
        answer: ``f(predictor, request, max_pixels) -> rows``, blocking (run in a worker thread).
    """

    body: str
    answer: Callable[[Any, Request, "int | None"], list[dict[str, Any]]]


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


def _images(rows: Callable[..., list[dict[str, Any]]]) -> Endpoint:
    """An image task's endpoint from its row builder ``rows(predictor, names, pictures, params)``."""

    def answer(predictor, request: Request, max_pixels: int | None) -> list[dict[str, Any]]:
        if not request.uploads:
            raise InputError("no image given: upload files (multipart/form-data) or post the image bytes")
        if len(request.uploads) > MAX_IMAGES:
            raise InputError(f"{len(request.uploads)} images in one request; at most {MAX_IMAGES}")
        names = [u.filename for u in request.uploads]
        return rows(predictor, names, decode(request.uploads, max_pixels), request.params)

    return Endpoint("images", answer)


def _pictures(key: str, run: Callable[[Any, list, dict[str, str]], list], same_size: bool):
    """Rows of an image-to-image task: ``{image, <key>: base64 PNG, width, height}``; ``same_size`` resizes the
    result back to the upload's size (an autoencoder works at its own), as the CLI writes it."""

    def rows(predictor, names, pictures, params) -> list[dict[str, Any]]:
        results = predict_readable(lambda imgs, errors: run(predictor, imgs, params, errors), pictures, False)
        out = []
        for name, picture, r in zip(names, pictures, results):
            if isinstance(r, Failure):
                out.append(failure_row(r, name))
                continue
            image = Image.fromarray(r[..., 0] if r.shape[-1] == 1 else r)
            if same_size and image.size != picture.size:
                image = image.resize(picture.size, Image.Resampling.BILINEAR)
            out.append({"image": name, key: png_base64(np.asarray(image)), "width": image.width,
                        "height": image.height})
        return out

    return rows


def _stylize(predictor, pictures, params, errors):
    size = number_param(params, "size", int, 0, 0, 4096) or None
    return predictor.stylize(pictures, size=size, errors=errors)


def _reconstruct(predictor, pictures, params, errors):
    return predictor.predict(pictures, errors=errors)


def _observations(request: Request) -> np.ndarray:
    """The observations of a control request: a JSON document or one ``.npy`` upload."""
    if request.document is not None:
        doc = request.document
        if not isinstance(doc, dict) or len(set(doc) & {"observation", "observations"}) != 1:
            raise InputError('expected a JSON object with "observation" (one) or "observations" (a list)')
        many = "observations" in doc
        try:
            array = np.asarray(doc["observations" if many else "observation"], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(f"observations must be numbers in nested lists of one shape ({exc})") from None
        return array if many else array[None]
    if len(request.uploads) != 1:
        raise InputError("post the observations as JSON ({\"observations\": [[...]]}) or as one .npy array")
    upload = request.uploads[0]
    try:
        array = np.load(io.BytesIO(upload.data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"'{upload.filename}' is not a .npy array ({exc})") from None
    if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise InputError(f"'{upload.filename}' holds {getattr(array, 'dtype', type(array).__name__)}, not numbers")
    return array


def _act(predictor, request: Request, max_pixels: int | None) -> list[dict[str, Any]]:
    array = _observations(request)
    if array.shape == predictor.observation_shape:
        array = array[None]
    if len(array) > MAX_OBSERVATIONS:
        raise InputError(f"{len(array)} observations in one request; at most {MAX_OBSERVATIONS}")
    out = predictor.predict(array)
    names = predictor.action_names
    return [{"action": int(a), "action_name": names[a] if a < len(names) else str(a),
             "q_values": [float(v) for v in q]} for a, q in zip(out.actions, out.q_values)]


def _generate(predictor, request: Request, max_pixels: int | None) -> list[dict[str, Any]]:
    count = number_param(request.params, "n", int, 16, 1, MAX_GENERATED)
    seed = number_param(request.params, "seed", int, 0, 0, 2**63 - 1)
    columns = number_param(request.params, "columns", int, 8, 1, MAX_GENERATED)
    label = request.params.get("class")
    images = predictor.generate(count, seed=seed, label=label)
    grid = image_grid(images, columns)
    return [{"n": count, "seed": seed, "class": label, "image_shape": list(images.shape[1:]),
             "grid_png": png_base64(grid[..., 0] if grid.shape[-1] == 1 else grid)}]


# task -> what its requests carry and how they are answered
TASK_ENDPOINTS: dict[str, Endpoint] = {
    **{task: _images(rows) for task, rows in TASK_ROWS.items()},
    "stylization": _images(_pictures("stylized_png", _stylize, same_size=False)),
    "reconstruction": _images(_pictures("reconstruction_png", _reconstruct, same_size=True)),
    "control": Endpoint("observations", _act),
    "generation": Endpoint("none", _generate)}


def endpoint(task: str) -> Endpoint:
    """The endpoint of ``task``.

    Raises:
        InputError: a task without one.
    """
    found = TASK_ENDPOINTS.get(task)
    if found is None:
        raise InputError(f"'{task}' models have no task endpoint; use /v2/models/.../infer")
    return found


def parse_document(body: bytes) -> Any:
    """A JSON request body.

    Raises:
        InputError: not UTF-8 JSON.
    """
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"the request body is not JSON ({type(exc).__name__}: {exc})") from None
