"""Mixed-precision training (issue 14): ``torch.autocast`` around the forward pass and the loss, bf16 on
the CPU (and CUDA), fp16 with ``torch.amp.GradScaler`` (loss scaling keeps small fp16 gradients from
underflowing). The weights, the optimizer and so every checkpoint stay float32; export and quantization
see the same fp32 model as without ``--amp``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from dlpipe.runtime.errors import UsageError

AMP_MODES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """How one run computes its forward pass and steps its optimizer.

    Attributes:
        mode: ``off`` (float32), ``bf16`` or ``fp16`` (autocast to that type).
        device_type: ``cpu`` or ``cuda``: where the run trains.
    """

    mode: str | None = "off"
    device_type: str = "cpu"
    scaler: torch.amp.GradScaler | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.mode = self.mode or "off"
        if self.mode not in AMP_MODES:
            raise UsageError(f"unknown --amp {self.mode!r}; choose from {', '.join(AMP_MODES)}")
        if self.mode == "off":
            return
        try:  # torch says itself whether autocast can run this type on this device
            with torch.autocast(self.device_type, dtype=_DTYPES[self.mode]):
                torch.ones(2, 2) @ torch.ones(2, 2)
        except (RuntimeError, AssertionError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UsageError(f"--amp {self.mode}: torch cannot autocast to {self.mode} on {self.device_type} "
                             f"here ({first}); use --amp bf16 or leave --amp out") from None
        if self.mode == "fp16":
            self.scaler = torch.amp.GradScaler(self.device_type)

    def autocast(self):
        """The context the forward pass and the loss run in (a no-op context when ``off``)."""
        if self.mode == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.mode])

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip: Iterable[nn.Parameter] | None = None,
             max_norm: float = 0.0) -> None:
        """Backward, optional gradient-norm clipping of ``clip`` to ``max_norm``, and the optimizer step;
        with fp16 the loss is scaled, the gradients unscaled before clipping, and a step with inf/NaN
        gradients skipped (GradScaler's rule)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(clip, max_norm)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if clip is not None:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(clip, max_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
