"""Image folders (torchvision's ``ImageFolder`` layout: one sub-folder of images per class) as labelled
file lists, for fine-tuning on a user's own classes and for evaluating a classifier on a held-out folder."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dlpipe.runtime.errors import DataNotFoundError, InputError


def read_folder(root: Path, per_class: int | None, rng: np.random.Generator) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names, chosen image files and their labels of an ImageFolder tree."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    try:
        tree = ImageFolder(str(root), allow_empty=True)
    except FileNotFoundError:
        raise DataNotFoundError(f"image folder '{root}' has no class sub-folders; put each class's images "
                                "in a folder of its own (root/CLASS/IMAGE.png)") from None
    labels = np.array(tree.targets, dtype=np.int64)
    for k, name in enumerate(tree.classes):
        if not (labels == k).any():
            raise InputError(f"class folder '{root / name}' holds no images ({' '.join(IMG_EXTENSIONS)})")
    if len(tree.classes) < 2:
        raise InputError(f"image folder '{root}' has only one class ('{tree.classes[0]}'); a classifier needs "
                         "at least two class folders")
    keep = per_class_indices(labels, per_class, rng)
    return list(tree.classes), [Path(tree.samples[i][0]) for i in keep], labels[keep]


def folder_images(root: str | Path, labels: Sequence[str], limit: int | None = None) -> tuple[list[Path], np.ndarray]:
    """Every image file of an ImageFolder tree (the first ``limit``) with its class index in ``labels``, the
    model's class order: ``dlpipe evaluate --dataset FOLDER`` on a held-out folder.

    Raises:
        InputError: a class folder whose name is not one of ``labels``, or the folder problems of
            :func:`read_folder`.
    """
    names, files, y = read_folder(Path(root), None, np.random.default_rng(0))
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise InputError(f"class folders {unknown} of '{root}' are not among the model's classes {list(labels)}")
    index = np.array([list(labels).index(n) for n in names], dtype=np.int64)
    return files[:limit], index[y][:limit]


def per_class_indices(labels: np.ndarray, per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``per_class`` randomly chosen images of each class, in the original order."""
    if per_class is None:
        return np.arange(len(labels))
    if per_class < 2:
        raise InputError(f"--per-class must be at least 2 (one image to train on, one to validate), got {per_class}")
    chosen = [rng.permutation(np.flatnonzero(labels == k))[:per_class] for k in np.unique(labels)]
    return np.sort(np.concatenate(chosen))
