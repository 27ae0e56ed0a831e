"""Autoencoders (issue 15): the textbook's stacked fully connected autoencoder (Hinton & Salakhutdinov,
2006; Goodfellow et al., *Deep Learning*, ch. 14), a convolutional denoising autoencoder (Vincent et al.,
2008) and a convolutional variational autoencoder (Kingma & Welling, 2014) with a ``beta`` weight on its KL
term (Higgins et al., 2017).

Every autoencoder has an ``encoder`` (image -> code; the VAE's gives the latent mean and log-variance) and a
``decoder`` (code -> reconstruction logits); the ``reconstruction`` task exports them as two graphs
(:class:`EncoderGraph`, :class:`DecoderGraph`), the decoder ending in a sigmoid so it returns an image in
[0, 1]. Inputs are the dataset's normalised images (as its classifiers see them), so the encoder's layers
carry over to :func:`ae_classifier`, whose ``encoder`` has the same names and shapes (``dlpipe train
ae_classifier --init-from dae/best.pt``).

The noise a model is trained against (``noise``, ``noise_level``) and the VAE's ``beta`` are builder
arguments kept on the module, so ``--model-arg noise=masking`` chooses them and the checkpoint remembers.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dlpipe.training.models.spec import ModelSpec, OnnxContract, TrainRecipe, register_model

# Corruptions a denoising autoencoder learns to undo; the level is the Gaussian noise's standard deviation
# (pixels in [0, 1]) or the share of pixels set to 0/1 (salt-and-pepper) or to 0 (masking).
NOISES = ("none", "gaussian", "salt-pepper", "masking")

ENCODER_CONTRACT = OnnxContract(inputs={"image": {0: "batch"}}, outputs={"code": {0: "batch"}},
                                exporter="torchscript")
VAE_ENCODER_CONTRACT = OnnxContract(inputs={"image": {0: "batch"}},
                                    outputs={"code": {0: "batch"}, "logvar": {0: "batch"}}, exporter="torchscript")
DECODER_CONTRACT = OnnxContract(inputs={"code": {0: "batch"}}, outputs={"image": {0: "batch"}},
                                exporter="torchscript")
CLASSIFIER_CONTRACT = OnnxContract(inputs={"image": {0: "batch"}}, outputs={"logits": {0: "batch"}})


def _check_noise(noise: str, level: float) -> None:
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; choose from {', '.join(NOISES)}")
    if not 0 <= level <= (1 if noise in ("salt-pepper", "masking") else 10):
        raise ValueError(f"noise level {level} is out of range for {noise} noise")


def fc_encoder(in_features: int, hidden: Sequence[int], code: int) -> nn.Sequential:
    """Flatten, then ``hidden`` x (Linear, ReLU), then Linear to the code (no activation)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, code))


def fc_decoder(code: int, hidden: Sequence[int], channels: int, image_size: Sequence[int]) -> nn.Sequential:
    """The mirror of :func:`fc_encoder`: Linear+ReLU layers back to the pixels' logits."""
    layers: list[nn.Module] = []
    width = code
    for h in reversed(hidden):
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    h, w = image_size
    return nn.Sequential(*layers, nn.Linear(width, channels * h * w), nn.Unflatten(1, (channels, h, w)))


def _grid(image_size: Sequence[int], levels: int) -> tuple[int, int]:
    h, w = image_size
    if h % 2 ** levels or w % 2 ** levels:
        raise ValueError(f"a convolutional autoencoder of {levels} stride-2 stages needs a height and width that "
                         f"are multiples of {2 ** levels}, got {h}x{w}")
    return h // 2 ** levels, w // 2 ** levels


def conv_encoder(in_channels: int, image_size: Sequence[int], widths: Sequence[int], code: int) -> nn.Sequential:
    """Stride-2 3x3 convolutions with ReLU (each halves the side), flattened, Linear to the code."""
    layers: list[nn.Module] = []
    channels = in_channels
    for w in widths:
        layers += [nn.Conv2d(channels, w, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        channels = w
    gh, gw = _grid(image_size, len(widths))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * gh * gw, code))


def conv_decoder(code: int, channels: int, image_size: Sequence[int], widths: Sequence[int]) -> nn.Sequential:
    """Linear to the encoder's last feature map, then stride-2 4x4 transposed convolutions back up."""
    gh, gw = _grid(image_size, len(widths))
    top = widths[-1]
    layers: list[nn.Module] = [nn.Linear(code, top * gh * gw), nn.ReLU(inplace=True), nn.Unflatten(1, (top, gh, gw))]
    chain = [*reversed(widths), channels]
    for a, b in zip(chain, chain[1:]):
        layers.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1))
        if b != channels:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """``encoder`` -> code -> ``decoder``; ``forward`` returns the reconstruction's logits."""

    variational = False

    def __init__(self, encoder: nn.Module, decoder: nn.Module, noise: str, noise_level: float):
        super().__init__()
        _check_noise(noise, noise_level)
        self.encoder, self.decoder = encoder, decoder
        self.noise, self.noise_level = noise, noise_level

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> codes (N x code)."""
        return self.encoder(x)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Codes -> images in [0, 1]."""
        return torch.sigmoid(self.decoder(code))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class VariationalAutoencoder(Autoencoder):
    """The encoder gives the mean and log-variance of q(z|x); training samples z by the reparameterisation
    z = mean + exp(logvar / 2) * eps, evaluation decodes the mean. ``forward`` returns (logits, mean, logvar)."""

    variational = True

    def __init__(self, encoder: nn.Module, decoder: nn.Module, noise: str, noise_level: float, beta: float):
        super().__init__(encoder, decoder, noise, noise_level)
        if beta < 0:
            raise ValueError(f"beta must be at least 0, got {beta}")
        self.beta = beta

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (latent mean, latent log-variance)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training else mean
        return self.decoder(z), mean, logvar


class EncoderGraph(nn.Module):
    """The exported encoder: image -> code (the VAE: latent mean and log-variance)."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        return self.model.encode(image)


class DecoderGraph(nn.Module):
    """The exported decoder: code -> image in [0, 1]."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.model = model

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.model.decode(code)


class EncoderClassifier(nn.Module):
    """An autoencoder's ``encoder`` (same layer names, so ``--init-from`` copies it) and a classifier head."""

    def __init__(self, encoder: nn.Module, code: int, num_classes: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(code, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def ae(*, in_channels: int, image_size: Sequence[int], hidden: Sequence[int] = (512, 256), code: int = 64,
       noise: str = "none", noise_level: float = 0.0) -> nn.Module:
    """Stacked fully connected autoencoder: pixels -> ``hidden`` -> ``code`` and back (mirrored)."""
    h, w = image_size
    return Autoencoder(fc_encoder(in_channels * h * w, hidden, code), fc_decoder(code, hidden, in_channels, image_size),
                       noise, noise_level)


def dae(*, in_channels: int, image_size: Sequence[int], widths: Sequence[int] = (32, 64), code: int = 64,
        noise: str = "gaussian", noise_level: float = 0.3) -> nn.Module:
    """Convolutional denoising autoencoder, trained to restore images corrupted by ``noise``."""
    return Autoencoder(conv_encoder(in_channels, image_size, widths, code),
                       conv_decoder(code, in_channels, image_size, widths), noise, noise_level)


def vae(*, in_channels: int, image_size: Sequence[int], widths: Sequence[int] = (32, 64), latent: int = 16,
        beta: float = 1.0, noise: str = "none", noise_level: float = 0.0) -> nn.Module:
    """Convolutional variational autoencoder with a ``latent``-dimensional Gaussian latent and N(0, I) prior."""
    return VariationalAutoencoder(conv_encoder(in_channels, image_size, widths, 2 * latent),
                                  conv_decoder(latent, in_channels, image_size, widths), noise, noise_level, beta)


def ae_classifier(*, in_channels: int, image_size: Sequence[int], num_classes: int, arch: str = "conv",
                  widths: Sequence[int] = (32, 64), hidden: Sequence[int] = (512, 256), code: int = 64,
                  dropout: float = 0.2) -> nn.Module:
    """A classifier whose ``encoder`` is ``dae``'s (``arch="conv"``) or ``ae``'s (``arch="fc"``) with the same
    defaults, so it starts from a trained autoencoder with ``--init-from``."""
    if arch == "conv":
        encoder = conv_encoder(in_channels, image_size, widths, code)
    elif arch == "fc":
        encoder = fc_encoder(in_channels * image_size[0] * image_size[1], hidden, code)
    else:
        raise ValueError(f"arch must be 'conv' (dae's encoder) or 'fc' (ae's), got {arch!r}")
    return EncoderClassifier(encoder, code, num_classes, dropout)


# bench/autoencoders.py's recipe (10,000 MNIST images: ae 18.8 dB, dae 22.3 dB, vae 19.1 dB test PSNR)
_RECIPE = dict(optimizer="adam", lr=2e-3, epochs=5, batch_size=64, init="default",
               benchmark="bench/autoencoders.py", variants={"quick": {"epochs": 1}})
for _name, _builder, _contract, _description in [
        ("ae", ae, ENCODER_CONTRACT, "stacked fully connected autoencoder (encoder + decoder graphs)"),
        ("dae", dae, ENCODER_CONTRACT, "convolutional denoising autoencoder: gaussian, salt-pepper or masking noise"),
        ("vae", vae, VAE_ENCODER_CONTRACT, "convolutional variational autoencoder (beta-VAE option); generates")]:
    register_model(ModelSpec(name=_name, task="reconstruction", builder=_builder, default_dataset="mnist",
                             contract=_contract, recipe=TrainRecipe(**_RECIPE), description=_description))

register_model(ModelSpec(name="ae_classifier", task="classification", builder=ae_classifier, default_dataset="mnist",
                         contract=CLASSIFIER_CONTRACT,
                         recipe=TrainRecipe(optimizer="adam", lr=1e-3, epochs=20, batch_size=64, init="default",
                                            benchmark="bench/autoencoder_pretraining.py",
                                            variants={"quick": {"epochs": 2}}),
                         description="classifier on an autoencoder's encoder (--init-from its best.pt)"))
