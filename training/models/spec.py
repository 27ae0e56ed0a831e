"""How a model is declared: its ONNX contract, default training recipe and :class:`ModelSpec`, and
:func:`register_model`, which each model module calls for its models (looked up through
:mod:`dlpipe.training.registry`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from dlpipe.runtime.errors import UsageError


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


# the settings a recipe holds: the :class:`TrainRecipe` fields a run takes (TrainConfig has each of them)
RECIPE_FIELDS = ("optimizer", "lr", "epochs", "batch_size", "weight_decay", "init", "schedule", "augment",
                 "label_smoothing", "batch_norm", "model_args")


@dataclass(frozen=True)
class TrainRecipe:
    """How ``dlpipe train MODEL`` trains when no flag says otherwise: the recipe its benchmark measured
    (issue 19), so the plain command reaches the figure the README quotes.

    Attributes:
        optimizer: Optimizer name (``dlpipe.training.loop.OPTIMIZERS``).
        lr: Peak learning rate.
        epochs: Number of epochs.
        batch_size: Mini-batch size.
        weight_decay: L2 weight decay.
        init: Weight initialisation (default, he, xavier or lecun).
        schedule: Learning-rate schedule (none, step, cosine or onecycle).
        augment: Training augmentation (``dlpipe.training.data.AUGMENTATIONS``).
        label_smoothing: Cross-entropy label smoothing of classifiers (0: none).
        batch_norm: Insert batch normalisation; the builder's own default when None.
        model_args: More builder keyword arguments.
        datasets: Per-dataset overrides of the fields above (``{"fashion-mnist": {"epochs": 30}}``).
        variants: Named recipes (``dlpipe train MODEL --recipe NAME``), each a set of overrides applied
            over the default and the dataset's override; ``default`` always exists.
        benchmark: The bench script (and result file) that measured the default recipe.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 128
    weight_decay: float = 0.0
    init: str = "he"
    schedule: str = "none"
    augment: str = "none"
    label_smoothing: float = 0.0
    batch_norm: bool | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)
    datasets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    benchmark: str = ""

    def __post_init__(self) -> None:
        for where, overrides in [*(("dataset " + k, v) for k, v in self.datasets.items()),
                                 *(("recipe " + k, v) for k, v in self.variants.items())]:
            unknown = sorted(set(overrides) - set(RECIPE_FIELDS))
            if unknown:
                raise ValueError(f"{where} sets {', '.join(unknown)}, which a recipe does not hold")

    @property
    def names(self) -> tuple[str, ...]:
        """The recipe names ``--recipe`` takes: ``default`` and the named variants."""
        return ("default", *(k for k in self.variants if k != "default"))

    def settings(self, dataset: str | None = None, recipe: str = "default") -> dict[str, Any]:
        """The training settings of ``recipe`` on ``dataset``: the default < the dataset's override < the
        named variant (so ``quick`` stays quick on every dataset).

        Raises:
            UsageError: ``recipe`` is not one of :attr:`names`.
        """
        if recipe not in self.names:
            raise UsageError(f"unknown recipe {recipe!r}; choose from {', '.join(self.names)}")
        out = {name: getattr(self, name) for name in RECIPE_FIELDS}
        for overrides in (self.datasets.get(dataset or "", {}), self.variants.get(recipe, {})):
            out.update(overrides)
        out["model_args"] = dict(out["model_args"] or {})
        return out


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
        channels_last: Train in the channels-last memory layout (NHWC): the same model and arithmetic, but
            oneDNN's convolutions and max pooling run faster on it. A training step of 128 28x28 images on one
            thread (``bench/train_layout.py``): GoogLeNet 1.87x faster (its nine pool-projection max pools took
            a third of the step), deep_convnet, resnet_small, VGG-11 and VGG-16 1.2-1.4x, AlexNet 1.08x;
            LeNet-5 1.16x, left off (a 3-minute run, and the model most tests train).
    """

    name: str
    task: str
    builder: Callable[..., nn.Module]
    default_dataset: str
    contract: OnnxContract
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False

    def recipe_for(self, dataset: str | None = None, recipe: str = "default") -> dict[str, Any]:
        """``TrainConfig`` keyword arguments of the named recipe on ``dataset`` (the model's default dataset
        when None): what ``dlpipe train MODEL [--dataset D] [--recipe R]`` runs with no other flag, and
        what the benchmark scripts train with."""
        dataset = dataset or self.default_dataset
        return {"model": self.name, "dataset": dataset, "recipe": recipe,
                **self.recipe.settings(dataset, recipe)}

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
