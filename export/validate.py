"""Parity validation of an exported model against PyTorch (optimum's ``_run_validation``): output
names, shapes and values within the declared tolerance, with typed errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import DlpipeError


class ParityError(DlpipeError):
    """The exported model does not behave like the PyTorch model."""


class OutputNamesMismatch(ParityError):
    """The ONNX graph's outputs are not the ones the contract declares."""


class ShapeMismatch(ParityError):
    """An ONNX output has another shape than PyTorch's."""


class ToleranceExceeded(ParityError):
    """ONNX and PyTorch outputs differ by more than the declared tolerance."""


@dataclass(frozen=True)
class ParityResult:
    """One output compared at one input batch."""

    output: str
    batch: int
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    atol: float
    rtol: float

    def as_dict(self) -> dict:
        return asdict(self)


def validate_parity(onnx_path: str | Path, module: nn.Module, inputs: Sequence[tuple[torch.Tensor, ...]],
                    output_names: Sequence[str], atol: float, rtol: float) -> list[ParityResult]:
    """Run ``module`` and the ONNX file on each input tuple and compare every output.

    Args:
        inputs: Input tuples; use at least two of different batch sizes (or resolutions) to prove
            the dynamic axes.

    Raises:
        OutputNamesMismatch, ShapeMismatch, ToleranceExceeded.
    """
    engine = Engine(onnx_path, device="cpu")
    if list(engine.output_names) != list(output_names):
        raise OutputNamesMismatch(f"'{onnx_path}' has outputs {engine.output_names}, the contract declares "
                                  f"{list(output_names)}")
    results = []
    module.eval()
    for args in inputs:
        with torch.no_grad():
            expected = module(*args)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(engine.input_names, args)}
        actual = engine.run(feeds)
        for name, ref, got in zip(output_names, expected, actual):
            ref = ref.detach().cpu().numpy()
            if ref.shape != got.shape:
                raise ShapeMismatch(f"'{onnx_path}': output '{name}' has shape {list(got.shape)}, PyTorch gives "
                                    f"{list(ref.shape)} (input shapes {[list(a.shape) for a in args]})")
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            max_abs = float(diff.max()) if diff.size else 0.0
            max_rel = float((diff / np.maximum(np.abs(ref), 1e-6)).max()) if diff.size else 0.0
            result = ParityResult(name, int(args[0].shape[0]), tuple(got.shape), max_abs, max_rel, atol, rtol)
            if not np.allclose(got, ref, atol=atol, rtol=rtol):
                raise ToleranceExceeded(f"'{onnx_path}': output '{name}' differs from PyTorch by up to {max_abs:.3g} "
                                        f"(atol {atol}, rtol {rtol}) at input shapes {[list(a.shape) for a in args]}")
            results.append(result)
    return results
