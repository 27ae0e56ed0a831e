"""Autoencoders in the runtime (issue 15): a model package of two ONNX graphs, the *encoder* (image ->
``code``, and for a VAE also ``logvar``) and the *decoder* (``code`` -> ``image`` in [0, 1]), listed in a
manifest like the captioner's. :class:`Autoencoder` encodes images to features (the latent mean for a
VAE), reconstructs (or denoises) them, and for a VAE draws new images from the N(0, I) prior and walks
between two drawn latents. onnxruntime, numpy and pillow only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from dlpipe.runtime.captioner import read_manifest
from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import InputError, ModelFileError, UsageError
from dlpipe.runtime.images import Failure, ImageLike, guarded, preprocess, split_items
from dlpipe.runtime.metadata import ModelInfo

MAX_GENERATE = 4096  # images per generate/interpolate call: a typo of 10**9 must not allocate the machine away


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Decoder outputs (N x C x H x W in [0, 1]) -> uint8 images N x H x W x C."""
    return (np.clip(images, 0.0, 1.0) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


class Autoencoder:
    """Encode, reconstruct and (VAE) generate with an autoencoder package.

    Args:
        path: The package folder (its fp32 ``manifest.json``) or one variant's manifest file.
        device, threads: As for :class:`~dlpipe.runtime.engine.Engine`.
    """

    task = "reconstruction"

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None):
        self.manifest_path, self.manifest = read_manifest(path)
        doc = self.manifest
        if doc["task"] != self.task:
            raise ModelFileError(f"'{self.manifest_path}' is a {doc['task']!r} package, not an autoencoder")
        graphs = doc["graphs"]
        if (not isinstance(graphs, dict) or not {"encoder", "decoder"} <= set(graphs)
                or not all(isinstance(graphs[g], str) for g in ("encoder", "decoder"))):
            raise ModelFileError(f"'{self.manifest_path}': 'graphs' must name an 'encoder' and a 'decoder' file")
        folder = self.manifest_path.parent
        self.encoder = Engine(folder / graphs["encoder"], device=device, threads=threads)
        self.decoder = Engine(folder / graphs["decoder"], device=device, threads=threads)
        self.engine = self.encoder  # what the other predictors call their engine (providers, path)
        self.info = ModelInfo.from_json(json.dumps(doc), f"'{self.manifest_path}'")
        self.variational = "logvar" in [o.name for o in self.encoder.outputs]
        shape = self.decoder.inputs[0].shape if self.decoder.inputs else None
        self.latent = shape[-1] if shape else None
        if not isinstance(self.latent, int) or self.decoder.input_names != ["code"]:
            raise ModelFileError(f"'{self.manifest_path}': the decoder graph '{graphs['decoder']}' does not take a "
                                 "'code' of fixed size")
        pre = self.info.preprocessing
        shape = (1, pre.channels, 1, 1)
        self._mean = np.broadcast_to(np.asarray(pre.mean, np.float32).reshape(-1, 1, 1), shape[1:]).reshape(shape)
        self._std = np.broadcast_to(np.asarray(pre.std, np.float32).reshape(-1, 1, 1), shape[1:]).reshape(shape)

    @property
    def path(self) -> Path:
        return self.manifest_path

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision", "fp32"))

    # ------------------------------------------------------------------------------ preprocessed arrays

    def pixels(self, batch: np.ndarray) -> np.ndarray:
        """A preprocessed (normalised) NCHW batch back in [0, 1]: what a reconstruction is compared with."""
        return (batch * self._std + self._mean).astype(np.float32)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Images in [0, 1] (NCHW) -> the encoder's normalised input."""
        return ((pixels - self._mean) / self._std).astype(np.float32)

    def codes(self, batch: np.ndarray) -> list[np.ndarray]:
        """The encoder's outputs for a preprocessed NCHW batch: ``[code]`` or, for a VAE, ``[mean, logvar]``."""
        return self.encoder.run({self.encoder.input_names[0]: batch})

    def decode(self, code: np.ndarray) -> np.ndarray:
        """Codes (N x latent) -> images in [0, 1], N x C x H x W float32."""
        return self.decoder.run({"code": np.ascontiguousarray(code, dtype=np.float32)})[0]

    def reconstruct_batch(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed NCHW batch -> reconstructions in [0, 1] (NCHW; a VAE decodes its latent mean)."""
        return self.decode(self.codes(batch)[0])

    # ----------------------------------------------------------------------------------------- images

    def _batches(self, images: ImageLike | Iterable[ImageLike], batch_size: int) -> list[list[ImageLike]]:
        items = split_items(images)
        if not items:
            raise InputError("no images given")
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

    def encode(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 64) -> np.ndarray:
        """Features of images (paths, PIL images, arrays): the code, or a VAE's latent mean (N x latent float32)."""
        pre = self.info.preprocessing
        return np.concatenate([self.codes(preprocess(part, pre))[0] for part in self._batches(images, batch_size)])

    def reconstruct(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 64) -> np.ndarray:
        """Reconstructions (denoised images for a denoising model) at the model's size: uint8 N x H x W x C."""
        return np.concatenate([to_uint8(self.reconstruct_batch(preprocess(part, self.info.preprocessing)))
                               for part in self._batches(images, batch_size)])

    def predict(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 64,
                errors: str = "raise") -> list[np.ndarray | Failure]:
        """:meth:`reconstruct`, one uint8 H x W x C image per input; ``errors="skip"`` puts a
        :class:`~dlpipe.runtime.images.Failure` in place of an unusable image and goes on."""
        return guarded(self._batches(images, batch_size), lambda part: list(self.reconstruct(part)), errors)

    # -------------------------------------------------------------------------------------- generation

    def _prior(self, count: int, seed: int, label: int | None) -> np.ndarray:
        if not self.variational:
            raise UsageError(f"'{self.manifest_path}' is a {self.info.model} autoencoder, not a VAE: it has no prior "
                             "to sample from")
        if label is not None:
            raise UsageError(f"'{self.manifest_path}' is not class-conditional; drop the label")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 1 <= count <= MAX_GENERATE:
            raise UsageError(f"count must be 1 to {MAX_GENERATE}, got {count!r}")
        return np.random.default_rng(seed).standard_normal((int(count), self.latent)).astype(np.float32)

    def generate(self, count: int, seed: int = 0, label: int | None = None) -> np.ndarray:
        """``count`` new images decoded from latents drawn from N(0, I) with ``seed``: uint8 N x H x W x C.

        Raises:
            UsageError: not a VAE, a label for an unconditional model, or a count out of range.
        """
        return to_uint8(self.decode(self._prior(count, seed, label)))

    def interpolate(self, seed_a: int, seed_b: int, steps: int, label: int | None = None) -> np.ndarray:
        """``steps`` images decoded along the straight line between the latents seeds ``seed_a`` and ``seed_b``
        draw (as :meth:`generate` draws its first image): uint8 steps x H x W x C, both ends included."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 2 <= steps <= MAX_GENERATE:
            raise UsageError(f"steps must be 2 to {MAX_GENERATE}, got {steps!r}")
        a, b = self._prior(1, seed_a, label), self._prior(1, seed_b, label)
        t = np.linspace(0.0, 1.0, int(steps), dtype=np.float32)[:, None]
        return to_uint8(self.decode((1 - t) * a + t * b))

    def __repr__(self) -> str:
        return f"Autoencoder('{self.manifest_path}', precision={self.precision}, providers={self.encoder.providers})"
