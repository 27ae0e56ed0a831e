"""Training and scoring of the autoencoders (issue 15), as plain functions on the shared loop.

* Data: a classification dataset's images without their labels (mnist, fashion-mnist, shapes). The
  encoder sees them normalised as the dataset's classifiers do; the target is the clean image in [0, 1].
* Corruption (:func:`corrupt`) in pixel space before normalisation: Gaussian noise, salt-and-pepper or
  masking noise (Vincent et al., 2008), as the model's ``noise`` / ``noise_level`` arguments say.
* Loss: per-pixel binary cross-entropy of the reconstruction; the VAE's negative ELBO with ``beta`` on its
  KL term (summed over pixels and latent dimensions, averaged over images).
* Metrics: PSNR (mean of per-image PSNR, data range 1) and SSIM (scikit-image's ``structural_similarity``
  with the Gaussian window of Wang et al., 2004); for the VAE the ELBO in nats per image. ``best.pt`` is
  chosen on validation PSNR of reconstructions from inputs corrupted with the model's own noise.

``dlpipe train ae|dae|vae`` arrives here through the task table (:mod:`dlpipe.training.tasks.reconstruction`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dlpipe.runtime.errors import InputError
from dlpipe.runtime.images import preprocess
from dlpipe.training import data as datasets
from dlpipe.training.loop import Metric, TaskRun, TrainConfig, split_indices

METRIC = Metric("psnr", "PSNR (dB)", (("loss", "val_loss"), ("psnr", "val PSNR")))
# The corruptions every evaluation reports (type, level), whatever noise the model was trained on.
EVAL_NOISES = (("gaussian", 0.2), ("gaussian", 0.4), ("salt-pepper", 0.1), ("salt-pepper", 0.2), ("masking", 0.25),
               ("masking", 0.5))
PSNR_TOLERANCE_DB = 0.5  # a quantized variant's mean PSNR may fall at most this far below fp32's
_EVAL_SEED = 1234  # the same noise for every epoch's validation and every variant's evaluation


def corrupt(pixels: torch.Tensor, noise: str, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [0, 1] with ``noise``: ``gaussian`` (N(0, level^2) added, clipped), ``salt-pepper`` (a share
    ``level`` of the values set to 0 or 1 at random), ``masking`` (a share ``level`` set to 0) or ``none``."""
    if noise == "none" or level == 0:
        return pixels
    if noise == "gaussian":
        return (pixels + level * torch.randn(pixels.shape, generator=generator)).clamp(0, 1)
    hit = torch.rand(pixels.shape, generator=generator) < level
    if noise == "salt-pepper":
        salt = (torch.rand(pixels.shape, generator=generator) < 0.5).to(pixels.dtype)
        return torch.where(hit, salt, pixels)
    if noise == "masking":
        return torch.where(hit, torch.zeros_like(pixels), pixels)
    raise InputError(f"unknown noise {noise!r}; choose from gaussian, salt-pepper, masking, none")


def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of images against references, both N x ... in [0, 1] (capped at 100 dB)."""
    mse = ((images.astype(np.float64) - reference) ** 2).reshape(len(images), -1).mean(1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def mean_ssim(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean SSIM of N x C x H x W images in [0, 1] against references (scikit-image's ``structural_similarity``,
    Gaussian window sigma 1.5 as Wang et al., 2004). An image's SSIM is the mean over its channels, so the mean
    over images is the mean over every (image, channel) plane: one call with the planes as channels."""
    from skimage.metrics import structural_similarity

    h, w = images.shape[-2:]
    return float(structural_similarity(images.reshape(-1, h, w).astype(np.float64),
                                       reference.reshape(-1, h, w).astype(np.float64), data_range=1.0, channel_axis=0,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


def _normaliser(info) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1)
    return torch.tensor(info.mean).view(shape).float(), torch.tensor(info.std).view(shape).float()


def vae_terms(model: nn.Module, inputs: torch.Tensor, clean: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: the reconstruction's negative log-likelihood (Bernoulli, nats), the KL divergence of q(z|x)
    from N(0, I), and the reconstruction logits decoded from one reparameterised sample."""
    mean, logvar = model.encode(inputs)
    eps = torch.randn(mean.shape, generator=generator) if generator is not None else torch.randn_like(mean)
    logits = model.decoder(mean + torch.exp(0.5 * logvar) * eps)
    nll = F.binary_cross_entropy_with_logits(logits, clean, reduction="none").flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(1)
    return nll, kl, logits


def reconstruction_loss(model: nn.Module, inputs: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Training loss: mean per-pixel cross-entropy; a VAE's negative ELBO with ``beta`` x KL per image."""
    if getattr(model, "variational", False):
        nll, kl, _ = vae_terms(model, inputs, clean)
        return (nll + model.beta * kl).mean()
    return F.binary_cross_entropy_with_logits(model(inputs), clean)


def train_one_epoch(model: nn.Module, images: torch.Tensor, loader: DataLoader, info, optimizer, scheduler=None,
                    progress: tqdm | None = None, transform=None) -> dict[str, float]:
    """One pass over uint8 ``images`` in the loader's order, each batch corrupted with the model's noise."""
    model.train()
    mean, std = _normaliser(info)
    total, seen, start = 0.0, 0, time.perf_counter()
    for idx in loader:
        batch = images[idx]
        if transform is not None:
            batch = torch.stack([transform(img) for img in batch])
        clean = batch.float() / 255
        noisy = corrupt(clean, model.noise, model.noise_level)
        loss = reconstruction_loss(model, (noisy - mean) / std, clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(idx)
        seen += len(idx)
        if progress is not None:
            progress.update(len(idx))
            progress.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
    seconds = time.perf_counter() - start
    return {"train_loss": total / max(seen, 1), "images_per_s": seen / seconds if seconds > 0 else math.nan,
            "seconds": seconds}


@torch.no_grad()
def score(model: nn.Module, images: torch.Tensor, info, with_ssim: bool = False,
          batch_size: int = 500) -> dict[str, float]:
    """Loss, PSNR (from inputs with the model's own noise, seeded) and clean PSNR of uint8 ``images``; SSIM of
    the clean reconstructions with ``with_ssim``; for a VAE the ELBO (nats per image, one seeded sample)."""
    model.eval()
    mean, std = _normaliser(info)
    generator = torch.Generator().manual_seed(_EVAL_SEED)
    sums: dict[str, float] = {}
    for first in range(0, len(images), batch_size):
        clean = images[first:first + batch_size].float() / 255
        noisy = corrupt(clean, model.noise, model.noise_level, generator)
        figures = {"loss": reconstruction_loss(model, (noisy - mean) / std, clean).item() * len(clean),
                   "psnr": psnr(model.decode(model_code(model, (noisy - mean) / std)).numpy(), clean.numpy()).sum()}
        out = model.decode(model_code(model, (clean - mean) / std)).numpy()
        figures["clean_psnr"] = psnr(out, clean.numpy()).sum()
        if with_ssim:
            figures["ssim"] = mean_ssim(out, clean.numpy()) * len(clean)
        if getattr(model, "variational", False):
            nll, kl, _ = vae_terms(model, (clean - mean) / std, clean, generator)
            figures["elbo"] = float(-(nll + kl).sum())
        for k, v in figures.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / max(len(images), 1) for k, v in sums.items()}


def model_code(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The code an autoencoder decodes at evaluation: its code, or a VAE's latent mean."""
    code = model.encode(inputs)
    return code[0] if isinstance(code, tuple) else code


def prepare(cfg: TrainConfig, spec, dataset_info: Callable[[str], Any] = datasets.get_dataset) -> TaskRun:
    """The dataset's training images split into training and validation (labels unused), batched by index;
    validation and test score PSNR (and the test SSIM, and ELBO for a VAE). ``dataset_info`` looks the
    dataset up (the task's declaration refuses those that are not of whole images)."""
    del spec
    info = dataset_info(cfg.dataset)
    images, _ = datasets.load_split(cfg.dataset, "train", cfg.data_dir, cfg.limit, cfg.download)
    x = datasets.to_nchw(images)
    train_idx, val_idx = split_indices(len(x), cfg.val_fraction, cfg.seed)
    train_x, val_x = x[train_idx], x[val_idx]
    loader = DataLoader(range(len(train_x)), batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    transform = datasets.augmentation(cfg.augment, info.image_size)
    mean, std = _normaliser(info)

    def test(model: nn.Module) -> dict[str, float]:
        test_images, _ = datasets.load_split(cfg.dataset, "test", cfg.data_dir, cfg.test_limit, cfg.download)
        return score(model, datasets.to_nchw(test_images), info, with_ssim=True)

    n_examples = min(max(cfg.examples, 19), len(val_x))
    return TaskRun(
        model_args={"in_channels": info.channels, "image_size": list(info.image_size)},
        train_loader=loader, images_per_epoch=len(train_x),
        train_epoch=lambda model, opt, sched, bar: train_one_epoch(model, train_x, loader, info, opt, sched, bar,
                                                                   transform),
        validate=lambda model: score(model, val_x, info), test=test,
        examples=(val_x[:n_examples].float() / 255 - mean) / std,
        dataset={"name": info.name, "labels": [], "preprocessing": info.preprocessing()})


# ------------------------------------------------------------------------------ exported models

def _reconstructions(predictor, batch: np.ndarray, noise: str, level: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean pixels, noisy pixels, reconstructions from the noisy input) of a preprocessed batch."""
    clean = predictor.pixels(batch)
    noisy = corrupt(torch.from_numpy(clean), noise, level, torch.Generator().manual_seed(seed)).numpy()
    out = predictor.reconstruct_batch(predictor.normalise(noisy) if noise != "none" else batch)
    return clean, noisy, out


def runtime_elbo(predictor, batch: np.ndarray, seed: int = _EVAL_SEED) -> np.ndarray:
    """Per-image ELBO (nats) of a VAE package on a preprocessed batch: one reparameterised sample, Bernoulli
    likelihood of the clean pixels under the decoder's probabilities, minus the KL from N(0, I)."""
    mean, logvar = predictor.codes(batch)[:2]
    eps = np.random.default_rng(seed).standard_normal(mean.shape).astype(np.float32)
    probs = np.clip(predictor.decode(mean + np.exp(0.5 * logvar) * eps).astype(np.float64), 1e-7, 1 - 1e-7)
    x = predictor.pixels(batch).astype(np.float64)
    log_lik = (x * np.log(probs) + (1 - x) * np.log(1 - probs)).reshape(len(x), -1).sum(1)
    kl = -0.5 * (1 + logvar - mean ** 2 - np.exp(logvar)).sum(1)
    return log_lik - kl


def evaluate_autoencoder(predictor, dataset: str, split: str = "test", limit: int | None = None,
                         data_dir: str | None = None, batch_size: int = 500) -> dict[str, Any]:
    """Reconstruction PSNR and SSIM of a package (any variant) on a dataset split, through the runtime from
    raw images; per corruption of :data:`EVAL_NOISES` (and the model's own) the noisy input's PSNR, the
    output's, the gain and the output's SSIM; for a VAE the ELBO (nats per image)."""
    images, _ = datasets.load_split(dataset, split, data_dir, limit)
    batch = preprocess(list(images), predictor.info.preprocessing)
    own = predictor.manifest.get("model_args", {})
    noises = [("none", 0.0), *EVAL_NOISES]
    if own.get("noise", "none") != "none" and (own["noise"], own["noise_level"]) not in EVAL_NOISES:
        noises.append((own["noise"], float(own["noise_level"])))
    start, rows = time.perf_counter(), []
    for k, (noise, level) in enumerate(noises):
        parts = [_reconstructions(predictor, batch[i:i + batch_size], noise, level, _EVAL_SEED + k + i)
                 for i in range(0, len(batch), batch_size)]
        clean, noisy, out = (np.concatenate(p) for p in zip(*parts))
        rows.append({"noise": noise, "level": level, "input_psnr": float(psnr(noisy, clean).mean()),
                     "output_psnr": float(psnr(out, clean).mean()), "output_ssim": mean_ssim(out, clean)})
        rows[-1]["gain"] = rows[-1]["output_psnr"] - rows[-1]["input_psnr"]
    report = {"psnr": rows[0]["output_psnr"], "ssim": rows[0]["output_ssim"], "noisy": rows[1:],
              "images": int(len(batch))}
    if predictor.variational:
        report["elbo"] = float(np.concatenate([runtime_elbo(predictor, batch[i:i + batch_size])
                                               for i in range(0, len(batch), batch_size)]).mean())
    report["seconds"] = time.perf_counter() - start
    return report


def psnr_agreement(fp32, variant, checks: np.ndarray) -> tuple[float, float]:
    """The quantization gate of autoencoders: 1.0 when the variant's mean reconstruction PSNR on the check
    inputs is within :data:`PSNR_TOLERANCE_DB` of fp32's, else 0.0; and the PSNR drop in dB."""
    target = fp32.pixels(checks)
    drop = float(psnr(fp32.reconstruct_batch(checks), target).mean() - psnr(variant.reconstruct_batch(checks),
                                                                            target).mean())
    return (1.0 if drop <= PSNR_TOLERANCE_DB else 0.0), drop
