"""The torch-free image generator (issue 16): a latent (and a class) in, an image out.

Loaded by :func:`dlpipe.runtime.load` for models whose task is ``generation`` (an exported DCGAN generator).
Latents are drawn with numpy from a seed, so the same seed gives the same images on every machine and
every precision of the model. The interface, ``generate`` and ``interpolate``, is the one every dlpipe
model that generates images offers (``dlpipe generate`` calls it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import InputError, ModelFileError, UsageError
from dlpipe.runtime.metadata import ModelInfo


def image_grid(images: np.ndarray, columns: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 images ``N x H x W x C`` as one ``rows x columns`` grid image (``pad`` black pixels between)."""
    if images.ndim != 4 or len(images) == 0:
        raise InputError(f"a grid needs N x H x W x C images, got shape {list(images.shape)}")
    n, h, w, c = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
    return grid


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{what} must be a whole number of at least 1, got {value!r}")
    return int(value)


def slerp(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` points from ``a`` to ``b`` along the great circle (White, 2016): Gaussian latents keep their
    norm, where a straight line passes through improbable short vectors."""
    t = np.linspace(0.0, 1.0, steps)[:, None]
    cos = np.clip(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)), -1.0, 1.0)
    omega = np.arccos(cos)
    if omega < 1e-6:
        return ((1 - t) * a + t * b).astype(np.float32)
    return ((np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)).astype(np.float32)


class Generator:
    """An exported generator (DCGAN): ``generate`` samples, ``interpolate`` walks between two.

    Args:
        engine: An :class:`Engine` over a dlpipe ``generation`` model.

    Raises:
        ModelFileError: no dlpipe metadata, or no generator description in it.
    """

    task = "generation"

    def __init__(self, engine: Engine):
        if engine.info is None:
            raise ModelFileError(f"'{engine.path}' has no dlpipe metadata; use dlpipe.runtime.Engine to run it raw")
        self.engine = engine
        self.info: ModelInfo = engine.info
        doc = self.info.raw.get("generator") or {}
        try:
            self.latent_size = int(doc["latent_size"])
            self.conditional = bool(doc["conditional"])
            if self.latent_size < 1:
                raise ValueError("no latent")
        except (KeyError, TypeError, ValueError, OverflowError):
            raise ModelFileError(f"'{engine.path}' does not describe its generator (latent size, conditional); "
                                 "export it from a GAN checkpoint") from None
        self.labels: tuple[str, ...] = self.info.labels if self.conditional else ()
        if self.conditional and not self.labels:
            raise ModelFileError(f"'{engine.path}' is a conditional generator without class labels in its metadata")
        shape = engine.inputs[0].shape if engine.inputs else None
        width = shape[1] if shape is not None and len(shape) == 2 else None
        if not isinstance(width, int) or width != self.latent_size + len(self.labels):
            raise ModelFileError(f"'{engine.path}' takes inputs of shape {shape}, but its metadata describes latents of "
                                 f"{self.latent_size} + {len(self.labels)} class values")

    @property
    def path(self) -> Path:
        return self.engine.path

    def _onehot(self, label: Any, count: int) -> np.ndarray:
        """The one-hot rows appended to the latents (none for an unconditional model)."""
        if label is None:
            if self.conditional:
                raise UsageError(f"'{self.path}' is class-conditional: name a class (one of {', '.join(self.labels)})")
            return np.zeros((count, 0), dtype=np.float32)
        if not self.conditional:
            raise UsageError(f"'{self.path}' is not class-conditional; it generates without a class "
                             f"(got class {label!r})")
        if str(label) not in self.labels:
            raise UsageError(f"unknown class {str(label)!r}; this model knows {', '.join(self.labels)}")
        onehot = np.zeros((count, len(self.labels)), dtype=np.float32)
        onehot[:, self.labels.index(str(label))] = 1
        return onehot

    def latents(self, count: int, seed: int = 0, label: Any = None) -> np.ndarray:
        """The generator inputs ``generate(count, seed, label)`` uses: standard normal noise from ``seed``, with
        the class's one-hot vector appended for conditional models."""
        count = _count(count, "the number of images")
        z = np.random.default_rng(int(seed)).standard_normal((count, self.latent_size), dtype=np.float32)
        return np.concatenate([z, self._onehot(label, count)], 1)

    def render(self, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Images in [0, 1] (``N x C x H x W`` float32) for generator inputs (as :meth:`latents` makes them)."""
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        name = self.engine.input_names[0]
        parts = [self.engine.run({name: inputs[i:i + batch_size]})[0] for i in range(0, len(inputs), batch_size)]
        return np.clip(np.concatenate(parts).astype(np.float32), 0.0, 1.0)

    @staticmethod
    def to_uint8(images: np.ndarray) -> np.ndarray:
        """``N x C x H x W`` images in [0, 1] -> uint8 ``N x H x W x C``."""
        return (images.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)

    def generate(self, count: int, seed: int = 0, label: Any = None) -> np.ndarray:
        """``count`` images (uint8 ``N x H x W x C``) from the latents of ``seed`` (of class ``label`` for a
        conditional model).

        Raises:
            UsageError: a count below 1, an unknown class, a class for an unconditional model or none for a
                conditional one.
        """
        return self.to_uint8(self.render(self.latents(count, seed, label)))

    def interpolate(self, seed_a: int, seed_b: int, steps: int, label: Any = None) -> np.ndarray:
        """``steps`` images (uint8 ``N x H x W x C``) along the latent path from the first latent of ``seed_a``
        to that of ``seed_b`` (spherical interpolation), the class held fixed."""
        steps = _count(steps, "the number of steps")
        if steps < 2:
            raise UsageError(f"an interpolation needs at least 2 steps, got {steps}")
        a, b = self.latents(1, seed_a, label), self.latents(1, seed_b, label)
        path = slerp(a[0, :self.latent_size], b[0, :self.latent_size], steps)
        return self.to_uint8(self.render(np.concatenate([path, self._onehot(label, steps)], 1)))

    def __repr__(self) -> str:
        return (f"Generator('{self.path}', latent_size={self.latent_size}, "
                f"conditional={self.conditional}, labels={list(self.labels)})")
