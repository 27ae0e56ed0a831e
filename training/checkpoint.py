"""Checkpoints that rebuild themselves: the registry name and model arguments sit beside the weights
(nanoGPT's ``model_args``), so any later stage needs only the file. Loaded with ``weights_only=True``.

Every checkpoint is made by :func:`checkpoint_payload` and written by :func:`save_checkpoint`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlpipe.runtime.errors import DlpipeError, ModelFileError
from dlpipe.runtime.files import atomic_output
from dlpipe.training import tracking
from dlpipe.training.registry import get_spec

FORMAT = "dlpipe.checkpoint"
VERSION = 1
# Older checkpoints kept the best validation score under the metric-specific names below.
_OLD_BEST_KEYS = ("best_val_acc", "best_val_bleu")


def checkpoint_payload(*, model: str, task: str, model_args: dict[str, Any], config: dict[str, Any],
                       dataset: dict[str, Any], examples: torch.Tensor | None, **extra: Any) -> dict[str, Any]:
    """What every checkpoint holds besides its weights and training state.

    Args:
        model: Registry name; with ``model_args`` it rebuilds the network.
        task: The task's name in the task table.
        config: The run's configuration (plain values only: it is loaded back with ``weights_only``).
        dataset: ``name``, ``labels`` and ``preprocessing`` (the runtime's input contract).
        examples: Real preprocessed inputs for the export's parity checks.
        extra: Task-specific content (a vocabulary, an environment, ...).
    """
    tracking.log_params({"model": model, "task": task, "dataset": dataset.get("name"), **config,
                         "model_args": model_args})  # the run's tracker, when --log asks for one
    return {"model": model, "task": task, "model_args": model_args, "config": _plain(config), "dataset": dataset,
            "examples": examples, "versions": {"torch": str(torch.__version__)}, **extra}


def _plain(doc: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists, so the config loads back under ``weights_only=True``."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in doc.items()}


def best_score(ckpt: dict[str, Any]) -> float:
    """The best validation score a ``last.pt`` recorded (also from checkpoints written before the rename)."""
    for key in ("best_val_score", *_OLD_BEST_KEYS):
        if key in ckpt:
            return float(ckpt[key])
    return -float("inf")


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` atomically (temporary file, then rename) so a crash leaves no half file."""
    with atomic_output(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    return Path(path)


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
    except pickle.UnpicklingError:
        # torch's message advises loading with weights_only=False, which would run code from the file: never
        # pass that on (issue 12).
        raise ModelFileError(f"'{path}' is not a dlpipe checkpoint (not a readable PyTorch checkpoint: it holds "
                             "objects other than tensors and plain values, or is damaged)") from None
    except Exception as exc:  # zip, pickle and storage errors come in many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = type(exc).__name__ if "weights_only" in reason else f"{type(exc).__name__}: {reason}"
        raise ModelFileError(f"'{path}' is not a dlpipe checkpoint (not a readable PyTorch checkpoint: "
                             f"{reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelFileError(f"'{path}' is not a dlpipe checkpoint (no '{FORMAT}' header); "
                             "for your own nn.Module use 'dlpipe export --builder module:function --weights FILE'")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], source: str | Path | None = None) -> nn.Module:
    """Rebuild the registered model from a loaded checkpoint, weights included, in eval mode.

    Args:
        source: The checkpoint's file, named in errors.

    Raises:
        ModelFileError: no registered model, arguments its builder refuses, or weights that do not fit it.
    """
    name = f"'{source}'" if source else "the checkpoint"
    try:
        spec = get_spec(ckpt["model"])
        model = spec.build(**ckpt["model_args"])
        model.load_state_dict(ckpt["state_dict"])
    except DlpipeError as exc:  # an unknown model name
        raise ModelFileError(f"{name}: {exc}") from None
    # a damaged or hand-edited checkpoint: arguments the builder refuses, weights that do not fit the model
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError, OverflowError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelFileError(f"{name} does not rebuild its model ({type(exc).__name__}: {first})") from None
    return model.eval()
