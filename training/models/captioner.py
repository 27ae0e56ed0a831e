"""Show and Tell (Vinyals et al., 2015): a CNN encodes the image, an LSTM generates the sentence.

The encoder reuses the registry's small ResNet (its stem and residual stages); its feature map is
pooled to a coarse grid (4x4 by default) and flattened, not pooled globally, so the embedding keeps
*where* things are (the captions say "left of" and "above"), and projected to the LSTM's initial
hidden and cell state. The decoder embeds the previous word, runs one LSTM layer and projects to the
vocabulary.

Exported as two graphs (:class:`CaptionEncoder`, :class:`CaptionDecoderStep`; the task table's
``captioning`` declaration lists them): :meth:`Captioner.encode` (image -> state)
and :meth:`Captioner.step` (previous token and state -> next-token log-probabilities and state).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlpipe.training.models.classifiers import ResNetSmall
from dlpipe.training.models.spec import ModelSpec, OnnxContract, TrainRecipe, register_model

ENCODER_CONTRACT = OnnxContract(inputs={"image": {0: "batch"}}, outputs={"h": {0: "batch"}, "c": {0: "batch"}},
                                atol=1e-4, exporter="torchscript")
DECODER_CONTRACT = OnnxContract(inputs={"token": {0: "batch"}, "h_in": {0: "batch"}, "c_in": {0: "batch"}},
                                outputs={"log_probs": {0: "batch"}, "h_out": {0: "batch"}, "c_out": {0: "batch"}},
                                atol=1e-4, exporter="torchscript")


class Captioner(nn.Module):
    """CNN encoder -> LSTM initial state; word embedding -> LSTM -> vocabulary logits."""

    def __init__(self, in_channels: int, image_size: Sequence[int], vocab_size: int, embed_dim: int, hidden: int,
                 widths: Sequence[int], blocks_per_stage: int, grid: int, dropout: float, pad_id: int):
        super().__init__()
        backbone = ResNetSmall(in_channels, 1, widths, blocks_per_stage, batch_norm=True)
        self.features = nn.Sequential(backbone.stem, backbone.stages)
        del image_size  # the grid below makes the encoder independent of the input size
        self.image_embed = nn.Sequential(nn.AdaptiveAvgPool2d(grid), nn.Flatten(), nn.Dropout(dropout),
                                         nn.Linear(widths[-1] * grid * grid, 2 * hidden))
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Linear(hidden, vocab_size)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N x C x H x W) -> initial LSTM hidden and cell state (N x hidden each)."""
        h, c = self.image_embed(self.features(images)).chunk(2, dim=1)
        return torch.tanh(h), c

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: images and input tokens (N x T, starting with <bos>) -> logits (N x T x vocab)."""
        h, c = self.encode(images)
        out, _ = self.lstm(self.embed(tokens), (h.unsqueeze(0), c.unsqueeze(0)))
        return self.project(self.dropout(out))

    def step(self, token: torch.Tensor, h: torch.Tensor, c: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoding step: previous tokens (N) and state -> next-token log-probabilities (N x vocab), state."""
        out, (h, c) = self.lstm(self.embed(token).unsqueeze(1), (h.unsqueeze(0), c.unsqueeze(0)))
        return F.log_softmax(self.project(out[:, 0]), dim=-1), h[0], c[0]


class CaptionEncoder(nn.Module):
    """The encoder graph: image -> initial LSTM state."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(image)


class CaptionDecoderStep(nn.Module):
    """The decoder-step graph: previous token and state -> next-token log-probabilities and state."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, h_in: torch.Tensor, c_in: torch.Tensor):
        return self.model.step(token, h_in, c_in)


def captioner(*, in_channels: int, image_size: Sequence[int], vocab_size: int, embed_dim: int = 64,
              hidden: int = 192, widths: Sequence[int] = (16, 32, 64), blocks_per_stage: int = 1, grid: int = 4,
              dropout: float = 0.1, pad_id: int = 0) -> nn.Module:
    """Show-and-Tell captioner over the small ResNet backbone; its last feature map is pooled to a
    ``grid`` x ``grid`` layout (the feature map's side must be a multiple of it for the export)."""
    return Captioner(in_channels, image_size, vocab_size, embed_dim, hidden, widths, blocks_per_stage, grid, dropout,
                     pad_id)


register_model(ModelSpec(name="captioner", task="captioning", builder=captioner, default_dataset="shapes-captions",
                         # bench/captioning.py's recipe (beam BLEU-4 0.947 on 1,000 held-out scenes, issue 4)
                         contract=ENCODER_CONTRACT, recipe=TrainRecipe(optimizer="adam", lr=3e-3, epochs=20,
                                                                       batch_size=64, init="default",
                                                                       schedule="onecycle",
                                                                       benchmark="bench/captioning.py",
                                                                       variants={"quick": {"epochs": 2}}),
                         description="Show and Tell: CNN encoder + LSTM decoder (two ONNX graphs)"))
