"""DCGAN (Radford et al., 2016, "Unsupervised representation learning with deep convolutional generative
adversarial networks"), and its class-conditional variant (Mirza & Osindero, 2014, with the labels as
one-hot vectors concatenated to the latent and, as constant planes, to the discriminator's input).

The generator is a stack of transposed convolutions with batch norm and ReLU and a tanh output; the
discriminator strided convolutions with LeakyReLU(0.2) and batch norm (not on its first layer), no pooling
and no fully connected hidden layers. Weights are initialised N(0, 0.02) (batch-norm scales N(1, 0.02)).
``width`` is the paper's ``ngf``/``ndf`` (64); a smaller one trains on two CPU cores.

The generator maps an image size ``s0 * 2**k`` (``s0`` = 7 for 28x28, 4 for 32x32 and 64x64) from a
``1 x 1`` latent by one ``s0 x s0`` transposed convolution, then ``k`` stride-2 ones.
"""

from __future__ import annotations

import torch
from torch import nn

from dlpipe.training.models.spec import ModelSpec, OnnxContract, TrainRecipe, register_model

# The exported generator: latent (with the one-hot class appended for conditional models) -> image in [0, 1].
GENERATOR_CONTRACT = OnnxContract(inputs={"latent": {0: "batch"}}, outputs={"image": {0: "batch"}},
                                  atol=1e-4, rtol=1e-3)


def _levels(image_size: int) -> tuple[int, int]:
    """``(s0, k)`` with ``image_size == s0 * 2**k`` and ``s0`` the first size of 4..7 reached by halving."""
    size, k = image_size, 0
    while size > 7 and size % 2 == 0:
        size, k = size // 2, k + 1
    if size < 3 or size > 7 or k < 1:
        raise ValueError(f"DCGAN needs an image size of 3..7 times a power of two (28, 32, 64...), got {image_size}")
    return size, k


class Generator(nn.Module):
    """Latent ``N x (latent_size + num_classes)`` -> image ``N x C x H x W`` in [-1, 1] (tanh)."""

    def __init__(self, in_dim: int, channels: int, image_size: int, width: int):
        super().__init__()
        s0, k = _levels(image_size)
        widths = [width * 2 ** (k - 1 - i) for i in range(k)]
        layers: list[nn.Module] = [nn.ConvTranspose2d(in_dim, widths[0], s0, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """Image ``N x C x H x W`` in [-1, 1] (with ``num_classes`` one-hot planes appended) -> one logit per image."""

    def __init__(self, in_channels: int, image_size: int, width: int):
        super().__init__()
        s0, k = _levels(image_size)
        widths = [width * 2 ** i for i in range(k)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(widths[-1], 1, s0, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)[:, 0]


class DCGAN(nn.Module):
    """A generator and its discriminator. ``forward`` is the generator (what is exported); the
    discriminator travels in the same checkpoint for resuming.

    Attributes:
        latent_size: Size of the noise vector.
        num_classes: Classes a conditional model is asked for (0: unconditional).
    """

    def __init__(self, *, in_channels: int, image_size: int, latent_size: int, width: int, num_classes: int):
        super().__init__()
        self.latent_size, self.num_classes, self.in_channels, self.image_size = (latent_size, num_classes,
                                                                                 in_channels, image_size)
        self.generator = Generator(latent_size + num_classes, in_channels, image_size, width)
        self.discriminator = Discriminator(in_channels + num_classes, image_size, width)
        self.apply(init_dcgan)

    def condition(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The generator's input: ``z`` with the one-hot ``labels`` appended (conditional models)."""
        if not self.num_classes:
            return z
        return torch.cat([z, nn.functional.one_hot(labels, self.num_classes).to(z.dtype)], 1)

    def discriminate(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """D's logits for ``images`` (in [-1, 1]), with the class planes appended for conditional models."""
        if self.num_classes:
            planes = nn.functional.one_hot(labels, self.num_classes).to(images.dtype)[:, :, None, None]
            images = torch.cat([images, planes.expand(-1, -1, *images.shape[-2:])], 1)
        return self.discriminator(images)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.generator(latent)


class GeneratorExport(nn.Module):
    """The generator alone, its tanh output mapped to [0, 1] (what ``dlpipe export`` writes)."""

    def __init__(self, model: DCGAN):
        super().__init__()
        self.generator = model.generator

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return (self.generator(latent) + 1) * 0.5


@torch.no_grad()
def init_dcgan(m: nn.Module) -> None:
    """The paper's initialisation: convolution weights N(0, 0.02), batch-norm scales N(1, 0.02), shifts 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def dcgan(*, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, latent_size: int = 100,
          width: int = 32, conditional: bool = False) -> DCGAN:
    """An unconditional DCGAN (``num_classes`` only records the dataset's; ``conditional=True`` uses it)."""
    return DCGAN(in_channels=in_channels, image_size=image_size, latent_size=latent_size, width=width,
                 num_classes=num_classes if conditional else 0)


def cdcgan(*, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, latent_size: int = 100,
           width: int = 32, conditional: bool = True) -> DCGAN:
    """The class-conditional DCGAN: ``generate --class LABEL`` asks it for one class."""
    return dcgan(in_channels=in_channels, image_size=image_size, num_classes=num_classes, latent_size=latent_size,
                 width=width, conditional=conditional)


GAN_BUILDERS = (dcgan, cdcgan)  # what the GAN training loop trains

# Adam 2e-4, beta1 0.5 (the paper's); batch 128. The epochs are those bench/dcgan.py measured on MNIST (1 thread).
_RECIPES = {"dcgan": TrainRecipe(optimizer="adam", lr=2e-4, epochs=14, batch_size=128, init="default",
                                 variants={"quick": {"epochs": 1}}, benchmark="bench/dcgan.py"),
            "cdcgan": TrainRecipe(optimizer="adam", lr=2e-4, epochs=5, batch_size=128, init="default",
                                  variants={"quick": {"epochs": 1}}, benchmark="bench/dcgan.py")}

for _name, _builder, _what in (("dcgan", dcgan, "DCGAN"), ("cdcgan", cdcgan, "class-conditional DCGAN")):
    register_model(ModelSpec(name=_name, task="generation", builder=_builder, default_dataset="mnist",
                             contract=GENERATOR_CONTRACT, recipe=_RECIPES[_name],
                             description=f"{_what}: transposed-conv generator, strided-conv discriminator "
                                         "(28x28 grey or 64x64 colour)"))
