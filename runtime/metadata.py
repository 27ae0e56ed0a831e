"""dlpipe's self-describing ONNX metadata: one JSON document under the ``dlpipe`` key of the model's
``metadata_props`` (task, labels, input contract, preprocessing, precision, versions).
It is parsed with ``json.loads`` and validated, never evaluated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlpipe.runtime.errors import ModelFileError

METADATA_KEY = "dlpipe"
FORMAT_VERSION = 1
POLICIES = ("stretch", "center-crop", "letterbox")  # how an image of another shape meets the model's size
MAX_SIDE = 16384  # the largest model input side (and padding multiple) a metadata document may ask for


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: colour mode, resize (``resize`` names the interpolation;
    ``none`` keeps the image's size, padded up to ``size_multiple``), scale, normalisation, layout.

    ``policy`` says how an image of another shape meets ``size``: ``stretch`` (resized to it, aspect
    ratio not kept), ``center-crop`` (the shorter side resized to ``resize_size``, then the centre
    ``size`` cut out: torchvision's ImageNet ``weights.transforms()``) or ``letterbox`` (resized to fit
    inside ``size`` with its aspect ratio kept, the rest padded with black).
    """

    color: str = "RGB"
    size: tuple[int, int] = (32, 32)
    resize: str = "bilinear"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    size_multiple: int = 1
    policy: str = "stretch"
    resize_size: int | None = None

    @property
    def channels(self) -> int:
        """1 for grayscale, 3 for RGB."""
        return 1 if self.color == "L" else 3


@dataclass(frozen=True)
class ModelInfo:
    """What a dlpipe ONNX file says about itself."""

    task: str
    model: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    precision: str = "fp32"
    input_name: str = "image"
    output_names: tuple[str, ...] = ("logits",)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, text: str, source: object = "<metadata>") -> "ModelInfo":
        """Parse and validate the metadata document.

        Raises:
            ModelFileError: not JSON, or required fields missing or of the wrong type.
        """
        try:
            doc = json.loads(text)
            pre = doc.get("preprocessing") or {}
            return cls(
                task=str(doc["task"]), model=str(doc.get("model", "")),
                labels=tuple(str(x) for x in doc.get("labels", ())),
                preprocessing=Preprocessing(
                    color=str(pre.get("color", "RGB")), size=tuple(int(v) for v in pre.get("size", (32, 32))),
                    resize=str(pre.get("resize", "bilinear")), scale=float(pre.get("scale", 1 / 255)),
                    mean=tuple(float(v) for v in pre.get("mean", (0.0,))),
                    std=tuple(float(v) for v in pre.get("std", (1.0,))), layout=str(pre.get("layout", "NCHW")),
                    size_multiple=int(pre.get("size_multiple", 1)), policy=str(pre.get("policy", "stretch")),
                    resize_size=None if pre.get("resize_size") is None else int(pre["resize_size"])),
                precision=str(doc.get("precision", "fp32")),
                input_name=str(doc.get("inputs", ["image"])[0]),
                output_names=tuple(str(x) for x in doc.get("outputs", ["logits"])),
                raw=doc,
            )._checked()
        # OverflowError: float() of a huge integer, int() of infinity; RecursionError: deeply nested JSON.
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError, RecursionError) as exc:
            raise ModelFileError(f"{source}: malformed dlpipe metadata ({type(exc).__name__}: {exc})") from None

    def _checked(self) -> "ModelInfo":
        """Self, once its preprocessing is one the runtime can apply (issue 12: fuzzed metadata otherwise
        failed deep inside numpy or Pillow)."""
        pre = self.preprocessing
        if pre.color not in ("L", "RGB"):
            raise ValueError(f"preprocessing color must be 'L' or 'RGB', got {pre.color!r}")
        if len(pre.size) != 2 or not all(1 <= v <= MAX_SIDE for v in pre.size):
            raise ValueError(f"preprocessing size must be [height, width], each 1 to {MAX_SIDE}, got {list(pre.size)}")
        if pre.policy not in POLICIES:
            raise ValueError(f"preprocessing policy must be one of {', '.join(POLICIES)}, got {pre.policy!r}")
        if pre.resize_size is not None and not min(pre.size) <= pre.resize_size <= MAX_SIDE:
            raise ValueError(f"preprocessing resize_size must be {min(pre.size)} to {MAX_SIDE}, got {pre.resize_size}")
        if not 1 <= pre.size_multiple <= MAX_SIDE:
            raise ValueError(f"preprocessing size_multiple must be 1 to {MAX_SIDE}, got {pre.size_multiple}")
        for name, values in (("mean", pre.mean), ("std", pre.std)):
            if len(values) not in (1, pre.channels) or not all(math.isfinite(v) for v in values):
                raise ValueError(f"preprocessing {name} must be 1 or {pre.channels} finite numbers, got {list(values)}")
        if not math.isfinite(pre.scale) or 0.0 in pre.std:
            raise ValueError(f"preprocessing scale must be finite and std non-zero, got {pre.scale}, {list(pre.std)}")
        return self


def info_from_session(session: Any, path: Path) -> ModelInfo | None:
    """The :class:`ModelInfo` of an onnxruntime session, or None for an ONNX file dlpipe did not write.

    Raises:
        ModelFileError: metadata that is not UTF-8 text, or a malformed dlpipe document.
    """
    try:
        props = session.get_modelmeta().custom_metadata_map
    except UnicodeDecodeError as exc:  # found by fuzzing (issue 12): onnxruntime decodes every value as UTF-8
        raise ModelFileError(f"'{path}' has metadata that is not UTF-8 text ({exc})") from None
    if METADATA_KEY not in props:
        return None
    return ModelInfo.from_json(props[METADATA_KEY], f"'{path}'")
