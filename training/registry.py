"""The one model registry: every model is declared once and every stage looks it up by name.

Modelled on torchvision's ``models/_api.py``: a dict, a function that refuses duplicates,
``list_models`` and ``get_spec``. A :class:`ModelSpec` carries what each stage needs: the
keyword-only builder, the task, the default dataset and training recipe, and the ONNX contract
(names, symbolic dynamic axes, opset, parity tolerance) that export and validation follow. The model
modules declare their specs (:mod:`dlpipe.training.models.spec`); importing them here registers them.
"""

from __future__ import annotations

from dlpipe.runtime.errors import DlpipeError
from dlpipe.training import models  # noqa: F401  (registers every built-in model)
from dlpipe.training.models.spec import _REGISTRY, ModelSpec, OnnxContract, TrainRecipe, register_model

__all__ = ["ModelSpec", "OnnxContract", "TrainRecipe", "register_model", "list_models", "get_spec",
           "UnknownModelError"]


class UnknownModelError(DlpipeError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def list_models(task: str | None = None) -> list[str]:
    """Names of the registered models, optionally only those of one task."""
    return sorted(n for n, s in _REGISTRY.items() if task in (None, s.task))


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered as ``name``.

    Raises:
        UnknownModelError: with the list of known names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None
