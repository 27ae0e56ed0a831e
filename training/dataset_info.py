"""What a dataset is to the stages: its channels, size, normalisation, labels, task and loader
(:data:`dlpipe.training.data.DATASETS` declares the built-in ones, :mod:`dlpipe.training.user_data`
the user's own)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: what its images look like and how to load a split.

    Attributes:
        name: ``--dataset`` value.
        channels: 1 (grayscale) or 3 (RGB).
        image_size: ``(height, width)``.
        mean: Per-channel mean of pixel values scaled to [0, 1].
        std: Per-channel standard deviation, same scale.
        labels: Class names, index = class id.
        loader: ``loader(split, root, download, limit)`` -> ``(uint8 images NxHxW[xC], labels)``: int64
            class ids for classification, ``NxHxW`` uint8 class masks for segmentation, and for detection
            one ``{"boxes": Kx4 float32 x0,y0,x1,y1, "labels": K int64 (0 is the background)}`` dict per image.
        task: ``classification``, ``segmentation`` or ``detection``.
    """

    name: str
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    loader: Callable[[str, Path, bool, int | None], tuple[np.ndarray, np.ndarray]]
    task: str = "classification"

    def preprocessing(self) -> dict:
        """The preprocessing contract written into checkpoints and ONNX metadata (segmentation and
        detection keep the image's own size; a detector takes one CHW image in [0, 1] and normalises
        inside, with ``mean``/``std`` given to the model)."""
        resize, layout, normalised = _INPUT_CONTRACTS[self.task]
        channels = self.channels
        return {"color": "L" if channels == 1 else "RGB", "size": list(self.image_size), "resize": resize,
                "scale": 1 / 255, "mean": list(self.mean) if normalised else [0.0] * channels,
                "std": list(self.std) if normalised else [1.0] * channels, "layout": layout}


# How each kind of dataset's images reach the model: resize policy, layout, normalised outside the model.
_INPUT_CONTRACTS = {"classification": ("bilinear", "NCHW", True), "segmentation": ("none", "NCHW", True),
                    "detection": ("none", "CHW", False)}
