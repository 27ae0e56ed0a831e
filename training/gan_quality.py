"""How good generated images are, measured with dlpipe's own trained classifier for the dataset (issue 16).

- Fréchet distance (FID, Heusel et al., 2017) between Gaussians fitted to the classifier's penultimate
  features of generated and real images;
- kernel distance (KID, Bińkowski et al., 2018): the unbiased MMD² with the polynomial kernel
  ``k(x, y) = (x·y / d + 1)³``, averaged over random subsets (mean and standard deviation);
- the classifier's mean confidence (max softmax) on the samples, and each class's share of them (mode
  collapse shows as classes missing or crowding).

The features are those the classifier's last linear layer reads (a forward hook, so any registered
classifier works: lenet5, deep_convnet...). Samples of another size than the classifier's input are resized.
The trace of ``sqrt(S1 S2)`` comes from the eigenvalues of ``S1 S2`` (real and non-negative for two
covariance matrices), as torchmetrics computes it, instead of ``scipy.linalg.sqrtm`` (not a dependency here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.training import data as datasets
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (rows are samples): ``|mu_a - mu_b|² + Tr(Sa + Sb - 2 sqrt(Sa Sb))``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InputError(f"FID needs two sets of at least 2 feature rows of one size, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # eigenvalues of Sa Sb are those of sqrt(Sa) Sb sqrt(Sa): real, >= 0 up to rounding
    eig = np.linalg.eigvals(cov_a @ cov_b)
    trace_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: the unbiased MMD² estimate with the cubic polynomial kernel, over ``subsets`` random subsets of
    ``subset_size`` rows of each set (fewer when a set is smaller). Returns its mean and standard deviation."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise InputError("KID needs at least 2 rows in each feature set")
    d, rng, values = a.shape[1], np.random.default_rng(seed), []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(off - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


class QualityClassifier:
    """A dlpipe classifier checkpoint used as the feature extractor and judge of generated images.

    Args:
        checkpoint: A ``best.pt`` of a registered classifier trained on the generator's dataset.

    Raises:
        ModelFileError: not a classifier checkpoint, or one without a linear output layer.
    """

    def __init__(self, checkpoint: str | Path):
        self.path = Path(checkpoint)
        ckpt = load_checkpoint(self.path)
        if ckpt.get("task") != "classification":
            raise ModelFileError(f"'{self.path}' is a {ckpt.get('task')} checkpoint; the quality measures need a "
                                 "classifier trained on the generator's dataset")
        self.model = model_from_checkpoint(ckpt, self.path)
        self.dataset, self.labels = ckpt["dataset"]["name"], tuple(ckpt["dataset"]["labels"])
        pre = ckpt["dataset"]["preprocessing"]
        self.size = tuple(int(v) for v in pre["size"])
        self.mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(pre["std"], dtype=torch.float32).view(1, -1, 1, 1)
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ModelFileError(f"'{self.path}' has no linear output layer to read penultimate features from")
        self._features: list[torch.Tensor] = []
        linears[-1].register_forward_hook(lambda mod, args, out: self._features.append(args[0].flatten(1)))
        self._real: dict[tuple[str, int], np.ndarray] = {}

    def describe(self) -> dict[str, Any]:
        """Which checkpoint judges, for reports."""
        return {"checkpoint": str(self.path), "model": type(self.model).__name__, "dataset": self.dataset}

    @torch.no_grad()
    def run(self, images: np.ndarray | torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """``(features N x d, probabilities N x classes)`` of images: uint8 ``NxHxW[xC]`` or ``NxCxHxW`` floats
        in [0, 1]."""
        x = _as_unit_nchw(images)
        feats, probs = [], []
        for start in range(0, len(x), batch_size):
            part = x[start:start + batch_size]
            if tuple(part.shape[-2:]) != self.size:
                part = nn.functional.interpolate(part, size=self.size, mode="bilinear", align_corners=False,
                                                 antialias=True)
            self._features.clear()
            logits = self.model((part - self.mean) / self.std)
            feats.append(self._features[-1].numpy())
            probs.append(torch.softmax(logits, 1).numpy())
        return np.concatenate(feats), np.concatenate(probs)

    def real_features(self, split: str = "test", count: int = 10_000, data_dir: str | None = None) -> np.ndarray:
        """Features of the first ``count`` real images of the classifier's dataset (cached)."""
        key = (split, count)
        if key not in self._real:
            images, _ = datasets.load_split(self.dataset, split, data_dir, limit=count)
            self._real[key] = self.run(images)[0]
        return self._real[key]

    def score(self, samples: np.ndarray | torch.Tensor, reference: np.ndarray, kid_subsets: int = 50) -> dict[str, Any]:
        """Every quality figure of ``samples`` against the ``reference`` features (see the module)."""
        feats, probs = self.run(samples)
        kid, kid_std = kernel_distance(feats, reference, subsets=kid_subsets)
        shares = np.bincount(probs.argmax(1), minlength=len(self.labels)) / len(probs)
        uniform = 1 / len(self.labels)
        return {"fid": frechet_distance(feats, reference), "kid": kid, "kid_std": kid_std,
                "mean_confidence": float(probs.max(1).mean()), "samples": int(len(probs)),
                "class_shares": {label: round(float(s), 4) for label, s in zip(self.labels, shares)},
                "classes_present": int((shares > 0).sum()),
                "max_share_deviation": float(np.abs(shares - uniform).max() / uniform)}

    def decisions(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """The classifier's class for each image."""
        return self.run(images)[1].argmax(1)


def _as_unit_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``NxHxW[xC]`` -> float NCHW in [0, 1]; float NCHW passes through."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        return datasets.to_nchw(images).float() / 255
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).float()
    if x.ndim != 4:
        raise InputError(f"images must be N x C x H x W floats in [0, 1] or uint8 N x H x W[x C], got {list(x.shape)}")
    return x
