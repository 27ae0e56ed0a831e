"""FCN (Long, Shelhamer and Darrell, 2015): a VGG-style backbone whose fully connected layers are
replaced by equivalent convolutions, a 1x1 class scorer, and transposed convolutions initialised to
bilinear interpolation, with skip connections from pool4 (FCN-16s) and pool3 (FCN-8s), and, for small
objects, on to pool2 (FCN-4s) and pool1 (FCN-2s).

Two ways to join a skip (``fusion``): ``sum``, the paper's, adds a 1x1 class scorer of the earlier stage
to the upsampled class scores; ``conv``, as FCN's descendants do (U-Net, DeepLabv3+'s decoder), carries
``decoder_width`` feature channels instead of class scores, concatenates the earlier stage's features and
convolves them (3x3, ReLU) before the next upsampling. A sum of linear scorers cannot tell which side
of an edge a shape is on when colours vary, so ``sum`` stays blurred at object boundaries.

Fully convolutional: any input whose height and width are multiples of 32 (the runtime pads).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dlpipe.training.models.spec import ModelSpec, OnnxContract, TrainRecipe, register_model

STRIDE = 32  # five 2x2 poolings
# Skips per variant, and the chain they follow: (upsampler, scorer, backbone stage it scores). FCN-8s is
# the paper's finest; 4s and 2s carry the same idea to pool2 and pool1 for objects only a few output
# cells wide (shapes 8-16 px across at 64x64: an oracle stride-8 score map caps mean IoU near 0.74).
SKIPS = {"32s": 0, "16s": 1, "8s": 2, "4s": 3, "2s": 4}
_SKIP_CHAIN = (("up2", "score_pool4", 3), ("up2_pool4", "score_pool3", 2), ("up2_pool3", "score_pool2", 1),
               ("up2_pool2", "score_pool1", 0))


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """ConvTranspose2d weight (channels x channels x k x k) that upsamples each channel bilinearly."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float32)
    filt = (1 - (og - center).abs() / factor)
    filt2d = filt[:, None] * filt[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = filt2d
    return weight


def _upsample(channels: int, factor: int) -> nn.ConvTranspose2d:
    up = nn.ConvTranspose2d(channels, channels, kernel_size=2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return up


FUSIONS = ("sum", "conv")


class FCN(nn.Module):
    """FCN-32s / 16s / 8s / 4s / 2s over a five-stage VGG-style backbone."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], fc_width: int, variant: str,
                 dropout: float, batch_norm: bool, fusion: str = "sum", decoder_width: int = 32):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
        if len(widths) != 5:
            raise ValueError(f"widths must give the five backbone stages, got {len(widths)}")

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if batch_norm else nn.Identity()

        stages, cin = [], in_channels
        for w in widths:
            stages.append(nn.Sequential(nn.Conv2d(cin, w, 3, padding=1), norm(w), nn.ReLU(inplace=True),
                                        nn.Conv2d(w, w, 3, padding=1), norm(w), nn.ReLU(inplace=True),
                                        nn.MaxPool2d(2)))
            cin = w
        self.stages = nn.ModuleList(stages)
        # fc6/fc7 of the classifier, as convolutions (fc6 sees a 3x3 window of pool5)
        self.fc = nn.Sequential(nn.Conv2d(cin, fc_width, 3, padding=1), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
                                nn.Conv2d(fc_width, fc_width, 1), nn.ReLU(inplace=True), nn.Dropout2d(dropout))
        self.variant, self.fusion = variant, fusion
        self.skips = SKIPS[variant]
        if fusion == "sum":
            self.score = nn.Conv2d(fc_width, num_classes, 1)
            # each skip: upsample the running score 2x and add a 1x1 scorer of an earlier pooling stage
            for up, skip, stage in _SKIP_CHAIN[:self.skips]:
                setattr(self, skip, nn.Conv2d(widths[stage], num_classes, 1))
                setattr(self, up, _upsample(num_classes, 2))
                nn.init.zeros_(getattr(self, skip).weight)  # skips start silent, as in the paper
                nn.init.zeros_(getattr(self, skip).bias)
        else:
            # each skip: upsample the running features 2x, concatenate the earlier stage's, 3x3 conv + ReLU
            self.reduce = nn.Conv2d(fc_width, decoder_width, 1)
            self.ups = nn.ModuleList(_upsample(decoder_width, 2) for _ in range(self.skips))
            self.fuse = nn.ModuleList(
                nn.Sequential(nn.Conv2d(decoder_width + widths[stage], decoder_width, 3, padding=1),
                              norm(decoder_width), nn.ReLU(inplace=True)) for _, _, stage in _SKIP_CHAIN[:self.skips])
            self.score = nn.Conv2d(decoder_width, num_classes, 1)
        self.up_final = _upsample(num_classes, STRIDE >> self.skips)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        x = self.fc(x)
        if self.fusion == "sum":
            score = self.score(x)
            for up, skip, stage in _SKIP_CHAIN[:self.skips]:
                score = getattr(self, up)(score) + getattr(self, skip)(feats[stage])
        else:
            x = self.reduce(x)
            for up, fuse, (_, _, stage) in zip(self.ups, self.fuse, _SKIP_CHAIN):
                x = fuse(torch.cat([up(x), feats[stage]], dim=1))
            score = self.score(x)
        return self.up_final(score)


def _fcn(variant: str):
    def build(*, in_channels: int, num_classes: int, image_size: Sequence[int] | None = None,
              widths: Sequence[int] = (16, 32, 64, 96, 128), fc_width: int = 256, dropout: float = 0.2,
              batch_norm: bool = False, fusion: str = "sum", decoder_width: int = 32) -> nn.Module:
        del image_size  # fully convolutional
        return FCN(in_channels, num_classes, widths, fc_width, variant, dropout, batch_norm, fusion, decoder_width)

    build.__name__ = build.__qualname__ = f"fcn{variant}"
    build.__doc__ = f"FCN-{variant} segmentation network."
    return build


SEGMENTATION_CONTRACT = OnnxContract(
    inputs={"image": {0: "batch", 2: "height", 3: "width"}},
    outputs={"logits": {0: "batch", 2: "height", 3: "width"}},
    atol=2e-4, size_multiple=STRIDE)

fcn32s, fcn16s, fcn8s, fcn4s, fcn2s = (_fcn(v) for v in SKIPS)
# bench/segmentation.py's recipe (FCN-2s, conv fusion: mean IoU 0.912 on shapes-scenes in 6 epochs, 0.853 on
# mnist-scenes in 20, issue 3); the other depths train the same way (not benchmarked in this configuration)
FCN_RECIPE = TrainRecipe(optimizer="adam", lr=3e-3, epochs=6, batch_size=32, init="he", schedule="onecycle",
                         batch_norm=True, model_args={"fusion": "conv"}, datasets={"mnist-scenes": {"epochs": 20}},
                         benchmark="bench/segmentation.py", variants={"quick": {"epochs": 1}})
for _variant, _builder in zip(SKIPS, (fcn32s, fcn16s, fcn8s, fcn4s, fcn2s)):
    register_model(ModelSpec(name=f"fcn{_variant}", task="segmentation", builder=_builder,
                             default_dataset="shapes-scenes", contract=SEGMENTATION_CONTRACT,
                             recipe=FCN_RECIPE,
                             description=f"FCN-{_variant}: VGG-style backbone, conv fc6/fc7, bilinear upsampling"
                                         + ("" if _variant == "32s" else " with skips")))
