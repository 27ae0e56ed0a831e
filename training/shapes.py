"""The synthetic "shapes world": deterministic scenes of coloured shapes, made on the fly.

It is dlpipe's embedded default data (no files, no network). A :class:`Scene` is a plain
description (background, and for each shape its kind, colour, centre, size and rotation) made from
``(seed, index)`` alone, so any sample can be regenerated; :meth:`ShapesWorld.render` turns it into
an RGB image and a per-pixel class mask, and every shape knows its bounding box. Classification
uses one shape per scene labelled by its kind; segmentation, detection and captioning use the same
scenes with several shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220), "yellow": (235, 205, 40),
    "purple": (145, 60, 185), "orange": (240, 130, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One shape: kind, colour name, centre (x, y) and radius in pixels, rotation in degrees."""

    kind: str
    colour: str
    center: tuple[float, float]
    radius: float
    rotation: float

    @property
    def label(self) -> int:
        """Class index of the kind (0-based)."""
        return KINDS.index(self.kind)

    def polygon(self, scale: float = 1.0) -> list[tuple[float, float]]:
        """Outline vertices in image coordinates (a 48-gon for circles)."""
        cx, cy, r = self.center[0] * scale, self.center[1] * scale, self.radius * scale
        if self.kind == "circle":
            pts = [(math.cos(2 * math.pi * i / 48), math.sin(2 * math.pi * i / 48)) for i in range(48)]
        elif self.kind == "square":
            pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
        elif self.kind == "triangle":
            pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        elif self.kind == "diamond":
            pts = [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]
        elif self.kind == "star":
            pts = [((1.0 if i % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + i * math.pi / 5),
                    (1.0 if i % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
        elif self.kind == "cross":
            a, b = 0.3, 0.9
            pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                   (-a, -a)]
        else:
            raise ValueError(f"unknown shape kind {self.kind!r}")
        t = math.radians(self.rotation)
        c, s = math.cos(t), math.sin(t)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]

    def box(self) -> tuple[float, float, float, float]:
        """Tight bounding box ``(x0, y0, x1, y1)`` of the outline."""
        pts = self.polygon()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True)
class Scene:
    """A whole image: size, background style and colours, shapes back to front, noise level."""

    size: tuple[int, int]
    background: str
    background_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    shapes: tuple[Shape, ...]
    noise: float
    noise_seed: int


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


class ShapesWorld:
    """Deterministic generator of shape scenes.

    Args:
        seed: Base seed; ``scene(i)`` depends only on ``(seed, i)``.
        image_size: Output size ``(height, width)`` or one int.
        shapes_per_scene: Inclusive range of the number of shapes.
        radius: Inclusive range of shape radii as fractions of the shorter side.
        kinds: The shape kinds to draw from.
    """

    def __init__(self, seed: int = 0, image_size: int | tuple[int, int] = 32, shapes_per_scene: tuple[int, int] = (1, 1),
                 radius: tuple[float, float] = (0.22, 0.42), kinds: tuple[str, ...] = KINDS):
        self.seed = seed
        self.size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.shapes_per_scene = shapes_per_scene
        self.radius = radius
        self.kinds = kinds

    def scene(self, index: int) -> Scene:
        """The scene number ``index`` (the same every time)."""
        rng = np.random.default_rng([self.seed, index])
        h, w = self.size
        shape_colour_names = list(COLOURS)
        n = int(rng.integers(self.shapes_per_scene[0], self.shapes_per_scene[1] + 1))
        shapes = []
        for _ in range(n):
            r = float(rng.uniform(*self.radius)) * min(h, w)
            cx = float(rng.uniform(r * 0.8, w - r * 0.8))
            cy = float(rng.uniform(r * 0.8, h - r * 0.8))
            shapes.append(Shape(kind=self.kinds[int(rng.integers(len(self.kinds)))],
                                colour=shape_colour_names[int(rng.integers(len(shape_colour_names)))],
                                center=(cx, cy), radius=r, rotation=float(rng.uniform(-25, 25))))
        # Background colours keep a luminance gap to the shapes so they stay visible: the two best
        # of 16 random candidates (with many shapes of many colours no colour clears them all).
        lumas = [_luma(COLOURS[s.colour]) for s in shapes]
        candidates = [tuple(int(v) for v in rng.integers(0, 256, size=3)) for _ in range(16)]
        candidates.sort(key=lambda rgb: -min(abs(_luma(rgb) - lu) for lu in lumas))
        bg = candidates[:2]
        style = ("solid", "gradient", "stripes")[int(rng.integers(3))]
        return Scene(size=(h, w), background=style, background_colours=(bg[0], bg[1]), shapes=tuple(shapes),
                     noise=float(rng.uniform(0, 12)), noise_seed=int(rng.integers(2**31)))

    def render(self, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``scene``.

        Returns:
            ``(image, mask)``: an ``HxWx3`` uint8 RGB image and an ``HxW`` uint8 mask holding
            ``1 + kind index`` where a shape is visible (later shapes cover earlier ones) and 0 elsewhere.
        """
        h, w = scene.size
        s = _SUPERSAMPLE
        c0, c1 = (np.array(c, dtype=np.float32) for c in scene.background_colours)
        if scene.background == "solid":
            bg = np.broadcast_to(c0, (h * s, w * s, 3))
        elif scene.background == "gradient":
            t = np.linspace(0, 1, w * s, dtype=np.float32)[None, :, None]
            bg = np.broadcast_to(c0 * (1 - t) + c1 * t, (h * s, w * s, 3))
        else:
            stripes = ((np.arange(h * s)[:, None] + np.arange(w * s)[None, :]) // (3 * s)) % 2
            bg = np.where(stripes[..., None] == 0, c0, c0 * 0.75 + c1 * 0.25)
        canvas = Image.fromarray(np.ascontiguousarray(bg).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(canvas)
        for shape in scene.shapes:
            draw.polygon(shape.polygon(scale=s), fill=COLOURS[shape.colour])
        image = np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.float32)
        if scene.noise > 0:
            image = image + np.random.default_rng(scene.noise_seed).normal(0, scene.noise, image.shape)
        mask = _supersampled_mask(scene, [shape.label + 1 for shape in scene.shapes])
        return np.clip(image, 0, 255).round().astype(np.uint8), mask

    def instance_mask(self, scene: Scene) -> np.ndarray:
        """``HxW`` uint8 mask holding ``i + 1`` where shape ``i`` of the scene is visible, 0 elsewhere."""
        return _supersampled_mask(scene, list(range(1, len(scene.shapes) + 1)))

    def detection_set(self, count: int, start: int = 0, min_pixels: int = 12) -> tuple[np.ndarray, list[dict]]:
        """``count`` scenes with the boxes and labels of their visible shapes, scenes ``start .. start+count-1``.

        Returns:
            ``(images, targets)``: ``N x H x W x 3`` uint8 and one ``{"boxes", "labels"}`` dict per image
            (see :func:`boxes_from_instances`; labels are ``1 + kind index``, 0 being the background).
        """
        images = np.empty((count, *self.size, 3), dtype=np.uint8)
        targets = []
        for i in range(count):
            scene = self.scene(start + i)
            images[i] = self.render(scene)[0]
            classes = np.array([s.label + 1 for s in scene.shapes], dtype=np.int64)
            targets.append(boxes_from_instances(self.instance_mask(scene), classes, min_pixels))
        return images, targets

    def classification_set(self, count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``count`` one-shape images with their kind labels, scenes ``start .. start+count-1``.

        Returns:
            ``(images, labels)``: ``Nx H x W x 3`` uint8 and ``N`` int64 (index into :data:`KINDS`).
        """
        images = np.empty((count, *self.size, 3), dtype=np.uint8)
        labels = np.empty(count, dtype=np.int64)
        for i in range(count):
            scene = self.scene(start + i)
            images[i] = self.render(scene)[0]
            labels[i] = scene.shapes[-1].label
        return images, labels

    def segmentation_set(self, count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``count`` scenes with their class masks, scenes ``start .. start+count-1``.

        Returns:
            ``(images, masks)``: ``N x H x W x 3`` uint8 and ``N x H x W`` uint8 (0 background, 1 + kind).
        """
        images = np.empty((count, *self.size, 3), dtype=np.uint8)
        masks = np.empty((count, *self.size), dtype=np.uint8)
        for i in range(count):
            images[i], masks[i] = self.render(self.scene(start + i))
        return images, masks


def _supersampled_mask(scene: Scene, values: list[int]) -> np.ndarray:
    """``HxW`` uint8 mask of ``scene``'s shapes (``values[i]`` for shape ``i``, 0 for the background), drawn
    at the image's supersampling and giving each pixel the value that covers most of it: the mask of what the
    image shows. (Polygons rasterised at 1x also take every pixel the outline touches, about half a pixel
    wider than the antialiased shapes in the image.)"""
    h, w = scene.size
    s = _SUPERSAMPLE
    big = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(big)
    for shape, value in zip(scene.shapes, values):
        draw.polygon(shape.polygon(scale=s), fill=value)
    k = max(values, default=0) + 1
    pixel = (np.arange(h * s)[:, None] // s) * w + np.arange(w * s)[None, :] // s  # output pixel of each sample
    counts = np.bincount((pixel * k + np.asarray(big)).ravel(), minlength=h * w * k).reshape(h, w, k)
    return counts.argmax(axis=-1).astype(np.uint8)  # ties: the lower value (background first)


def boxes_from_instances(instances: np.ndarray, classes: np.ndarray, min_pixels: int = 12) -> dict[str, np.ndarray]:
    """Boxes of the visible part of each instance (COCO's convention), from an instance mask.

    Args:
        instances: ``HxW`` mask holding ``i + 1`` on the pixels of instance ``i``.
        classes: Class id of each instance.
        min_pixels: Instances hidden behind others down to fewer visible pixels are left out.

    Returns:
        ``{"boxes": K x 4 float32 (x0, y0, x1, y1), pixel edges, "labels": K int64}``.
    """
    boxes, labels = [], []
    for i, cls in enumerate(classes):
        ys, xs = np.nonzero(instances == i + 1)
        if len(xs) >= min_pixels:
            boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
            labels.append(cls)
    return {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4), "labels": np.array(labels, dtype=np.int64)}
