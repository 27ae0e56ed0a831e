"""torchvision classification architectures as one registered model, so a network fine-tuned from
published weights (``dlpipe finetune --from torchvision:resnet18:DEFAULT``) rebuilds from its checkpoint
through the registry like any other: ``model_args`` names the architecture beside the usual
``in_channels``, ``image_size`` and ``num_classes``.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from dlpipe.runtime.errors import InputError
from dlpipe.training.models.classifiers import CLASSIFIER_CONTRACT
from dlpipe.training.models.spec import ModelSpec, TrainRecipe, register_model


def torchvision_classifier(*, in_channels: int, image_size: Sequence[int], num_classes: int,
                           arch: str = "resnet18") -> nn.Module:
    """A torchvision classification architecture with ``num_classes`` outputs and random weights.

    The pretrained weights are loaded by ``dlpipe.training.finetune``; a checkpoint's own weights by
    ``model_from_checkpoint``. Nothing is ever downloaded here.

    Raises:
        InputError: an unknown architecture, or an input that is not 3-channel (the published weights
            are RGB; fine-tuning converts grayscale images instead of changing the first layer).
    """
    import torchvision

    del image_size  # the torchvision classifiers pool globally; the runtime resizes to the trained size
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise InputError(f"{arch!r} is not a torchvision classification architecture")
    if in_channels != 3:
        raise InputError(f"torchvision architectures take 3-channel images, got in_channels={in_channels}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


register_model(ModelSpec(
    name="torchvision", task="classification", builder=torchvision_classifier, default_dataset="shapes",
    contract=CLASSIFIER_CONTRACT, recipe=TrainRecipe(optimizer="momentum", lr=0.01, epochs=5, weight_decay=1e-4),
    description="a torchvision classification architecture (model_args 'arch', default resnet18) for fine-tuning",
    defaults={"arch": "resnet18"}))
