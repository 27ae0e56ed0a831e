"""The one table of precisions a dlpipe model can be stored in. It feeds the quantizer, the CLI's
choices, the default output names and what the runtime reports (ultralytics' ``export_formats``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
