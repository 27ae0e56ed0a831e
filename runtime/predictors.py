"""Task predictors over an :class:`~dlpipe.runtime.engine.Engine`, chosen by :func:`load` from the
model's metadata through one task table (``PREDICTORS``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from dlpipe.runtime.autoencoder import Autoencoder
from dlpipe.runtime.captioner import Captioner, is_package, read_manifest
from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import InputError, ModelFileError, UsageError
from dlpipe.runtime.features import FeatureExtractor
from dlpipe.runtime.generator import Generator
from dlpipe.runtime.images import Failure, ImageLike, guarded, pad_to_multiple, preprocess, split_items, to_pil
from dlpipe.runtime.metadata import ModelInfo
from dlpipe.runtime.policy import Policy
from dlpipe.runtime.stylizer import Stylizer


@dataclass(frozen=True)
class Classification:
    """One image's result: best label, its class index and probability, and the top-k list."""

    label: str
    index: int
    score: float
    top_k: tuple[tuple[str, float], ...]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable probabilities."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """Shared part of the task predictors: an engine and its metadata."""

    task = ""

    def __init__(self, engine: Engine):
        if engine.info is None:
            raise ModelFileError(f"'{engine.path}' has no dlpipe metadata; use dlpipe.runtime.Engine to run it raw")
        self.engine = engine
        self.info: ModelInfo = engine.info

    @property
    def path(self) -> Path:
        return self.engine.path

    @staticmethod
    def _chunks(images: ImageLike | Iterable[ImageLike], batch_size: int) -> list[list[ImageLike]]:
        """The images as a list of single images, cut into runs of ``batch_size``."""
        items = split_items(images)
        if not items:
            raise InputError("no images given")
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        return [items[start:start + batch_size] for start in range(0, len(items), batch_size)]


class Classifier(Predictor):
    """Image classifier: images in, :class:`Classification` results out."""

    task = "classification"

    def __init__(self, engine: Engine):
        super().__init__(engine)
        classes = engine.outputs[0].shape[-1] if engine.outputs and engine.outputs[0].shape else None
        if self.info.labels and isinstance(classes, int) and classes != len(self.info.labels):
            raise ModelFileError(f"'{engine.path}' names {len(self.info.labels)} labels in its metadata but its output "
                                 f"has {classes} classes; every prediction would be named wrongly")

    def logits(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 64) -> np.ndarray:
        """Raw model outputs (N x classes) for the images, run ``batch_size`` at a time."""
        return np.concatenate([self._logits(part) for part in self._chunks(images, batch_size)])

    def _logits(self, part: list[ImageLike]) -> np.ndarray:
        batch = preprocess(part, self.info.preprocessing)
        return self.engine.run({self.engine.input_names[0]: batch})[0]

    def predict(self, images: ImageLike | Iterable[ImageLike], top_k: int = 5, batch_size: int = 64,
                errors: str = "raise") -> list[Classification | Failure]:
        """Classify images (paths, PIL images, HxW[xC] arrays, or an NxHxW[xC] batch).

        Args:
            top_k: How many of the best labels each result lists (at least 1; at most the class count).
            errors: ``"raise"`` stops at the first unusable image; ``"skip"`` puts a
                :class:`~dlpipe.runtime.images.Failure` in its place and goes on.

        Returns:
            One :class:`Classification` (or :class:`Failure`) per image, in order.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise UsageError(f"top_k must be at least 1, got {top_k!r}")
        return guarded(self._chunks(images, batch_size), lambda part: self._classify(part, int(top_k)), errors)

    def _classify(self, part: list[ImageLike], top_k: int) -> list[Classification]:
        probs = softmax(self._logits(part))
        labels = self.info.labels or tuple(str(i) for i in range(probs.shape[1]))
        order = np.argsort(-probs, axis=1)[:, :min(top_k, probs.shape[1])]
        return [Classification(label=labels[row[0]], index=int(row[0]), score=float(p[row[0]]),
                               top_k=tuple((labels[j], float(p[j])) for j in row)) for p, row in zip(probs, order)]


# Class colours for masks and overlays: background black, then well-separated hues.
PALETTE = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0)], dtype=np.uint8)


@dataclass(frozen=True)
class Segmentation:
    """One image's result: the class id of every pixel (at the image's own size) and each class's share."""

    mask: np.ndarray
    shares: dict[str, float]

    def colorized(self) -> np.ndarray:
        """The mask as an ``HxWx3`` uint8 colour image."""
        return PALETTE[self.mask % len(PALETTE)]

    def overlay(self, image: ImageLike, alpha: float = 0.5) -> np.ndarray:
        """``image`` with the coloured mask blended over its non-background pixels."""
        rgb = np.asarray(to_pil(image, "image").convert("RGB"), dtype=np.float32)
        if rgb.shape[:2] != self.mask.shape:
            raise InputError(f"image size {rgb.shape[:2]} differs from the mask's {self.mask.shape}")
        colour = self.colorized().astype(np.float32)
        blend = np.where((self.mask > 0)[..., None], (1 - alpha) * rgb + alpha * colour, rgb)
        return blend.round().astype(np.uint8)


class Segmenter(Predictor):
    """Semantic segmentation: images of any size in, a class mask of the same size out."""

    task = "segmentation"

    def masks(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Class masks for a uint8 ``NxHxW[xC]`` batch of same-size images."""
        return np.concatenate([self._masks(part) for part in self._chunks(images, batch_size)])

    def _masks(self, items: list[ImageLike]) -> np.ndarray:
        batch = preprocess(items, self.info.preprocessing)
        h, w = batch.shape[-2:]
        padded = pad_to_multiple(batch, self.info.preprocessing.size_multiple)
        logits = self.engine.run({self.engine.input_names[0]: padded})[0]
        return logits[:, :, :h, :w].argmax(1).astype(np.uint8)

    def predict(self, images: ImageLike | Iterable[ImageLike], errors: str = "raise") -> list[Segmentation | Failure]:
        """Segment images (paths, PIL images or arrays, each at its own size).

        Args:
            errors: ``"raise"`` stops at the first unusable image; ``"skip"`` puts a
                :class:`~dlpipe.runtime.images.Failure` in its place and goes on.

        Returns:
            One :class:`Segmentation` (or :class:`Failure`) per image, in order.
        """
        # one at a time: each image keeps its own size
        return guarded(self._chunks(images, 1), self._segment, errors)

    def _segment(self, part: list[ImageLike]) -> list[Segmentation]:
        labels = self.info.labels
        mask = self._masks(part)[0]
        counts = np.bincount(mask.ravel(), minlength=len(labels))
        shares = {labels[k] if k < len(labels) else str(k): float(c / mask.size) for k, c in enumerate(counts)}
        return [Segmentation(mask=mask, shares=shares)]


@dataclass(frozen=True)
class Detection:
    """One detected object: class name and id, confidence, and box ``(x0, y0, x1, y1)`` in the image's pixels."""

    label: str
    index: int
    score: float
    box: tuple[float, float, float, float]

    def as_dict(self) -> dict:
        return {"label": self.label, "index": self.index, "score": round(self.score, 4),
                "box": [round(v, 2) for v in self.box]}


def draw_detections(image: ImageLike, detections: list[Detection], width: int | None = None):
    """``image`` as an RGB PIL image with each detection's box, label and score drawn on it."""
    from PIL import ImageDraw

    canvas = to_pil(image, "image").convert("RGB")
    draw = ImageDraw.Draw(canvas)
    line = width or max(1, round(min(canvas.size) / 160))
    for d in detections:
        colour = tuple(int(c) for c in PALETTE[1 + d.index % (len(PALETTE) - 1)])
        draw.rectangle(d.box, outline=colour, width=line)
        text = f"{d.label} {d.score:.2f}"
        left, top = d.box[0], max(0.0, d.box[1] - 11)
        tw = draw.textlength(text)
        draw.rectangle((left, top, left + tw + 2, top + 11), fill=colour)
        draw.text((left + 1, top), text, fill=(0, 0, 0) if sum(colour) > 400 else (255, 255, 255))
    return canvas


class Detector(Predictor):
    """Object detection: images of any size in, a list of :class:`Detection` per image out.

    The exported detector takes one ``CxHxW`` image in [0, 1] and does its own resizing, normalisation,
    region proposals, box decoding and non-maximum suppression; boxes come back in the image's pixels.
    """

    task = "detection"

    def raw(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(boxes Kx4, labels K, scores K)`` for one image, everything the model returned."""
        chw = preprocess([image], self.info.preprocessing)[0]
        boxes, labels, scores = self.engine.run({self.engine.input_names[0]: chw})[:3]
        return boxes, labels, scores

    def predict(self, images: ImageLike | Iterable[ImageLike], threshold: float = 0.5,
                errors: str = "raise") -> list[list[Detection] | Failure]:
        """Detect objects in images (paths, PIL images or arrays, each at its own size).

        Args:
            threshold: Smallest score kept.
            errors: ``"raise"`` stops at the first unusable image; ``"skip"`` puts a
                :class:`~dlpipe.runtime.images.Failure` in its place and goes on.

        Returns:
            One list of :class:`Detection` (best score first), or a :class:`Failure`, per image.
        """
        if not 0 <= threshold <= 1:
            raise UsageError(f"threshold must be between 0 and 1, got {threshold}")
        # the graph takes one image at a time, at its own size
        return guarded(self._chunks(images, 1), lambda part: [self._detect(part[0], threshold)], errors)

    def _detect(self, image: ImageLike, threshold: float) -> list[Detection]:
        names = self.info.labels
        boxes, labels, scores = self.raw(image)
        keep = np.argsort(-scores)
        return [Detection(label=names[k] if k < len(names) else str(k), index=int(k), score=float(s),
                          box=tuple(float(v) for v in b))
                for b, k, s in zip(boxes[keep], labels[keep], scores[keep]) if s >= threshold]


PREDICTORS: dict[str, type[Predictor]] = {"classification": Classifier, "segmentation": Segmenter,
                                          "detection": Detector, "control": Policy, "features": FeatureExtractor,
                                          "generation": Generator, "stylization": Stylizer}


# Tasks served from a package folder of several graphs with a manifest, by the manifest's task.
PACKAGES: dict[str, type] = {"captioning": Captioner, "reconstruction": Autoencoder}


def load(path: str | Path, device: str = "auto", threads: int | None = None) -> Predictor:
    """Open a dlpipe ONNX model and return the predictor for its task.

    Raises:
        ModelFileError: missing/corrupt file, no dlpipe metadata, or a task this version cannot serve.
        DeviceUnavailableError: ``device='cuda'`` that cannot run here.
    """
    if is_package(path):  # a model package of several graphs: a folder or its manifest (issue 4)
        manifest, doc = read_manifest(path)
        package = PACKAGES.get(doc["task"]) if isinstance(doc["task"], str) else None
        if package is None:
            raise ModelFileError(f"'{manifest}' is a {doc['task']!r} package; this dlpipe serves packages of "
                                 f"{', '.join(PACKAGES)}")
        return package(path, device=device, threads=threads)
    engine = Engine(path, device=device, threads=threads)
    if engine.info is None:
        raise ModelFileError(f"'{path}' has no dlpipe metadata (not written by 'dlpipe export'); "
                             "run it raw with dlpipe.runtime.Engine")
    cls = PREDICTORS.get(engine.info.task)
    if cls is None:
        served = ", ".join([*PREDICTORS, *(f"{task} (packages)" for task in PACKAGES)])
        raise ModelFileError(f"'{path}' is a {engine.info.task!r} model; this dlpipe serves {served}")
    return cls(engine)
