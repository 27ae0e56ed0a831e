"""Checkpoints that rebuild themselves: the registry name and model arguments sit beside the weights
(nanoGPT's ``model_args``), so any later stage needs only the file. Loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlpipe.runtime.errors import ModelFileError
from dlpipe.runtime.files import publish
from dlpipe.training.registry import get_spec

FORMAT = "dlpipe.checkpoint"
VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` atomically (temporary file, then rename) so a crash leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a dlpipe checkpoint safely (tensors and plain containers only, nothing executed).

    Raises:
        ModelFileError: missing file, not a checkpoint, or not a dlpipe checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise ModelFileError(f"'{path}' is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})".split("\n")[0]) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelFileError(f"'{path}' is not a dlpipe checkpoint (no '{FORMAT}' header); "
                             "for your own nn.Module use 'dlpipe export --builder module:function --weights FILE'")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the registered model from a loaded checkpoint, weights included, in eval mode."""
    spec = get_spec(ckpt["model"])
    model = spec.build(**ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
