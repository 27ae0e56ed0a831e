"""Image classifiers from the seed texts: deep MLP, LeNet-5, the VGG-style DeepConvNet, a small ResNet.

Modules hold layers and ``forward`` only; builders are keyword-only and take the input shape from the
dataset (``in_channels``, ``image_size``) so the same architecture trains on MNIST and on the shapes
world. Weight initialisation is a training choice (``dlpipe.training.train.init_weights``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dlpipe.training.models.spec import ModelSpec, OnnxContract, TrainRecipe, register_model

# Classifiers take a fixed image size (they end in fully connected layers) and a dynamic batch.
CLASSIFIER_CONTRACT = OnnxContract(inputs={"image": {0: "batch"}}, outputs={"logits": {0: "batch"}})


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class DeepMLP(nn.Module):
    """Fully connected network: Flatten, then ``hidden`` x (Linear, [BatchNorm], ReLU, Dropout), Linear."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float, batch_norm: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h) if batch_norm else nn.Identity(), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998): C1-S2-C3-S4-C5, one hidden layer F6, output layer."""

    def __init__(self, in_channels: int, image_size: Sequence[int], num_classes: int, batch_norm: bool):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), _norm(6, batch_norm), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), _norm(16, batch_norm), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 120, 5), _norm(120, batch_norm), nn.ReLU(inplace=True),
        )
        h, w = ((s // 2 - 4) // 2 - 4 for s in image_size)
        if h < 1 or w < 1:
            raise ValueError(f"LeNet-5 needs images of at least 28x28, got {tuple(image_size)}")
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(120 * h * w, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DeepConvNet(nn.Module):
    """The textbook's VGG-style network for MNIST (99.38% test accuracy reported).

    conv3x3 16,16 | pool | 32,32 (the second pads 2) | pool | 64,64 | pool | FC 50, ReLU, Dropout 0.5 | FC.
    """

    def __init__(self, in_channels: int, image_size: Sequence[int], num_classes: int, batch_norm: bool,
                 dropout: float):
        super().__init__()

        def block(cin: int, cout: int, pad: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=pad), _norm(cout, batch_norm), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, 16), *block(16, 16), nn.MaxPool2d(2),
            *block(16, 32), *block(32, 32, pad=2), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        )
        h, w = (((s // 2 + 2) // 2) // 2 for s in image_size)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * h * w, 50), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(50, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResidualBlock(nn.Module):
    """The seed's residual block: y = relu(F(x) + x), with a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, batch_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn1 = _norm(cout, batch_norm)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=not batch_norm)
        self.bn2 = _norm(cout, batch_norm)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=not batch_norm),
                                          _norm(cout, batch_norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small ResNet: 3x3 stem, three stages of residual blocks, global average pool, linear."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], blocks_per_stage: int,
                 batch_norm: bool):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not batch_norm),
                                  _norm(widths[0], batch_norm), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stages.append(ResidualBlock(cin, width, 2 if (i > 0 and j == 0) else 1, batch_norm))
                cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def _in_features(in_channels: int, image_size: Sequence[int]) -> int:
    return in_channels * image_size[0] * image_size[1]


def dmlp(*, in_channels: int, image_size: Sequence[int], num_classes: int, hidden: Sequence[int] = (512, 256, 128),
         dropout: float = 0.2, batch_norm: bool = False) -> nn.Module:
    """Deep multi-layer perceptron."""
    return DeepMLP(_in_features(in_channels, image_size), hidden, num_classes, dropout, batch_norm)


def lenet5(*, in_channels: int, image_size: Sequence[int], num_classes: int, batch_norm: bool = False) -> nn.Module:
    """LeNet-5."""
    return LeNet5(in_channels, image_size, num_classes, batch_norm)


def deep_convnet(*, in_channels: int, image_size: Sequence[int], num_classes: int, batch_norm: bool = False,
                 dropout: float = 0.5) -> nn.Module:
    """The textbook's VGG-style deep CNN for MNIST."""
    return DeepConvNet(in_channels, image_size, num_classes, batch_norm, dropout)


def resnet_small(*, in_channels: int, image_size: Sequence[int], num_classes: int,
                 widths: Sequence[int] = (16, 32, 64), blocks_per_stage: int = 2, batch_norm: bool = True) -> nn.Module:
    """Small ResNet with identity skip connections."""
    del image_size  # global pooling: any size works; accepted so every classifier builds the same way
    return ResNetSmall(in_channels, num_classes, widths, blocks_per_stage, batch_norm)


# bench/mnist_accuracy.py's recipe, what the plain `dlpipe train deep_convnet` runs (issue 19): 40 epochs, Adam,
# cosine, affine augmentation, label smoothing 0.1: 99.63% ± 0.05 on the MNIST test set over seeds 0-2
# (bench/results/mnist_accuracy.json), issue 19's 99.6%. `book` is the textbook's 20-epoch budget without label
# smoothing (99.57% ± 0.04, mnist_accuracy_book.json); `erase` adds random erasing at 20 epochs (99.51% ± 0.04,
# mnist_accuracy_erase.json); `quick` is a smoke run.
DEEP_CONVNET_RECIPE = TrainRecipe(optimizer="adam", lr=1e-3, epochs=40, batch_size=128, schedule="cosine",
                                  augment="affine", init="he", label_smoothing=0.1,
                                  benchmark="bench/mnist_accuracy.py",
                                  variants={"quick": {"epochs": 2, "augment": "none"},
                                            "book": {"epochs": 20, "label_smoothing": 0.0},
                                            "erase": {"epochs": 20, "augment": "affine+erase"}})

# dmlp and lenet5 (issue 19): 20 epochs with a cosine schedule, horizontal flips on Fashion-MNIST; LeNet-5 also
# takes padded random crops on MNIST. Measured by bench/defaults.py (bench/results/defaults.json). `plain` is
# the earlier default (10 epochs, constant rate, no augmentation): lenet5 98.66% / 89.33%, dmlp 98.04% / 89.05%
# on MNIST / Fashion-MNIST (3 seeds each, defaults_plain.json), below LeNet-5's published 99.05%; without the
# crops LeNet-5 reached 98.94% ± 0.14 (defaults_lenet5_nocrop.json). Affine augmentation costs ~1.2 min an
# epoch on one thread here (25 min a LeNet-5 run), crops ~0.5 min, so affine is left to `--augment affine`.
_SMALL = dict(optimizer="adam", lr=1e-3, epochs=20, schedule="cosine", benchmark="bench/defaults.py",
              variants={"quick": {"epochs": 2, "augment": "none"},
                        "plain": {"epochs": 10, "schedule": "none", "augment": "none"}})
DMLP_RECIPE = TrainRecipe(**_SMALL, datasets={"fashion-mnist": {"augment": "flip"}})
LENET5_RECIPE = TrainRecipe(**_SMALL, datasets={"mnist": {"augment": "crop"}, "fashion-mnist": {"augment": "flip"}})
# resnet_small (issue 19): SGD with momentum 0.05, weight decay 5e-4, 10 epochs, now with a cosine schedule and
# the same augmentation as LeNet-5 (crops on MNIST, flips on Fashion-MNIST): 99.57% ± 0.03 on MNIST, 93.21% ±
# 0.31 on Fashion-MNIST over seeds 0-2 (bench/defaults.py, defaults.json). `plain` is the earlier default
# (constant rate, no augmentation), never measured.
RESNET_SMALL_RECIPE = TrainRecipe(optimizer="momentum", lr=0.05, epochs=10, weight_decay=5e-4, schedule="cosine",
                                  benchmark="bench/defaults.py",
                                  datasets={"mnist": {"augment": "crop"}, "fashion-mnist": {"augment": "flip"}},
                                  variants={"quick": {"epochs": 2, "augment": "none"},
                                            "plain": {"schedule": "none", "augment": "none"}})

for _name, _builder, _recipe, _description in [
    ("dmlp", dmlp, DMLP_RECIPE, "deep MLP (3 hidden layers, ReLU, dropout)"),
    ("lenet5", lenet5, LENET5_RECIPE, "LeNet-5 (C-P-C-P-C, F6, output)"),
    ("deep_convnet", deep_convnet, DEEP_CONVNET_RECIPE, "VGG-style deep CNN from the textbook (99.38% on MNIST)"),
    ("resnet_small", resnet_small, RESNET_SMALL_RECIPE,
     "small ResNet, 3 stages of residual blocks"),
]:
    register_model(ModelSpec(name=_name, task="classification", builder=_builder, default_dataset="mnist",
                             contract=CLASSIFIER_CONTRACT, recipe=_recipe, description=_description,
                             channels_last=_name in ("deep_convnet", "resnet_small")))
