"""dlpipe's self-describing ONNX metadata: one JSON document under the ``dlpipe`` key of the model's
``metadata_props`` (task, labels, input contract, preprocessing, precision, versions).
It is parsed with ``json.loads`` and validated, never evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlpipe.runtime.errors import ModelFileError

METADATA_KEY = "dlpipe"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: colour mode, resize (``none`` keeps the image's size,
    padded up to ``size_multiple``), scale, normalisation, layout."""

    color: str = "RGB"
    size: tuple[int, int] = (32, 32)
    resize: str = "bilinear"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    size_multiple: int = 1

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
                    size_multiple=int(pre.get("size_multiple", 1))),
                precision=str(doc.get("precision", "fp32")),
                input_name=str(doc.get("inputs", ["image"])[0]),
                output_names=tuple(str(x) for x in doc.get("outputs", ["logits"])),
                raw=doc,
            )
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ModelFileError(f"{source}: malformed dlpipe metadata ({type(exc).__name__}: {exc})") from None


def info_from_session(session: Any, path: Path) -> ModelInfo | None:
    """The :class:`ModelInfo` of an onnxruntime session, or None for an ONNX file dlpipe did not write."""
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        return None
    return ModelInfo.from_json(props[METADATA_KEY], f"'{path}'")
