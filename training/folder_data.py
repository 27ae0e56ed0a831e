"""A user's own labelled images (torchvision's ``ImageFolder`` layout: ``ROOT/CLASS/IMAGE.png``) as a
classification dataset for ``dlpipe train MODEL --dataset folder:ROOT`` (issue 15: the classic CNNs on
users' images larger than 28x28).

Images are converted to RGB at ``SIZE x SIZE`` through the runtime's own resize (so training sees the
pixels ``dlpipe classify`` will feed the model) and normalised with ImageNet's statistics. ``ROOT/train``
and ``ROOT/test`` are the splits when both exist (each with the same class folders); otherwise a fixed
``TEST_FRACTION`` of each class (at least one image) is the test split. Both splits come in a seeded
shuffled order, so ``--limit`` takes every class.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from dlpipe.runtime.errors import InputError
from dlpipe.runtime.images import preprocess
from dlpipe.runtime.metadata import Preprocessing
from dlpipe.training.dataset_info import DatasetInfo
from dlpipe.training.folders import read_folder

SIZE = 64
TEST_FRACTION = 0.2
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@lru_cache(maxsize=8)
def _splits(root: Path) -> tuple[tuple[str, ...], dict[str, tuple[list[Path], np.ndarray]]]:
    """Class names and ``{split: (files, labels)}`` in a seeded shuffled order."""
    rng = np.random.default_rng(0)
    if (root / "train").is_dir() and (root / "test").is_dir():
        names, files, labels = read_folder(root / "train", None, rng)
        test_names, test_files, test_labels = read_folder(root / "test", None, rng)
        if test_names != names:
            raise InputError(f"'{root / 'test'}' has the classes {test_names}, '{root / 'train'}' {names}; "
                             "they must match")
        parts = {"train": (files, labels), "test": (test_files, test_labels)}
    else:
        names, files, labels = read_folder(root, None, rng)
        test = []
        for k, name in enumerate(names):
            idx = rng.permutation(np.flatnonzero(labels == k))
            if len(idx) < 2:
                raise InputError(f"class folder '{root / name}' has {len(idx)} image; at least 2 are needed (one "
                                 "to train on, one to test)")
            test.extend(idx[:max(1, round(len(idx) * TEST_FRACTION))])
        is_test = np.isin(np.arange(len(labels)), test)
        parts = {split: ([f for f, t in zip(files, is_test) if t == want], labels[is_test == want])
                 for split, want in (("train", False), ("test", True))}
    out = {}
    for split, (split_files, split_labels) in parts.items():
        order = rng.permutation(len(split_labels))
        out[split] = ([split_files[i] for i in order], split_labels[order])
    return tuple(names), out


def _load(root: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``N x SIZE x SIZE x 3`` images and int64 labels of one split."""
    files, labels = _splits(root)[1][split]
    files, labels = files[:limit], labels[:limit]
    identity = Preprocessing(color="RGB", size=(SIZE, SIZE), resize="bilinear", scale=1.0, mean=(0.0,) * 3,
                             std=(1.0,) * 3)
    images = preprocess(files, identity, [f"'{f}'" for f in files])  # float32 NCHW, 0..255
    return np.ascontiguousarray(images.round().astype(np.uint8).transpose(0, 2, 3, 1)), labels


def folder_dataset(name: str, root: Path) -> DatasetInfo:
    """The :class:`DatasetInfo` of the image folder ``root`` (its classes are read now, so a bad folder is
    refused before a model is built).

    Raises:
        DataNotFoundError: no class sub-folders. InputError: an empty class, a single class, a class with
            one image, or train/test folders with different classes.
    """
    names, _ = _splits(root.resolve())
    return DatasetInfo(name, 3, (SIZE, SIZE), IMAGENET_MEAN, IMAGENET_STD, names,
                       lambda split, _root, download, limit: _load(root.resolve(), split, limit))
