"""Turning what users pass (file paths, PIL images, numpy arrays) into a model's input batch,
following the preprocessing in the model's metadata, with clear errors for bad inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from dlpipe.runtime.errors import InputError
from dlpipe.runtime.metadata import Preprocessing

ImageLike = Union[str, Path, Image.Image, np.ndarray]
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
             "bicubic": Image.Resampling.BICUBIC}


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file.

    Raises:
        InputError: missing file, a file that is not an image, or a truncated/damaged image.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image '{path}' does not exist")
    if path.is_dir():
        raise InputError(f"'{path}' is a folder, not an image file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except UnidentifiedImageError:
        raise InputError(f"'{path}' is not an image file (PNG, JPEG, ... expected)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"'{path}' is a truncated or damaged image ({exc})") from None


def _array_to_pil(arr: np.ndarray, name: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise InputError(f"{name}: image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {list(arr.shape)}")
    if arr.dtype == np.uint8:
        pass
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"{name}: image array contains NaN or infinity")
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)  # float images are taken as [0, 1]
    else:
        raise InputError(f"{name}: image arrays must be uint8 (0-255) or float (0-1), got {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


def to_pil(item: Any, name: str) -> Image.Image:
    """One image-like item as a PIL image (``name`` identifies it in errors)."""
    if isinstance(item, (str, Path)):
        return open_image(item)
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, name)
    raise InputError(f"{name}: expected a file path, PIL image or numpy array, got {type(item).__name__}")


def split_items(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    """Normalise the ``predict`` argument to a list of single images.

    A numpy array of rank 4 (NxHxWxC) or of rank 3 whose last axis is not 1, 3 or 4 (NxHxW) is a batch.
    """
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4 or (images.ndim == 3 and images.shape[-1] not in (1, 3, 4)):
            return list(images)
        return [images]
    try:
        return list(images)
    except TypeError:
        raise InputError(f"expected images (paths, PIL images or arrays), got {type(images).__name__}") from None


def _size_of(item: ImageLike) -> tuple[int, int] | None:
    """(height, width) of an array or PIL image; None for a path (known only once opened)."""
    if isinstance(item, np.ndarray):
        return tuple(item.shape[:2])
    if isinstance(item, Image.Image):
        return item.size[1], item.size[0]
    return None


def pad_to_multiple(batch: np.ndarray, multiple: int) -> np.ndarray:
    """Edge-pad the last two axes of an NCHW batch up to multiples of ``multiple``."""
    h, w = batch.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return batch
    return np.pad(batch, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")


def _fast_batch(items: list[ImageLike], pre: Preprocessing) -> np.ndarray | None:
    """uint8 arrays already at the model's size and channel count: no PIL round trip."""
    h, w = pre.size
    if not items or not all(isinstance(a, np.ndarray) and a.dtype == np.uint8 for a in items):
        return None
    shape = (h, w) if pre.channels == 1 else (h, w, 3)
    if not all(a.shape == shape for a in items):
        return None
    return np.stack(items)


def preprocess(items: list[ImageLike], pre: Preprocessing, names: list[str] | None = None) -> np.ndarray:
    """Images -> float32 NCHW batch: convert colour, resize, scale, normalise.

    Raises:
        InputError: for any item that is not a usable image (naming it).
    """
    batch = _fast_batch(items, pre)
    if batch is None and pre.resize == "none" and len({_size_of(i) for i in items}) > 1:
        raise InputError("images of a model that keeps their size must be batched by size")
    if batch is None:
        h, w = pre.size
        arrays = []
        for i, item in enumerate(items):
            name = names[i] if names else (f"'{item}'" if isinstance(item, (str, Path)) else f"image #{i}")
            img = to_pil(item, name)
            if img.mode != pre.color:
                if img.mode in ("RGBA", "LA", "P", "PA") and pre.color in ("RGB", "L"):
                    img = img.convert("RGBA")
                    bg = Image.new("RGBA", img.size, (255, 255, 255, 255))  # flatten transparency onto white
                    img = Image.alpha_composite(bg, img)
                img = img.convert(pre.color)
            if img.size != (w, h) and pre.resize != "none":
                img = img.resize((w, h), _RESAMPLE.get(pre.resize, Image.Resampling.BILINEAR))
            arrays.append(np.asarray(img, dtype=np.uint8))
        batch = np.stack(arrays)
    if batch.ndim == 3:
        batch = batch[:, None]
    else:
        batch = batch.transpose(0, 3, 1, 2)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    inv_std = (1.0 / np.asarray(pre.std, dtype=np.float32)).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((batch.astype(np.float32) * np.float32(pre.scale) - mean) * inv_std)
