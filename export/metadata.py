"""Reading and writing dlpipe's metadata document in an ONNX model's ``metadata_props`` (as JSON)."""

from __future__ import annotations

import json
from typing import Any

import onnx

import dlpipe.runtime.metadata as runtime_metadata


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"torch": str(torch.__version__), "onnx": onnx.__version__}
    try:
        out["dlpipe"] = version("dlpipe")
    except PackageNotFoundError:  # running from a source tree that is not installed
        out["dlpipe"] = "unknown"
    return out


def build_metadata(*, task: str, model: str, labels: list[str], preprocessing: dict[str, Any], inputs: list[str],
                   outputs: list[str], dynamic_axes: dict[str, dict[int, str]], dataset: str | None = None,
                   metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """The metadata document of a freshly exported fp32 model."""
    return {"format_version": runtime_metadata.FORMAT_VERSION, "task": task, "model": model, "labels": labels,
            "preprocessing": preprocessing, "inputs": inputs, "outputs": outputs,
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic_axes.items()},
            "dataset": dataset, "metrics": metrics or {}, "precision": "fp32", "versions": _versions()}


def write_metadata(model: onnx.ModelProto, doc: dict[str, Any]) -> None:
    """Store ``doc`` under the ``dlpipe`` key, replacing an earlier one."""
    keep = [p for p in model.metadata_props if p.key != runtime_metadata.METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=runtime_metadata.METADATA_KEY, value=json.dumps(doc, sort_keys=True))


def read_metadata(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The ``dlpipe`` document of an ONNX model, or None."""
    for p in model.metadata_props:
        if p.key == runtime_metadata.METADATA_KEY:
            return json.loads(p.value)
    return None
