"""torchvision's classification architectures and their pretrained weights, named ``torchvision:ARCH``
(``[:WEIGHTS]`` a weights name such as ``DEFAULT`` or ``IMAGENET1K_V1``, or ``[:FILE.pth]`` a state dict).

Weights are read from the local torch cache or a file the user names, never downloaded. The weights'
own ``meta`` and ``transforms()`` give the category names and the preprocessing (shorter side resized,
centre crop, mean/std), so an exported network classifies exactly as torchvision documents it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from dlpipe.runtime.errors import DataNotFoundError, InputError, ModelFileError

TORCHVISION_PREFIX = "torchvision:"


@dataclass
class Pretrained:
    """A torchvision classifier with its weights loaded: the module, the weights entry and the file read."""

    arch: str
    module: nn.Module
    weights: Any
    file: Path

    @property
    def categories(self) -> list[str]:
        return list(self.weights.meta["categories"])

    def preprocessing(self) -> dict[str, Any]:
        """The weights' ``transforms()`` as dlpipe preprocessing metadata (centre-crop policy)."""
        t = self.weights.transforms()
        crop = int(t.crop_size[0])
        return {"color": "RGB", "size": [crop, crop], "resize": str(t.interpolation.value), "scale": 1 / 255,
                "mean": list(t.mean), "std": list(t.std), "layout": "NCHW", "policy": "center-crop",
                "resize_size": int(t.resize_size[0])}


def cached_weights_file(url: str) -> Path:
    """Where ``torch.hub`` keeps the file downloaded from ``url`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _weights_and_file(arch: str, weights_name: str):
    import torchvision

    weights_enum = torchvision.models.get_model_weights(arch)
    if Path(weights_name).suffix in (".pth", ".pt"):  # a state dict the user saved
        file = Path(weights_name)
        if not file.is_file():
            raise ModelFileError(f"weights file '{file}' does not exist")
        return weights_enum.DEFAULT, file
    try:
        weights = weights_enum[weights_name]
    except KeyError:
        known = ", ".join(["DEFAULT", *weights_enum.__members__])
        raise InputError(f"torchvision has no weights {weights_name!r} for {arch}; choose from {known}") from None
    file = cached_weights_file(weights.url)
    if not file.is_file():  # never download: no network must mean a clear error, not a hang
        raise DataNotFoundError(
            f"the {weights} weights for {arch} are not in the local torch cache (looked for '{file}'); "
            f"copy {weights.url} there (or set TORCH_HOME), or pass torchvision:{arch}:FILE.pth")
    return weights, file


def load_torchvision(text: str, weights_file: str | Path | None = None) -> Pretrained:
    """The torchvision classifier ``text`` names (``torchvision:ARCH[:WEIGHTS|:FILE.pth]``), weights loaded.

    Args:
        weights_file: A state dict to load instead of the name's weights (``--weights FILE``).

    Raises:
        InputError: an unknown architecture or weights name. DataNotFoundError: named weights that
        are not in the local torch cache. ModelFileError: a weights file that is missing or does not fit.
    """
    import torchvision

    arch, _, weights_name = text.removeprefix(TORCHVISION_PREFIX).partition(":")
    archs = torchvision.models.list_models(module=torchvision.models)
    if arch not in archs:
        raise InputError(f"unknown torchvision classification architecture {arch!r}; for example "
                         f"{', '.join(a for a in archs if a.startswith(('resnet', 'mobilenet')))}")
    if weights_file is not None and weights_name:
        raise InputError(f"give the weights once: {text!r} names them and so does --weights '{weights_file}'")
    weights, file = _weights_and_file(arch, str(weights_file) if weights_file else weights_name or "DEFAULT")
    module = torchvision.models.get_model(arch, weights=None, num_classes=len(weights.meta["categories"]))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        module.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as exc:  # unpickling and shape errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"cannot load '{file}' into torchvision {arch}: {first}") from None
    return Pretrained(arch, module.eval(), weights, file)
