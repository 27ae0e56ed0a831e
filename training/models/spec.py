"""How a model is declared: its ONNX contract, default training recipe and :class:`ModelSpec`, and
:func:`register_model`, which each model module calls for its models (looked up through
:mod:`dlpipe.training.registry`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class OnnxContract:
    """How a model is exported and what its exported graph promises (optimum's ``OnnxConfig``).

    Attributes:
        inputs: Input names, with their symbolic dynamic axes (axis index -> name).
        outputs: Output names, with their symbolic dynamic axes.
        opset: Default ONNX opset.
        atol: Absolute tolerance of the parity check against PyTorch.
        rtol: Relative tolerance of the parity check.
        exporter: ``dynamo`` (torch.export based, the default) or ``torchscript``.
        size_multiple: Height and width must be multiples of this (fully convolutional models).
    """

    inputs: dict[str, dict[int, str]]
    outputs: dict[str, dict[int, str]]
    opset: int = 18
    atol: float = 1e-4
    rtol: float = 1e-3
    exporter: str = "dynamo"
    size_multiple: int = 1

    @property
    def dynamic_size(self) -> bool:
        """Whether the image height and width are dynamic axes."""
        first = next(iter(self.inputs.values()))
        return 2 in first and 3 in first


@dataclass(frozen=True)
class TrainRecipe:
    """Default hyper-parameters used by ``dlpipe train`` when the user does not override them."""

    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 128
    weight_decay: float = 0.0
    init: str = "he"


@dataclass(frozen=True)
class ModelSpec:
    """Everything every stage needs to know about one registered model.

    Attributes:
        name: Registry name (``dlpipe train NAME``).
        task: Task key shared with the runtime's predictor table (``classification``...).
        builder: Keyword-only function returning an ``nn.Module``.
        default_dataset: Dataset used when none is given.
        contract: The ONNX export contract.
        recipe: Default training hyper-parameters.
        description: One line for ``dlpipe models``.
        defaults: Builder keyword arguments that are not derived from the dataset.
    """

    name: str
    task: str
    builder: Callable[..., nn.Module]
    default_dataset: str
    contract: OnnxContract
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)

    def build(self, **model_args: Any) -> nn.Module:
        """Build the module from stored or fresh model arguments."""
        return self.builder(**model_args)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry; a second model of the same name is a programming error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"a model named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec
