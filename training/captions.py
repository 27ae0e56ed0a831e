"""Captions for the shapes world: one deterministic English sentence per scene.

The language is small on purpose (issue 4): kinds, colours, a count and one spatial relation, so a
model must look at the image (which shapes, which colours, where) to be right, and a well-trained
captioner can reach a high BLEU-4:

* one shape: ``a red circle`` (``an orange star``)
* two shapes of the same kind and colour: ``two red circles``
* two other shapes: ``a red circle left of a blue square`` (the left one first) when they lie more
  side by side than one above the other, else ``a green star above a white cross`` (the upper one first).

Scenes come from :class:`~dlpipe.training.shapes.ShapesWorld` (1-2 shapes). Scenes whose shapes
overlap, or whose relation is ambiguous (the line between the centres within 10 degrees of a
diagonal), have no single right sentence and are skipped, and two of three one-shape scenes are
skipped too, so that about half the sentences name two shapes; every kept scene is found again by
its index, so the data sets are deterministic.
"""

from __future__ import annotations

import math

import numpy as np

from dlpipe.training.shapes import Scene, Shape, ShapesWorld

CAPTION_SEED = 20240604
IMAGE_SIZE = 48
CAPTIONS_TRAIN, CAPTIONS_TEST = 12_000, 1_000
TEST_START = 1_000_000  # held-out scenes are drawn far from the training indices
PLURALS = {"cross": "crosses"}
_DIAGONAL_MARGIN = math.radians(10)


def caption_world(image_size: int = IMAGE_SIZE) -> ShapesWorld:
    """The world the captions describe: 1-2 shapes of radius 12-20% of the image side."""
    return ShapesWorld(seed=CAPTION_SEED, image_size=image_size, shapes_per_scene=(1, 2), radius=(0.12, 0.2))


def _noun(shape: Shape) -> str:
    article = "an" if shape.colour[0] in "aeiou" else "a"
    return f"{article} {shape.colour} {shape.kind}"


def _relation(a: Shape, b: Shape) -> tuple[str, Shape, Shape] | None:
    """(relation, first, second) with ``first`` left of / above ``second``; None when ambiguous."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    angle = math.atan2(abs(dy), abs(dx))  # 0: side by side, pi/2: one above the other
    if abs(angle - math.pi / 4) < _DIAGONAL_MARGIN:
        return None
    if angle < math.pi / 4:
        return ("left of", a, b) if dx > 0 else ("left of", b, a)
    return ("above", a, b) if dy > 0 else ("above", b, a)  # image y grows downwards


def describe(scene: Scene) -> str | None:
    """The sentence for ``scene``, or None when the scene has no single right sentence."""
    shapes = scene.shapes
    if len(shapes) == 1:
        return _noun(shapes[0])
    if len(shapes) != 2:
        return None
    a, b = shapes
    gap = math.dist(a.center, b.center) - (a.radius + b.radius)
    if gap < 1.0:  # touching or overlapping: one may hide the other
        return None
    if a.kind == b.kind and a.colour == b.colour:
        return f"two {a.colour} {PLURALS.get(a.kind, a.kind + 's')}"
    relation = _relation(a, b)
    if relation is None:
        return None
    word, first, second = relation
    return f"{_noun(first)} {word} {_noun(second)}"


def caption_scenes(count: int, start: int = 0, image_size: int = IMAGE_SIZE) -> tuple[list[int], list[str]]:
    """Indices and sentences of the first ``count`` describable scenes from index ``start`` on."""
    world = caption_world(image_size)
    indices, sentences = [], []
    index = start
    while len(indices) < count:
        scene = world.scene(index)
        sentence = describe(scene)
        # most two-shape scenes overlap; thinning the one-shape scenes to a third keeps the two kinds
        # of sentence about equally common
        if sentence is not None and (len(scene.shapes) == 2 or index % 3 == 0):
            indices.append(index)
            sentences.append(sentence)
        index += 1
    return indices, sentences


def caption_set(count: int, start: int = 0, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """``count`` rendered scenes and their sentences.

    Returns:
        ``(images, sentences)``: ``N x H x W x 3`` uint8 and one sentence per image.
    """
    world = caption_world(image_size)
    indices, sentences = caption_scenes(count, start, image_size)
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    for i, index in enumerate(indices):
        images[i] = world.render(world.scene(index))[0]
    return images, sentences


def load_captions(split: str, limit: int | None = None) -> tuple[np.ndarray, list[list[str]]]:
    """The ``train`` or ``test`` split of shapes captions, one reference sentence per image (as a list,
    the shape real caption sets with several references per image also take)."""
    count = CAPTIONS_TRAIN if split == "train" else CAPTIONS_TEST
    count = count if limit is None else min(limit, count)
    images, sentences = caption_set(count, start=0 if split == "train" else TEST_START)
    return images, [[s] for s in sentences]
