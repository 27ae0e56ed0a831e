"""The torch-free stylizer (issue 16): images of any size in, the same images in the model's style out.

Loaded by :func:`dlpipe.runtime.load` for models whose task is ``stylization``. The graph takes RGB pixels in
[0, 1] (N x 3 x H x W, height and width multiples of the model's ``size_multiple``); other sizes are
reflection-padded up to one and the result cropped back, so every image keeps its own size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import InputError, ModelFileError, UsageError
from dlpipe.runtime.images import Failure, ImageLike, guarded, preprocess, split_items, to_pil
from dlpipe.runtime.metadata import ModelInfo


class Stylizer:
    """A feed-forward style transfer network with its style baked in.

    Args:
        engine: An :class:`Engine` over a dlpipe ``stylization`` model.

    Raises:
        ModelFileError: no dlpipe metadata.
    """

    task = "stylization"

    def __init__(self, engine: Engine):
        if engine.info is None:
            raise ModelFileError(f"'{engine.path}' has no dlpipe metadata; use dlpipe.runtime.Engine to run it raw")
        self.engine = engine
        self.info: ModelInfo = engine.info

    @property
    def path(self) -> Path:
        return self.engine.path

    @property
    def style(self) -> str:
        """The name of the style image the model was trained on."""
        return str((self.info.raw.get("style") or {}).get("name", "unknown"))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Stylize a float32 N x 3 x H x W batch in [0, 1]; the result has the same shape."""
        h, w = batch.shape[-2:]
        multiple = self.info.preprocessing.size_multiple
        ph, pw = (-h) % multiple, (-w) % multiple
        if ph or pw:
            if h < 2 or w < 2:
                raise InputError(f"an image of {w}x{h} pixels is too small to stylize")
            batch = np.pad(batch, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect" if min(h, w) > max(ph, pw)
                           else "edge")
        out = self.engine.run({self.engine.input_names[0]: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return out[:, :, :h, :w]

    def stylize(self, images: ImageLike | Iterable[ImageLike], size: int | None = None,
                errors: str = "raise") -> list[np.ndarray | Failure]:
        """Stylize images (paths, PIL images or arrays, each at its own size).

        Args:
            size: Resize each image first so its longer side is ``size`` pixels (None: keep its size).
            errors: ``"raise"`` stops at the first unusable image; ``"skip"`` puts a
                :class:`~dlpipe.runtime.images.Failure` in its place and goes on.

        Returns:
            One ``H x W x 3`` uint8 image (or :class:`Failure`) per input, in order.
        """
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 4):
            raise UsageError(f"size must be a whole number of pixels of at least 4, got {size!r}")
        items = split_items(images)
        if not items:
            raise InputError("no images given")
        return guarded([[item] for item in items], lambda part: [self._one(part[0], size)], errors)

    predict = stylize

    def _one(self, item: Any, size: int | None) -> np.ndarray:
        name = f"'{item}'" if isinstance(item, (str, Path)) else "image"
        picture = to_pil(item, name)
        if size:
            scale = size / max(picture.size)
            picture = picture.convert("RGB").resize(
                (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.Resampling.BICUBIC)
        batch = preprocess([picture], self.info.preprocessing, [name])
        out = self.run(batch)[0]
        return (np.clip(out.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
