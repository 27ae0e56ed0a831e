"""An R-CNN-style two-stage detector (Faster R-CNN: Ren, He, Girshick and Sun, 2015) built from
torchvision's detection framework: a small VGG-style CNN backbone, a region proposal network with
anchors sized for small images, RoIAlign, and a two-layer box head that classifies each region and
regresses its box, with non-maximum suppression. torchvision does the work; this module only picks
the parts and gives the detector a single-image tensor interface that exports to ONNX.

The detector resizes every image so that its shorter side is ``min_size`` (the training images'
size), so objects keep the relative scale they had in training whatever the image's pixel size.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from dlpipe.training.models.spec import ModelSpec, OnnxContract, TrainRecipe, register_model


def _backbone(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """Conv-BN-ReLU stages; each stage but the last halves the resolution (stride 8 for four stages)."""
    layers: list[nn.Module] = []
    cin = in_channels
    for i, w in enumerate(widths):
        stride = 2 if i < len(widths) - 1 else 1
        layers += [nn.Conv2d(cin, w, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                   nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    body = nn.Sequential(*layers)
    body.out_channels = cin  # what torchvision's FasterRCNN reads
    return body


class RCNN(nn.Module):
    """Faster R-CNN over a small backbone.

    ``forward(image)`` takes one ``CxHxW`` float image in [0, 1] (any size) and returns
    ``(boxes, labels, scores)`` in the image's pixel coordinates: the exported graph's contract.
    ``losses`` (training) and ``detect`` (several images) use torchvision's list interface.

    Args:
        in_channels: 1 (grayscale) or 3 (RGB).
        num_classes: Classes including the background (index 0).
        image_mean, image_std: Normalisation applied inside the model.
        min_size, max_size: Resize bounds of torchvision's transform (shorter side, longer side).
        widths: Backbone stage widths.
        anchor_sizes: Anchor side lengths in pixels of the resized image.
        representation: Width of the two-layer box head.
    """

    def __init__(self, *, in_channels: int = 3, num_classes: int = 7, image_mean: Sequence[float] = (0.5,),
                 image_std: Sequence[float] = (0.25,), min_size: int = 64, max_size: int = 256,
                 widths: Sequence[int] = (32, 48, 64, 64), anchor_sizes: Sequence[int] = (12, 20, 32, 48),
                 representation: int = 256, score_threshold: float = 0.05, detections_per_image: int = 20):
        super().__init__()
        backbone = _backbone(in_channels, widths)
        anchors = AnchorGenerator(sizes=(tuple(anchor_sizes),), aspect_ratios=((0.5, 1.0, 2.0),))
        pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=1)
        mean = list(image_mean) * (in_channels if len(image_mean) == 1 else 1)
        std = list(image_std) * (in_channels if len(image_std) == 1 else 1)
        self.detector = FasterRCNN(
            backbone, num_classes=None, min_size=min_size, max_size=max_size, image_mean=mean, image_std=std,
            rpn_anchor_generator=anchors, box_roi_pool=pool,
            box_head=TwoMLPHead(backbone.out_channels * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, num_classes),
            rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=200,
            rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=128, box_batch_size_per_image=32,
            box_score_thresh=score_threshold, box_detections_per_img=detections_per_image)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.detector([image])[0]
        return out["boxes"], out["labels"], out["scores"]

    def losses(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """torchvision's four losses (RPN objectness and box, head classification and box) in train mode."""
        return self.detector(images, targets)

    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections for several images (each its own size), in eval mode."""
        return self.detector(images)


DETECTION_CONTRACT = OnnxContract(
    inputs={"image": {1: "height", 2: "width"}},
    outputs={"boxes": {0: "detections"}, "labels": {0: "detections"}, "scores": {0: "detections"}},
    # torch.export cannot trace torchvision's data-dependent post-processing; TorchScript tracing can
    # (torchvision's own ONNX tests export detection models this way).
    opset=17, atol=1e-3, rtol=1e-3, exporter="torchscript")


register_model(ModelSpec(
    name="rcnn", task="detection", builder=RCNN, default_dataset="shapes-boxes", contract=DETECTION_CONTRACT,
    # bench/detection.py's recipe (mAP@0.5 0.909 on shapes-boxes, 0.954 on mnist-boxes, issue 3)
    recipe=TrainRecipe(optimizer="adam", lr=2e-3, epochs=12, batch_size=16, init="default", schedule="onecycle",
                       benchmark="bench/detection.py", variants={"quick": {"epochs": 1}}),
    description="Faster R-CNN (torchvision): small CNN backbone, RPN, RoIAlign, box head, NMS"))
