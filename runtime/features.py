"""The torch-free feature extractor (issue 15): images in, feature vectors out.

Loaded by :func:`dlpipe.runtime.load` for models whose task is ``features`` (an RBM stack's hidden
probabilities). The graph also returns its mean-field reconstruction of the input, in pixel intensities
[0, 1], which scores how much of the image the features keep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.runtime.images import ImageLike, preprocess, split_items
from dlpipe.runtime.metadata import ModelInfo


class FeatureExtractor:
    """A feature graph as an encoder.

    Args:
        engine: An :class:`Engine` over a dlpipe ``features`` model.

    Raises:
        ModelFileError: no dlpipe metadata, or a graph without a ``features`` output.
    """

    task = "features"

    def __init__(self, engine: Engine):
        if engine.info is None:
            raise ModelFileError(f"'{engine.path}' has no dlpipe metadata; use dlpipe.runtime.Engine to run it raw")
        self.engine = engine
        self.info: ModelInfo = engine.info
        names = list(self.info.output_names)
        if "features" not in names:
            raise ModelFileError(f"'{engine.path}' has no 'features' output (outputs: {', '.join(names)})")
        self.feature_output = names.index("features")  # which of the graph's outputs the features are
        self._reconstruction = names.index("reconstruction") if "reconstruction" in names else None

    @property
    def path(self) -> Path:
        return self.engine.path

    def _batches(self, images: ImageLike | Iterable[ImageLike], batch_size: int):
        items = split_items(images)
        if not items:
            raise InputError("no images given")
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, len(items), batch_size):
            batch = preprocess(items[start:start + batch_size], self.info.preprocessing)
            yield batch, self.engine.run({self.engine.input_names[0]: batch})

    def encode(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 256) -> np.ndarray:
        """Feature vectors (N x features, float32) of images (paths, PIL images, HxW[xC] arrays or a batch)."""
        return np.concatenate([outs[self.feature_output] for _, outs in self._batches(images, batch_size)])

    def reconstruct(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 256
                    ) -> tuple[np.ndarray, np.ndarray]:
        """``(pixels, reconstruction)``: the images as the model saw them and as it reconstructs them, both
        float32 ``NxCxHxW`` intensities in [0, 1].

        Raises:
            ModelFileError: the graph has no ``reconstruction`` output.
        """
        if self._reconstruction is None:
            raise ModelFileError(f"'{self.path}' has no 'reconstruction' output")
        pre = self.info.preprocessing
        mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(pre.std, dtype=np.float32).reshape(1, -1, 1, 1)
        pixels, recon = [], []
        for batch, outs in self._batches(images, batch_size):
            pixels.append(batch * std + mean)  # undo the normalisation: the intensities the model reconstructs
            recon.append(outs[self._reconstruction])
        return np.concatenate(pixels), np.concatenate(recon)
