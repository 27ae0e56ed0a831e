"""The one table of precisions a dlpipe model can be stored in. It feeds the quantizer, the CLI's
choices, the default output names and what the runtime reports (ultralytics' ``export_formats``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Precision:
    """One storage precision: name, output-file suffix and a line of help."""

    name: str
    suffix: str
    description: str


PRECISIONS: dict[str, Precision] = {p.name: p for p in [
    Precision("fp32", "", "float32, as exported from PyTorch"),
    Precision("fp16", ".fp16", "float16 weights and activations (onnxconverter-common), float32 inputs/outputs"),
    Precision("int8", ".int8", "int8 (onnxruntime.quantization): static QDQ per-channel, or dynamic"),
]}
QUANTIZED = tuple(name for name in PRECISIONS if name != "fp32")


def variant_path(path: str | Path, precision: str) -> Path:
    """Default file of a variant: ``model.onnx`` -> ``model.fp16.onnx``."""
    path = Path(path)
    return path.with_name(path.stem + PRECISIONS[precision].suffix + path.suffix)


def labelled_text(labelled: dict[str, Any], precision: str) -> str:
    """``accuracy on the 512 labelled check inputs: fp32 99.02%, int8 98.98% (-0.04 points)``."""
    change = 100 * (labelled["variant"] - labelled["fp32"])
    return (f"{labelled['name']} on the {labelled['inputs']} labelled check inputs: fp32 {labelled['fp32']:.2%}, "
            f"{precision} {labelled['variant']:.2%} ({change:+.2f} points)")
