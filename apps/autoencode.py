"""``dlpipe encode`` (features of image files to a ``.npy``, from any model whose predictor encodes: an
autoencoder package, an RBM's feature extractor) and ``dlpipe denoise`` (an autoencoder's reconstruction of
each image file, written beside its name in a folder), issue 15."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dlpipe.apps.images import failure_row, open_images, output_paths
from dlpipe.runtime import load
from dlpipe.runtime.autoencoder import Autoencoder
from dlpipe.runtime.errors import UsageError
from dlpipe.runtime.files import atomic_output
from dlpipe.runtime.images import Failure, guarded


def _readable_results(run, pictures: list, fail_fast: bool) -> list:
    """``run(images) -> one result per image`` over the readable pictures (an unusable one becomes a
    :class:`Failure` unless ``fail_fast``); failures to open keep their places."""
    readable = [p for p in pictures if not isinstance(p, Failure)]
    results = iter(guarded([readable], run, "raise" if fail_fast else "skip") if readable else [])
    return [p if isinstance(p, Failure) else next(results) for p in pictures]


def encode_images(model: str | Path, images: list[str], out: str | Path, overwrite: bool = False,
                  device: str = "auto", fail_fast: bool = False, max_pixels: int | None = None) -> list[dict[str, Any]]:
    """Encode each image file and save the features of those that could be read, in order, as one float32
    ``N x features`` array in ``out`` (a ``.npy`` file, written atomically; nothing written when none could).

    Returns:
        Per image: the file, its ``row`` in the array and the feature count; or the file and its ``error``.

    Raises:
        UsageError: ``out`` is not a ``.npy`` name, exists without ``overwrite``, or the model does not encode.
    """
    out = Path(out)
    if out.suffix.lower() != ".npy":
        raise UsageError(f"--out '{out}' must name a .npy file")
    if out.exists() and not overwrite:
        raise UsageError(f"'{out}' already exists; pass --overwrite to replace it, or choose another --out")
    predictor = load(model, device=device)
    if not callable(getattr(predictor, "encode", None)):
        raise UsageError(f"'{model}' is a {predictor.info.task} model; it does not encode images")
    pictures = open_images(images, fail_fast, max_pixels)
    results = _readable_results(lambda part: list(predictor.encode(part)), pictures, fail_fast)
    features = [r for r in results if not isinstance(r, Failure)]
    rows, row = [], 0
    for path, result in zip(images, results):
        if isinstance(result, Failure):
            rows.append(failure_row(result, path))
            continue
        rows.append({"image": str(path), "row": row, "features": int(result.size), "out": str(out)})
        row += 1
    if features:
        with atomic_output(out) as tmp, open(tmp, "wb") as f:
            np.save(f, np.stack(features).astype(np.float32))
    return rows


def denoise_images(model: str | Path, images: list[str], out: str | Path, overwrite: bool = False,
                   device: str = "auto", fail_fast: bool = False,
                   max_pixels: int | None = None) -> list[dict[str, Any]]:
    """Write each image file's reconstruction by an autoencoder (a denoising one cleans it) to
    ``out/<name>.png``, resized back to the file's own size. Output names are unique and no existing file is
    replaced unless ``overwrite``; an unreadable image gets a row with its ``error`` and nothing written.

    Raises:
        UsageError: the model is not an autoencoder package, or an output exists without ``overwrite``.
    """
    predictor = load(model, device=device)
    if not isinstance(predictor, Autoencoder):
        raise UsageError(f"'{model}' is a {predictor.info.task} model, not an autoencoder package")
    targets = output_paths(images, out, (".png",), overwrite)
    pictures = open_images(images, fail_fast, max_pixels)
    results = _readable_results(lambda part: predictor.predict(part), pictures, fail_fast)
    rows = []
    for path, picture, result, (target,) in zip(images, pictures, results, targets):
        if isinstance(result, Failure):
            rows.append(failure_row(result, path))
            continue
        clean = Image.fromarray(result[..., 0] if result.shape[-1] == 1 else result)
        if clean.size != picture.size:
            clean = clean.resize(picture.size, Image.Resampling.BILINEAR)
        with atomic_output(target) as tmp:
            clean.save(tmp, format="PNG")
        rows.append({"image": str(path), "out": str(target), "size": list(picture.size)})
    return rows
