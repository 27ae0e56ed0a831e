"""``dlpipe generate``: images from any model that generates (a DCGAN generator, a VAE package...), as one
grid PNG or one PNG per image in a folder; ``interpolate`` walks the latent space between two seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dlpipe.runtime import load
from dlpipe.runtime.errors import UsageError
from dlpipe.runtime.files import atomic_output
from dlpipe.runtime.generator import image_grid

MAX_IMAGES = 100_000  # one command's images are held in memory (and a grid is one picture)


def _save_png(images: np.ndarray, path: Path) -> None:
    """uint8 ``H x W x C`` (C 1 or 3) written atomically as a PNG."""
    with atomic_output(path) as tmp:
        Image.fromarray(images[..., 0] if images.shape[-1] == 1 else images).save(tmp, format="PNG")


def _targets(out: Path, count: int, interpolate: bool, overwrite: bool) -> list[Path]:
    """The files to write: ``out`` itself when it is a ``.png`` (a grid), else ``out/<name>_NNNN.png`` per image;
    refused when one exists and ``overwrite`` is off."""
    if out.suffix.lower() == ".png":
        targets = [out]
    elif out.suffix or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out '{out}' must be a .png file (a grid) or a folder (one PNG per image)")
    else:
        stem = "step" if interpolate else "sample"
        targets = [out / f"{stem}_{i:04d}.png" for i in range(count)]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UsageError(f"'{existing[0]}'{more} already exists; pass --overwrite to replace it, or choose another "
                         "--out")
    return targets


def generate_images(model: str | Path, out: str | Path, count: int = 64, seed: int = 0, label: str | None = None,
                    interpolate: bool = False, overwrite: bool = False, device: str = "auto",
                    columns: int = 8) -> dict[str, Any]:
    """Generate ``count`` images (or, with ``interpolate``, ``count`` steps from seed ``seed`` to ``seed + 1``)
    and write them to ``out``: a grid PNG (a one-row strip for an interpolation) or a folder of PNGs.

    Raises:
        UsageError: a count below 1, an output that exists without ``overwrite``, a model that cannot
            generate, an unknown class (or a class for an unconditional model).
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_IMAGES:
        raise UsageError(f"--n must be at least 1 and at most {MAX_IMAGES:,}, got {count}")
    if interpolate and count < 2:
        raise UsageError(f"an interpolation needs --n of at least 2 steps, got {count}")
    out = Path(out)
    targets = _targets(out, count, interpolate, overwrite)
    predictor = load(model, device=device)
    if not callable(getattr(predictor, "generate", None)):
        task = getattr(getattr(predictor, "info", None), "task", type(predictor).__name__)
        raise UsageError(f"'{model}' is a {task} model; it does not generate images")
    images = (predictor.interpolate(seed, seed + 1, count, label=label) if interpolate
              else predictor.generate(count, seed=seed, label=label))
    if len(targets) == 1:
        _save_png(image_grid(images, count if interpolate else columns), targets[0])
    else:
        for image, target in zip(images, targets):
            _save_png(image, target)
    return {"model": str(model), "out": str(out), "files": [str(t) for t in targets], "count": count, "seed": seed,
            "label": label, "interpolate": interpolate, "image_shape": list(images.shape[1:]),
            "grid": len(targets) == 1}
