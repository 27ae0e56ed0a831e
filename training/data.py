"""Datasets for training and evaluation: MNIST and Fashion-MNIST through torchvision, and the
embedded shapes world. Each is declared once in :data:`DATASETS` with its channels, size,
normalisation and labels, which travel with the model into its checkpoint and ONNX metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from dlpipe.runtime.errors import DataNotFoundError, InputError
from dlpipe.training.dataset_info import DatasetInfo
from dlpipe.training.shapes import KINDS, ShapesWorld, boxes_from_instances

SHAPES_SEED = 20240601
SHAPES_TRAIN, SHAPES_TEST = 12_000, 2_000
SCENES_TRAIN, SCENES_TEST = 6_000, 1_000
SHAPES_SCENES_TRAIN = 27_000  # generated, so segmentation sees more scenes instead of the same ones again
_SHAPES_TEST_START = 1_000_000  # test scenes are drawn far from the training indices


def default_data_dir() -> Path:
    """``$DLPIPE_DATA_DIR`` if set, else ``~/.cache/dlpipe/data``."""
    env = os.environ.get("DLPIPE_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dlpipe" / "data"


def _torchvision_loader(cls_name: str,
                        name: str = "mnist") -> Callable[[str, Path, bool, int | None], tuple[np.ndarray, np.ndarray]]:
    """A loader of torchvision's ``cls_name`` (registered as dataset ``name``)."""

    def load(split: str, root: Path, download: bool, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        from torchvision import datasets

        cls = getattr(datasets, cls_name)
        raw = root / cls_name / "raw"
        try:
            ds = cls(str(root), train=(split == "train"), download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True ..."
            # Only `dlpipe train` has --download: evaluate, quantize, finetune and the demo must not advise
            # "pass --download", nor repeat torchvision's "use download=True" (issue 12).
            hint = (f"let 'dlpipe train MODEL --dataset {name} --download' fetch it" if not download
                    else f"the download failed, no network? ({exc})")
            raise DataNotFoundError(
                f"{cls_name} {split} split not found: looked in '{raw}' for the idx files "
                f"(train-images-idx3-ubyte, ...); put them there, point --data-dir or DLPIPE_DATA_DIR at the folder "
                f"that holds '{cls_name}/raw', or {hint}") from None
        return ds.data.numpy()[:limit], ds.targets.numpy().astype(np.int64)[:limit]

    return load


def _shapes_loader(split: str, root: Path, download: bool, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    del root, download  # generated, nothing on disk
    world = ShapesWorld(seed=SHAPES_SEED, image_size=32)
    count = SHAPES_TRAIN if split == "train" else SHAPES_TEST
    count = count if limit is None else min(limit, count)
    return world.classification_set(count, start=0 if split == "train" else _SHAPES_TEST_START)


def _shapes64_loader(split: str, root: Path, download: bool, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The shapes world drawn at 64x64 (the DCGAN's colour size, issue 16)."""
    del root, download
    world = ShapesWorld(seed=SHAPES_SEED, image_size=64)
    count = SHAPES_TRAIN if split == "train" else SHAPES_TEST
    count = count if limit is None else min(limit, count)
    return world.classification_set(count, start=0 if split == "train" else _SHAPES_TEST_START)


def _scenes_loader(split: str, root: Path, download: bool, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    del root, download
    world = ShapesWorld(seed=SHAPES_SEED + 1, image_size=64, shapes_per_scene=(1, 4), radius=(0.12, 0.25))
    count = SHAPES_SCENES_TRAIN if split == "train" else SCENES_TEST
    count = count if limit is None else min(limit, count)
    return world.segmentation_set(count, start=0 if split == "train" else _SHAPES_TEST_START)


def digit_scenes(digits: np.ndarray, labels: np.ndarray, count: int, seed: int, size: int = 64,
                 per_scene: tuple[int, int] = (1, 3), with_boxes: bool = False):
    """Scenes of real MNIST strokes: 1-3 digits pasted at random scales and places on a ``size`` canvas,
    overlapping little (the place is redrawn up to 10 times while it would cover 5% of earlier strokes).

    Returns:
        ``(images, masks)``: ``N x size x size`` uint8 images and masks holding ``1 + digit`` on the strokes
        (pixels above 96/255; a later digit covers an earlier one) and 0 elsewhere; with ``with_boxes``
        also one ``{"boxes", "labels"}`` dict per image (the visible strokes' boxes, labels ``1 + digit``).
    """
    from PIL import Image

    images = np.zeros((count, size, size), dtype=np.uint8)
    masks = np.zeros((count, size, size), dtype=np.uint8)
    targets = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        instances = np.zeros((size, size), dtype=np.uint8)
        classes = []
        for j in range(int(rng.integers(per_scene[0], per_scene[1] + 1))):
            k = int(rng.integers(len(digits)))
            side = int(rng.integers(20, 41))
            glyph = np.asarray(Image.fromarray(digits[k]).resize((side, side), Image.Resampling.BILINEAR))
            strokes = glyph > 96
            for _ in range(10):  # look for a place where the new strokes barely touch earlier ones
                y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                if (masks[i, y:y + side, x:x + side][strokes] > 0).mean() < 0.05:
                    break
            window = images[i, y:y + side, x:x + side]
            np.maximum(window, glyph, out=window)
            masks[i, y:y + side, x:x + side][strokes] = labels[k] + 1
            instances[y:y + side, x:x + side][strokes] = j + 1
            classes.append(int(labels[k]) + 1)
        if with_boxes:
            targets.append(boxes_from_instances(instances, np.array(classes, dtype=np.int64)))
    return (images, masks, targets) if with_boxes else (images, masks)


def _digit_scenes_loader(split: str, root: Path, download: bool, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    count = SCENES_TRAIN if split == "train" else SCENES_TEST
    count = count if limit is None else min(limit, count)
    digits, labels = _torchvision_loader("MNIST")(split, root, download, None)
    return digit_scenes(digits, labels, count, seed=SHAPES_SEED + (2 if split == "train" else 3))


def _boxes_loader(split: str, root: Path, download: bool, limit: int | None) -> tuple[np.ndarray, list[dict]]:
    del root, download
    world = ShapesWorld(seed=SHAPES_SEED + 4, image_size=64, shapes_per_scene=(1, 5), radius=(0.12, 0.25))
    count = SCENES_TRAIN if split == "train" else SCENES_TEST
    count = count if limit is None else min(limit, count)
    return world.detection_set(count, start=0 if split == "train" else _SHAPES_TEST_START)


def _digit_boxes_loader(split: str, root: Path, download: bool, limit: int | None) -> tuple[np.ndarray, list[dict]]:
    count = SCENES_TRAIN if split == "train" else SCENES_TEST
    count = count if limit is None else min(limit, count)
    digits, labels = _torchvision_loader("MNIST")(split, root, download, None)
    images, _, targets = digit_scenes(digits, labels, count, seed=SHAPES_SEED + (5 if split == "train" else 6),
                                      with_boxes=True)
    return images, targets


DATASETS: dict[str, DatasetInfo] = {
    d.name: d for d in [
        DatasetInfo("mnist", 1, (28, 28), (0.1307,), (0.3081,), tuple(str(i) for i in range(10)),
                    _torchvision_loader("MNIST")),
        DatasetInfo("fashion-mnist", 1, (28, 28), (0.2860,), (0.3530,),
                    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"), _torchvision_loader("FashionMNIST", "fashion-mnist")),
        DatasetInfo("shapes", 3, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), KINDS, _shapes_loader),
        DatasetInfo("shapes-64", 3, (64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), KINDS, _shapes64_loader),
        DatasetInfo("shapes-scenes", 3, (64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ("background", *KINDS),
                    _scenes_loader, task="segmentation"),
        DatasetInfo("mnist-scenes", 1, (64, 64), (0.08,), (0.25,), ("background", *(str(i) for i in range(10))),
                    _digit_scenes_loader, task="segmentation"),
        DatasetInfo("shapes-boxes", 3, (64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ("background", *KINDS),
                    _boxes_loader, task="detection"),
        DatasetInfo("mnist-boxes", 1, (64, 64), (0.08,), (0.25,), ("background", *(str(i) for i in range(10))),
                    _digit_boxes_loader, task="detection"),
    ]
}


def get_dataset(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` called ``name``, or of a user's own data: ``voc-seg:ROOT``, ``voc-det:ROOT``
    or ``coco:ROOT`` (see :mod:`dlpipe.training.user_data`)."""
    if ":" in name:
        from dlpipe.training.user_data import user_dataset

        return user_dataset(name)
    try:
        return DATASETS[name]
    except KeyError:
        raise InputError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


def load_split(name: str, split: str, data_dir: str | Path | None = None, limit: int | None = None,
               download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 images and int64 labels of one split (``train`` or ``test``), the first ``limit`` if given.

    Raises:
        DataNotFoundError: when the files are missing, naming where they were looked for.
    """
    info = get_dataset(name)
    return info.loader(split, Path(data_dir) if data_dir else default_data_dir(), download, limit)


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 ``NxHxW`` or ``NxHxWxC`` array -> uint8 ``NxCxHxW`` tensor."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW, scaled and normalised exactly as the runtime does it."""
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


AUGMENTATIONS = ("none", "shift", "affine", "affine+erase", "elastic", "crop", "flip")


def augmentation(name: str, image_size: tuple[int, int]) -> v2.Transform | None:
    """Per-image augmentation by name: random shift, shift+rotation+scale (``affine``), that and random
    erasing of a patch half the time (``affine+erase``, Zhong et al. 2017), elastic distortion with a
    small affine (``elastic``, Simard et al. 2003), padded random crop, or horizontal flip."""
    if name == "none":
        return None
    if name == "shift":
        return v2.RandomAffine(degrees=0, translate=(0.1, 0.1))
    if name == "affine":
        return v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    if name == "affine+erase":
        return v2.Compose([v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                           v2.RandomErasing(p=0.5, scale=(0.02, 0.12), ratio=(0.3, 3.3), value=0)])
    if name == "elastic":
        return v2.Compose([v2.RandomApply([v2.ElasticTransform(alpha=34.0, sigma=4.0)], p=0.5),
                           v2.RandomAffine(degrees=8, translate=(0.08, 0.08), scale=(0.92, 1.08))])
    if name == "crop":
        return v2.RandomCrop(image_size, padding=2)
    if name == "flip":
        return v2.RandomHorizontalFlip()
    raise InputError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")


class ImageTensorDataset(Dataset):
    """In-memory uint8 images, normalised per batch; optional per-image torchvision v2 augmentation
    (with ``masks``, applied to an image and its segmentation mask together, as ``tv_tensors.Image``/``Mask``).

    It implements ``__getitems__`` so a DataLoader fetches a whole batch in one call (no per-item
    collation), which keeps the training loop close to a bare tensor loop.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo,
                 transform: v2.Transform | None = None, masks: bool = False):
        self.images, self.labels, self.info, self.transform, self.masks = images, labels, info, transform, masks

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices)
        batch, labels = self.images[idx], self.labels[idx]
        if self.transform is not None and self.masks:  # segmentation: the mask moves with its image
            pairs = [self.transform(tv_tensors.Image(img), tv_tensors.Mask(mask)) for img, mask in zip(batch, labels)]
            batch = torch.stack([image.as_subclass(torch.Tensor) for image, _ in pairs])
            labels = torch.stack([mask.as_subclass(torch.Tensor) for _, mask in pairs])
        elif self.transform is not None:
            batch = torch.stack([self.transform(img) for img in batch])
        return normalize(batch, self.info), labels.long()


def batch_collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate function for :class:`ImageTensorDataset`: the batch is already made."""
    return batch
