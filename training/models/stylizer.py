"""The feed-forward stylizer of Johnson et al. (2016), "Perceptual Losses for Real-Time Style Transfer and
Super-Resolution", with the instance normalisation of Ulyanov et al. (2016) and the nearest-neighbour
upsampling (then a convolution) of Odena et al. (2016) that avoids transposed convolutions' checkerboards.

Two stride-2 convolutions down, residual blocks, two x2 upsamplings back; every convolution reflection-pads
its input. ``width`` scales every layer (1.0 is the paper's 32-64-128 channels; the default 0.5 suits a CPU
of two cores). It takes RGB pixels in [0, 1] of any height and width that are multiples of 4 and returns the
stylized image in [0, 1] at the same size.
"""

from __future__ import annotations

import torch
from torch import nn

from dlpipe.training.models.spec import ModelSpec, OnnxContract, TrainRecipe, register_model

SIZE_MULTIPLE = 4  # two stride-2 convolutions, then two x2 upsamplings


class ConvLayer(nn.Sequential):
    """Reflection padding, then a convolution (the output keeps the size, or halves it with stride 2)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__(nn.ReflectionPad2d(kernel // 2), nn.Conv2d(cin, cout, kernel, stride))


class ResidualBlock(nn.Module):
    """conv - instance norm - ReLU - conv - instance norm, plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(ConvLayer(channels, channels, 3), nn.InstanceNorm2d(channels, affine=True),
                                  nn.ReLU(inplace=True), ConvLayer(channels, channels, 3),
                                  nn.InstanceNorm2d(channels, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UpsampleConv(nn.Sequential):
    """x2 nearest-neighbour upsampling, then a convolution."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), ConvLayer(cin, cout, kernel))


def _norm_relu(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm2d(channels, affine=True), nn.ReLU(inplace=True)]


class TransformerNet(nn.Module):
    """Johnson et al.'s image transformation network (``width`` scales its 32-64-128 channels)."""

    def __init__(self, width: float = 0.5, blocks: int = 5):
        super().__init__()
        c1, c2, c3 = (max(4, round(c * width)) for c in (32, 64, 128))
        self.net = nn.Sequential(
            ConvLayer(3, c1, 9), *_norm_relu(c1), ConvLayer(c1, c2, 3, 2), *_norm_relu(c2),
            ConvLayer(c2, c3, 3, 2), *_norm_relu(c3), *(ResidualBlock(c3) for _ in range(blocks)),
            UpsampleConv(c3, c2), *_norm_relu(c2), UpsampleConv(c2, c1), *_norm_relu(c1), ConvLayer(c1, 3, 9))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # centred input; a sigmoid keeps the output a valid image without clamping away the gradient
        return torch.sigmoid(self.net(image - 0.5))


def stylizer(*, width: float = 0.5, blocks: int = 5) -> TransformerNet:
    """The stylizer: ``width`` scales the channels (1.0: Johnson's 32-64-128), ``blocks`` residual blocks."""
    if not 0 < width <= 4 or not 0 <= blocks <= 16:
        raise ValueError(f"width must be in (0, 4] and blocks in [0, 16], got {width} and {blocks}")
    return TransformerNet(width=width, blocks=blocks)


STYLIZER_CONTRACT = OnnxContract(
    inputs={"image": {0: "batch", 2: "height", 3: "width"}},
    outputs={"stylized": {0: "batch", 2: "height", 3: "width"}},
    atol=1e-4, rtol=1e-3, size_multiple=SIZE_MULTIPLE)

register_model(ModelSpec(
    name="stylizer", task="stylization", builder=stylizer, default_dataset="shapes-scenes",
    contract=STYLIZER_CONTRACT,
    # bench/style_transfer.py trains on photo crops instead (3 epochs of 1,000 128x128 crops)
    recipe=TrainRecipe(optimizer="adam", lr=1e-3, epochs=2, batch_size=4, init="default"),
    description="Johnson et al.'s feed-forward style transfer network (instance norm, residual blocks), one style"))
