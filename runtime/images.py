"""Turning what users pass (file paths, PIL images, numpy arrays) into a model's input batch,
following the preprocessing in the model's metadata, with clear errors for bad inputs.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dlpipe.runtime.errors import DlpipeError, InputError, UsageError
from dlpipe.runtime.metadata import Preprocessing

ImageLike = Union[str, Path, Image.Image, np.ndarray]
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
             "bicubic": Image.Resampling.BICUBIC}


# Pillow's decompression-bomb limit (about 89.5 million pixels) unless set_max_pixels says otherwise.
_max_pixels: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def set_max_pixels(limit: int) -> None:
    """Set the largest image (width x height) :func:`open_image` decodes, process-wide.

    The check cannot be disabled: a file that declares more pixels than this is refused before it is
    decoded (a small file may declare a huge image, a "decompression bomb").

    Raises:
        UsageError: ``limit`` is not a positive whole number.
    """
    global _max_pixels
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"the pixel limit must be a positive whole number, got {limit!r}")
    _max_pixels = limit
    Image.MAX_IMAGE_PIXELS = limit  # Pillow's own check (at twice the limit) follows the setting


def max_pixels() -> int:
    """The current pixel limit of :func:`open_image`."""
    return _max_pixels


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale images as 8-bit ``L`` images, scaled by their range.

    Unsigned 16-bit images (``I;16*``, e.g. 16-bit PNGs) map 0-65535 to 0-255 (as scikit-image and
    OpenCV do), 32-bit integer images whose values fit 0-255 or 0-65535 are read as 8- or 16-bit data, and
    float images whose values lie in [0, 1] map to 0-255; any other range is stretched from its minimum to
    its maximum. (Pillow's own conversion clips at 255, turning a 16-bit image white.) Other modes are
    returned unchanged.
    """
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    arr = np.asarray(img).astype(np.float64)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        scaled = arr * (255.0 / 65535.0)
    elif img.mode == "I" and lo >= 0 and hi <= 255:
        scaled = arr
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scaled = arr * 255.0
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(scaled.round(), 0, 255).astype(np.uint8), mode="L")


def open_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file, upright (its EXIF orientation applied) and with 16-bit and
    float greyscale scaled to 8 bits (:func:`to_8bit`).

    Args:
        max_pixels: Refuse images larger than this (default: :func:`max_pixels`, Pillow's limit).

    Raises:
        InputError: missing file, a file that is not an image, a truncated/damaged image, or one that
            declares more pixels than the limit. Every decoding failure becomes an ``InputError`` naming
            the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image '{path}' does not exist")
    if path.is_dir():
        raise InputError(f"'{path}' is a folder, not an image file")
    return _decode(path, path, max_pixels)


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """:func:`open_image` for an image held in memory (e.g. a Parquet column of encoded PNG/JPEG bytes),
    with the same pixel limit, orientation and 8-bit scaling; ``name`` identifies it in errors.

    Raises:
        InputError: bytes that are not an image, a damaged one, or one over the pixel limit (naming it).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"'{name}': expected encoded image bytes, got {type(data).__name__}")
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source: Path | io.BytesIO, path: str | Path, max_pixels: int | None) -> Image.Image:
    """Decode ``source`` (a file or an in-memory one), naming it ``path`` in errors."""
    limit = _max_pixels if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():  # the limit below decides; Pillow's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
        with img:
            _check_size(path, img.size, limit)
            img.load()
            upright = ImageOps.exif_transpose(img)
            return to_8bit(upright if upright is not img else img.copy())
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"'{path}' is not an image file (PNG, JPEG, ... expected)") from None
    except Image.DecompressionBombError:
        raise InputError(f"'{path}' declares more than {limit:,} pixels (a decompression bomb?); "
                         "raise the limit with --max-pixels if the image is genuine") from None
    except MemoryError:
        raise InputError(f"'{path}' is too large to decode in this machine's memory") from None
    except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise InputError(f"'{path}' is a truncated or damaged image ({type(exc).__name__}: {exc})") from None


def _check_size(path: str | Path, size: tuple[int, int], limit: int) -> None:
    w, h = size
    if w * h > limit:
        raise InputError(f"'{path}' declares {w}x{h} = {w * h:,} pixels, more than the limit of {limit:,} "
                         "(a decompression bomb?); raise the limit with --max-pixels if the image is genuine")
    if w < 1 or h < 1:
        raise InputError(f"'{path}' declares an empty image ({w}x{h})")


def _array_to_pil(arr: np.ndarray, name: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise InputError(f"{name}: image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {list(arr.shape)}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.float32) * (255.0 / 65535.0)).round().astype(np.uint8)  # as 16-bit files are read
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"{name}: image array contains NaN or infinity")
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)  # float images are taken as [0, 1]
    else:
        raise InputError(f"{name}: image arrays must be uint8 (0-255), uint16 (0-65535) or float (0-1), "
                         f"got {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


def to_pil(item: Any, name: str) -> Image.Image:
    """One image-like item as a PIL image (``name`` identifies it in errors)."""
    if isinstance(item, (str, Path)):
        return open_image(item)
    if isinstance(item, Image.Image):
        return to_8bit(item)
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


@dataclass(frozen=True)
class Failure:
    """An image that could not be used, in its place among the results of ``predict(..., errors="skip")``.

    Attributes:
        image: The file path, or ``image #i`` for an in-memory image.
        error: The :class:`~dlpipe.runtime.errors.InputError` it raised (its message names the image).
    """

    image: str
    error: DlpipeError

    @property
    def message(self) -> str:
        return str(self.error)


ERRORS = ("raise", "skip")


def item_name(item: Any, index: int) -> str:
    """How errors and :class:`Failure` name an input: its path, else its position."""
    return str(item) if isinstance(item, (str, Path)) else f"image #{index}"


def guarded(chunks: list[list[Any]], run: Callable[[list[Any]], list[Any]], errors: str = "raise") -> list[Any]:
    """``run`` over each chunk of inputs, results concatenated in order.

    With ``errors="skip"``, a chunk that raises :class:`InputError` is run again an item at a time and an
    item that still fails becomes a :class:`Failure` in its place; with ``"raise"`` the first error stops
    everything.
    """
    if errors not in ERRORS:
        raise UsageError(f"errors must be 'raise' or 'skip', got {errors!r}")
    results: list[Any] = []
    start = 0
    for chunk in chunks:
        try:
            results.extend(run(chunk))
        except InputError as exc:
            if errors == "raise":
                raise
            results.extend([Failure(item_name(chunk[0], start), exc)] if len(chunk) == 1
                           else _one_by_one(chunk, run, start))
        start += len(chunk)
    return results


def _one_by_one(chunk: list[Any], run: Callable[[list[Any]], list[Any]], start: int) -> list[Any]:
    results: list[Any] = []
    for i, item in enumerate(chunk):
        try:
            results.extend(run([item]))
        except InputError as exc:
            results.append(Failure(item_name(item, start + i), exc))
    return results


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
    if pre.policy == "center-crop":  # even an image of the model's size is resized and cropped
        return None
    if not items or not all(isinstance(a, np.ndarray) and a.dtype == np.uint8 for a in items):
        return None
    shape = (h, w) if pre.channels == 1 else (h, w, 3)
    if not all(a.shape == shape for a in items):
        return None
    return np.stack(items)


def fit_to_size(img: Image.Image, pre: Preprocessing) -> Image.Image:
    """``img`` brought to the model's ``size`` by the preprocessing's policy (stretch, centre crop or
    letterbox; see :class:`~dlpipe.runtime.metadata.Preprocessing`)."""
    h, w = pre.size
    resample = _RESAMPLE.get(pre.resize, Image.Resampling.BILINEAR)
    iw, ih = img.size
    if pre.policy == "center-crop":  # as torchvision's Resize(resize_size) + CenterCrop(size)
        short = pre.resize_size or min(h, w)
        nw, nh = (short, int(short * ih / iw)) if iw <= ih else (int(short * iw / ih), short)
        if (nw, nh) != (iw, ih):
            img = img.resize((nw, nh), resample)
        if nw < w or nh < h:  # smaller than the crop: pad with black around it, as CenterCrop does
            canvas = Image.new(img.mode, (max(nw, w), max(nh, h)))
            canvas.paste(img, ((max(nw, w) - nw) // 2, (max(nh, h) - nh) // 2))
            img, (nw, nh) = canvas, canvas.size
        top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
        return img.crop((left, top, left + w, top + h))
    if pre.policy == "letterbox":
        scale = min(w / iw, h / ih)
        nw, nh = max(1, round(iw * scale)), max(1, round(ih * scale))
        canvas = Image.new(img.mode, (w, h))
        canvas.paste(img.resize((nw, nh), resample) if (nw, nh) != (iw, ih) else img, ((w - nw) // 2, (h - nh) // 2))
        return canvas
    return img if img.size == (w, h) else img.resize((w, h), resample)


def _model_pixels(img: Image.Image, pre: Preprocessing, name: str) -> np.ndarray:
    """One PIL image in the model's colour mode and size, as a uint8 array."""
    try:
        if img.mode != pre.color:
            if img.mode in ("RGBA", "LA", "P", "PA", "RGBa", "La") and pre.color in ("RGB", "L"):
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))  # flatten transparency onto white
                img = Image.alpha_composite(bg, img)
            img = img.convert(pre.color)
        if pre.resize != "none":
            img = fit_to_size(img, pre)
        return np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # a mode Pillow cannot convert, or a lazily opened image that fails to decode
        raise InputError(f"{name}: cannot convert a {img.mode} image of size {img.size[0]}x{img.size[1]} to "
                         f"{pre.color} ({type(exc).__name__}: {exc})") from None


def preprocess(items: list[ImageLike], pre: Preprocessing, names: list[str] | None = None) -> np.ndarray:
    """Images -> float32 NCHW batch: convert colour, resize, scale, normalise.

    Raises:
        InputError: for any item that is not a usable image (naming it).
    """
    batch = _fast_batch(items, pre)
    if batch is None and pre.resize == "none" and len({_size_of(i) for i in items}) > 1:
        raise InputError("images of a model that keeps their size must be batched by size")
    if batch is None:
        arrays = []
        for i, item in enumerate(items):
            name = names[i] if names else (f"'{item}'" if isinstance(item, (str, Path)) else f"image #{i}")
            arrays.append(_model_pixels(to_pil(item, name), pre, name))
        batch = np.stack(arrays)
    if batch.ndim == 3:
        batch = batch[:, None]
    else:
        batch = batch.transpose(0, 3, 1, 2)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    inv_std = (1.0 / np.asarray(pre.std, dtype=np.float32)).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((batch.astype(np.float32) * np.float32(pre.scale) - mean) * inv_std)
