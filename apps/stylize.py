"""``dlpipe stylize``: content images painted in a style, by an exported feed-forward stylizer (``--model``, fast,
the style baked in, torch-free) or by optimising each image itself against a style image (``--optimize``,
Gatys et al., any style, slow, torch). Outputs are ``<name>_styled.png`` under the output folder, written
atomically; existing files are refused unless ``overwrite``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dlpipe.apps.images import failure_row, open_images, output_paths, predict_readable
from dlpipe.runtime.errors import UsageError
from dlpipe.runtime.files import atomic_output
from dlpipe.runtime.images import Failure

SUFFIX = "_styled.png"
OPTIMIZE_SIZE = 256  # --optimize's default longer side: each step runs the perceptual network forward and back


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _check_mode(style: str | None, model: str | None, optimize: bool) -> None:
    if optimize and model:
        raise UsageError("choose one of --model (a trained stylizer) and --optimize (optimise each image)")
    if not optimize and not model:
        raise UsageError("give --model STYLIZER.onnx, or --optimize with --style STYLE_IMAGE")
    if optimize and not style:
        raise UsageError("--optimize needs --style STYLE_IMAGE")
    if model and style:  # refused rather than ignored: the user would expect the style to be used
        raise UsageError(f"'{model}' has its style baked in; drop --style, or use --optimize to paint in "
                         f"'{style}'")


def stylize_images(contents: list[str], out: str | Path, *, style: str | None = None, model: str | None = None,
                   optimize: bool = False, size: int | None = None, steps: int = 200, overwrite: bool = False,
                   fail_fast: bool = False, max_pixels: int | None = None, device: str = "auto",
                   progress: bool = False) -> list[dict[str, Any]]:
    """Stylize each content image file; write ``<name>_styled.png`` under ``out``.

    Args:
        style: The style image (``--optimize`` only; a ``--model`` carries its own).
        model: An exported stylizer (ONNX).
        optimize: Optimise each image's pixels against ``style`` instead.
        size: Resize each content image so its longer side is ``size`` (default: its own size with a model,
            256 with ``--optimize``).
        steps: Optimisation steps.

    Returns:
        One row per content image: the output file and timing (and the losses reached when optimising), or
        the ``error`` of an unreadable image (the others are still done; ``fail_fast`` stops at the first).

    Raises:
        UsageError: a bad combination of options, or an output that exists. InputError: an unreadable style
        image. ModelFileError: ``model`` is not a stylizer.
    """
    _check_mode(style, model, optimize)
    if size is not None and size < 4:
        raise UsageError(f"--size must be at least 4 pixels, got {size}")
    targets = [t[0] for t in output_paths(contents, out, (SUFFIX,), overwrite)]
    if optimize:
        results = _optimized(contents, style, size or OPTIMIZE_SIZE, steps, fail_fast, max_pixels, progress)
    else:
        results = _feed_forward(contents, model, size, fail_fast, max_pixels, device)
    rows = []
    for path, (result, row), target in zip(contents, results, targets):
        if isinstance(result, Failure):
            rows.append(failure_row(result, path))
            continue
        _save_png(result, target)
        rows.append({"image": str(path), "output": str(target), "width": int(result.shape[1]),
                     "height": int(result.shape[0]), **row})
    return rows


def _feed_forward(contents, model, size, fail_fast, max_pixels, device) -> list[tuple[Any, dict]]:
    from dlpipe.runtime import load
    from dlpipe.runtime.stylizer import Stylizer

    predictor = load(model, device=device)
    if not isinstance(predictor, Stylizer):
        raise UsageError(f"'{model}' is a {predictor.info.task} model, not a stylizer")
    pictures = open_images(contents, fail_fast, max_pixels)
    start = time.perf_counter()
    results = predict_readable(lambda images, errors: predictor.stylize(images, size=size, errors=errors), pictures,
                               fail_fast)
    seconds = (time.perf_counter() - start) / max(1, len(results))
    return [(r, {"mode": "model", "style": predictor.style, "seconds": round(seconds, 4)}) for r in results]


def _optimized(contents, style, size, steps, fail_fast, max_pixels, progress) -> list[tuple[Any, dict]]:
    from dlpipe.training import style as nst

    style_image, style_name = nst.read_style(style, max(size, 64), max_pixels)  # unreadable: one line, nothing done
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    pictures = open_images(contents, fail_fast, max_pixels)
    net = nst.load_perceptual()
    target = nst.StyleTarget.of(net, nst.to_tensor(style_image))
    results = []
    for picture in pictures:
        if isinstance(picture, Failure):
            results.append((picture, {}))
            continue
        start = time.perf_counter()
        content = nst.to_tensor(nst.fit_longer_side(picture, size))
        image, losses = nst.optimize_image(net, content, target, nst.OptimizeConfig(steps=steps), progress=progress)
        results.append((nst.to_uint8(image), {"mode": "optimize", "style": style_name, "steps": steps,
                                              "seconds": round(time.perf_counter() - start, 2),
                                              "losses": {k: round(v, 5) for k, v in losses.items()}}))
    return results
