"""The ImageNet-era CNNs (issue 15), scaled for 28x28 to 64x64 inputs: AlexNet, VGG-11/16 and GoogLeNet.

Each keeps its design's defining features and takes a width multiplier (``width``) so that it trains on
two CPU cores; the layouts follow torchvision's ``alexnet``, ``vgg`` and ``googlenet`` with the channel
counts scaled and the ImageNet downsampling cut to what a small image allows:

- AlexNet (Krizhevsky et al., 2012): a large-kernel stem, ReLU, optional local response normalisation
  after the first two convolutions, overlapping 3x3/2 max pooling, and a dropout-heavy classifier of two
  wide fully connected layers.
- VGG (Simonyan and Zisserman, 2015): configurations A (11 layers) and D (16 layers), stacks of 3x3
  convolutions between 2x2 max pools, optional batch normalisation (torchvision's ``vgg*_bn``).
- GoogLeNet (Szegedy et al., 2015): nine inception modules (1x1, 3x3 and 5x5 branches behind 1x1
  reductions and a pool-projection branch, concatenated) and two auxiliary classifiers after 4a and 4d.
  In training mode ``forward`` returns ``(logits, aux1, aux2)`` (the classification task's loss adds
  0.3 x each auxiliary loss); in eval mode only the logits, so the exported graph has no auxiliary head.

Images of 48 pixels or more get a stride-2 stem (the originals' stride-4 and stride-2 stems shrink a
224-pixel image; a 28-pixel one has nothing to spare). Modules hold layers and ``forward`` only.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dlpipe.training.models.spec import ModelSpec, OnnxContract, TrainRecipe, register_model

# A fixed image size and a dynamic batch, like the other classifiers. Exported with the TorchScript exporter:
# the dynamo exporter takes 15-50 s on these graphs on a 2-core CPU (GoogLeNet's nine inception modules the
# longest), TorchScript 1-3 s, for the same operators.
CLASSIC_CONTRACT = OnnxContract(inputs={"image": {0: "batch"}}, outputs={"logits": {0: "batch"}},
                                exporter="torchscript")

# Images at least this large (height and width) get a stride-2 stem.
LARGE_IMAGE = 48


def _scaled(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


def _stem_stride(image_size: Sequence[int]) -> int:
    return 2 if min(image_size) >= LARGE_IMAGE else 1


def _check_size(name: str, image_size: Sequence[int], smallest: int = 16) -> None:
    if min(image_size) < smallest:
        raise ValueError(f"{name} needs images of at least {smallest}x{smallest}, got {tuple(image_size)}")


def _conv(cin: int, cout: int, kernel: int, batch_norm: bool, stride: int = 1) -> list[nn.Module]:
    """Convolution (padded to keep the size at stride 1), [batch norm], ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    return layers + [nn.ReLU(inplace=True)]


class _LRNFunction(torch.autograd.Function):
    """Local response normalisation as one ONNX ``LRN`` node (PyTorch's own exports as a dozen elementwise
    nodes, one of them ``k + alpha * mean(x^2)``, whose range is too narrow for int8 calibration's histogram)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        return nn.functional.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size: int, alpha: float, beta: float, k: float):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LocalResponseNorm(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` that exports to ONNX's ``LRN`` operator (the same formula: ONNX divides
    alpha by the size, as PyTorch does).

    In PyTorch the sum of squares over each window of ``size`` neighbouring channels is a 1x1 convolution
    with a fixed banded 0/1 matrix: the same sum (zero-padded at the ends, as ``local_response_norm``), but
    2-3.5x faster forward and backward on CPU than the 3-D average pool PyTorch's own uses, which took
    40% of AlexNet's training step on one thread (662 -> 511 ms a batch of 128)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _LRNFunction.apply(x, self.size, self.alpha, self.beta, self.k)
        if x.dim() != 4:
            return super().forward(x)
        channel = torch.arange(x.shape[1], device=x.device)
        offset = channel[None, :] - channel[:, None]  # row: output channel, column: the channel it sums
        band = (offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)
        window_sum = nn.functional.conv2d(x * x, band.to(x.dtype)[:, :, None, None])
        return x / (window_sum * (self.alpha / self.size) + self.k).pow(self.beta)


class AlexNet(nn.Module):
    """AlexNet: conv 7x7 (11x11/4 in the original) | [LRN] | pool | conv 5x5 | [LRN] | pool | conv 3x3 x3 |
    pool | dropout, FC, ReLU, dropout, FC, ReLU, FC (3x3/2 overlapping pools, ceil mode: 28 -> 14 -> 7 -> 3)."""

    def __init__(self, in_channels: int, image_size: Sequence[int], num_classes: int, width: float, hidden: int,
                 dropout: float, lrn: bool, batch_norm: bool):
        super().__init__()
        c1, c2, c3, c4, c5 = (_scaled(c, width) for c in (64, 192, 384, 256, 256))

        def norm() -> list[nn.Module]:  # the paper's response normalisation: n=5, alpha=1e-4, beta=0.75, k=2
            return [LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)] if lrn else []

        self.features = nn.Sequential(
            *_conv(in_channels, c1, 7, batch_norm, stride=_stem_stride(image_size)), *norm(),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            *_conv(c1, c2, 5, batch_norm), *norm(), nn.MaxPool2d(3, 2, ceil_mode=True),
            *_conv(c2, c3, 3, batch_norm), *_conv(c3, c4, 3, batch_norm), *_conv(c4, c5, 3, batch_norm),
            nn.MaxPool2d(3, 2, ceil_mode=True),
        )
        # the classifier sees the last feature map whole, as the original's 6x6x256 (torchvision pools it
        # adaptively instead; with a fixed input size the flattened size is known when the model is built)
        with torch.no_grad():
            features = self.features(torch.zeros(1, in_channels, *image_size)).numel()
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(features, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# torchvision's VGG configurations: output channels of each 3x3 convolution, "M" a 2x2 max pool
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG: stacks of 3x3 convolutions between five 2x2 max pools (ceil mode, so 28 -> 14 -> 7 -> 4 -> 2 -> 1),
    global average pooling (torchvision pools adaptively to 7x7), then FC, ReLU, dropout, FC, ReLU,
    dropout, FC."""

    def __init__(self, in_channels: int, num_classes: int, config: Sequence[int | str], width: float, hidden: int,
                 dropout: float, batch_norm: bool):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                cout = _scaled(int(item), width)
                layers += _conv(cin, cout, 3, batch_norm)
                cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Inception(nn.Module):
    """The inception module: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max pool -> 1x1, concatenated on channels.
    (torchvision's GoogLeNet uses a 3x3 kernel in its "5x5" branch; this one is the paper's 5x5.)"""

    def __init__(self, cin: int, ch1: int, red3: int, ch3: int, red5: int, ch5: int, pool_proj: int,
                 batch_norm: bool):
        super().__init__()
        self.branch1 = nn.Sequential(*_conv(cin, ch1, 1, batch_norm))
        self.branch3 = nn.Sequential(*_conv(cin, red3, 1, batch_norm), *_conv(red3, ch3, 3, batch_norm))
        self.branch5 = nn.Sequential(*_conv(cin, red5, 1, batch_norm), *_conv(red5, ch5, 5, batch_norm))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, padding=1), *_conv(cin, pool_proj, 1, batch_norm))
        self.out_channels = ch1 + ch3 + ch5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class AuxClassifier(nn.Module):
    """GoogLeNet's auxiliary classifier: 4x4 average pool, 1x1 conv 128, FC 1024, ReLU, dropout 0.7, FC."""

    def __init__(self, cin: int, num_classes: int, width: float, batch_norm: bool, dropout: float = 0.7):
        super().__init__()
        reduce, hidden = _scaled(128, width), _scaled(1024, width)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = nn.Sequential(*_conv(cin, reduce, 1, batch_norm))
        self.fc1 = nn.Linear(reduce * 16, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


# torchvision's inception settings: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection)
INCEPTION_3 = ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64))
INCEPTION_4 = ((192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
               (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128))
INCEPTION_5 = ((256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128))


class GoogLeNet(nn.Module):
    """GoogLeNet: stem (conv 3x3, conv 1x1, conv 3x3; the original's 7x7/2 and pool shrink 224-pixel images),
    inception 3a-3b | pool | 4a-4e | pool | 5a-5b, global average pool, dropout, FC; auxiliary classifiers
    on 4a and 4d in training mode only."""

    def __init__(self, in_channels: int, image_size: Sequence[int], num_classes: int, width: float, dropout: float,
                 batch_norm: bool):
        super().__init__()
        c1, c2, c3 = (_scaled(c, width) for c in (64, 64, 192))
        self.stem = nn.Sequential(*_conv(in_channels, c1, 3, batch_norm, stride=_stem_stride(image_size)),
                                  *_conv(c1, c2, 1, batch_norm), *_conv(c2, c3, 3, batch_norm),
                                  nn.MaxPool2d(3, 2, padding=1))
        cin = c3

        def stage(settings) -> nn.Sequential:
            nonlocal cin
            blocks = []
            for s in settings:
                blocks.append(Inception(cin, *(_scaled(c, width) for c in s), batch_norm=batch_norm))
                cin = blocks[-1].out_channels
            return nn.Sequential(*blocks)

        self.inception3 = stage(INCEPTION_3)
        self.pool3 = nn.MaxPool2d(3, 2, padding=1)
        self.inception4a = stage(INCEPTION_4[:1])
        self.aux1 = AuxClassifier(cin, num_classes, width, batch_norm)
        self.inception4bcd = stage(INCEPTION_4[1:4])
        self.aux2 = AuxClassifier(cin, num_classes, width, batch_norm)
        self.inception4e = stage(INCEPTION_4[4:])
        self.pool4 = nn.MaxPool2d(3, 2, padding=1)
        self.inception5 = stage(INCEPTION_5)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)  # registered last: fine-tuning's head is the last Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.inception4a(self.pool3(self.inception3(self.stem(x))))
        aux1 = self.aux1(x) if self.training else None
        x = self.inception4bcd(x)
        aux2 = self.aux2(x) if self.training else None
        x = self.inception5(self.pool4(self.inception4e(x)))
        logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if self.training:  # the auxiliary heads only shape the gradients; inference (and ONNX) never sees them
            return logits, aux1, aux2
        return logits


def alexnet(*, in_channels: int, image_size: Sequence[int], num_classes: int, width: float = 0.5,
            hidden: int = 1024, dropout: float = 0.5, lrn: bool = True, batch_norm: bool = False) -> nn.Module:
    """AlexNet scaled by ``width`` (channels 64-192-384-256-256 x width; ``hidden`` units in each of the two
    fully connected layers, 4096 in the original). ``lrn`` adds local response normalisation."""
    _check_size("AlexNet", image_size)
    return AlexNet(in_channels, image_size, num_classes, width, hidden, dropout, lrn, batch_norm)


def vgg11(*, in_channels: int, image_size: Sequence[int], num_classes: int, width: float = 0.25, hidden: int = 512,
          dropout: float = 0.5, batch_norm: bool = True) -> nn.Module:
    """VGG-11 (configuration A) with channels 64..512 x ``width``."""
    _check_size("VGG", image_size)
    return VGG(in_channels, num_classes, VGG_CONFIGS[11], width, hidden, dropout, batch_norm)


def vgg16(*, in_channels: int, image_size: Sequence[int], num_classes: int, width: float = 0.25, hidden: int = 512,
          dropout: float = 0.5, batch_norm: bool = True) -> nn.Module:
    """VGG-16 (configuration D) with channels 64..512 x ``width``."""
    _check_size("VGG", image_size)
    return VGG(in_channels, num_classes, VGG_CONFIGS[16], width, hidden, dropout, batch_norm)


def googlenet(*, in_channels: int, image_size: Sequence[int], num_classes: int, width: float = 0.25,
              dropout: float = 0.2, batch_norm: bool = True) -> nn.Module:
    """GoogLeNet (Inception v1) with every channel count x ``width``; auxiliary classifiers in training mode."""
    _check_size("GoogLeNet", image_size)
    return GoogLeNet(in_channels, image_size, num_classes, width, dropout, batch_norm)


# One recipe for the four (bench/classic_cnns.py measures it on Fashion-MNIST): the same data, epochs and
# augmentation for every model, so the table compares architectures. `quick` is a smoke run.
CLASSIC_RECIPE = TrainRecipe(optimizer="adamw", lr=2e-3, weight_decay=0.05, epochs=10, batch_size=128,
                             schedule="onecycle", augment="none",
                             datasets={"fashion-mnist": {"epochs": 15, "augment": "crop"}},
                             variants={"quick": {"epochs": 2, "augment": "none"}}, benchmark="bench/classic_cnns.py")

for _name, _builder, _description in [
    ("alexnet", alexnet, "AlexNet scaled for small images (large-kernel stem, LRN, dropout-heavy classifier)"),
    ("vgg11", vgg11, "VGG-11 (configuration A, 3x3 convolution stacks) with batch norm, width x0.25"),
    ("vgg16", vgg16, "VGG-16 (configuration D, 3x3 convolution stacks) with batch norm, width x0.25"),
    ("googlenet", googlenet, "GoogLeNet (inception modules; auxiliary classifiers in training only), width x0.25"),
]:
    register_model(ModelSpec(name=_name, task="classification", builder=_builder, default_dataset="fashion-mnist",
                             contract=CLASSIC_CONTRACT, recipe=CLASSIC_RECIPE, description=_description,
                             channels_last=True))
