"""Training a stack of Bernoulli-Bernoulli RBMs greedily, layer by layer, with contrastive divergence (CD-k;
Hinton, 2002) or persistent CD (Tieleman, 2008), following Hinton's "A Practical Guide to Training Restricted
Boltzmann Machines" (UTML TR 2010-003): small random weights, visible biases at log(p / (1 - p)) of the data,
probabilities rather than samples wherever the guide says so, momentum 0.5 then 0.9, L2 weight decay on the
weights only, mini-batches of about 100.

It is its own loop (like DQN's): each layer trains on the hidden probabilities of the layers below it, and every
epoch writes a row of ``metrics.jsonl`` with the reconstruction error and the free-energy pseudo-likelihood.
After training, ``samples.png`` (Gibbs chains of the top RBM, passed down to pixels) and ``filters.png`` (the
first layer's weights) land beside ``best.pt``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from dlpipe.runtime.errors import InputError
from dlpipe.runtime.files import atomic_output
from dlpipe.training.checkpoint import checkpoint_payload, save_checkpoint
from dlpipe.training.loop import MetricsLog, start_run
from dlpipe.training.models.rbm import RBMStack
from dlpipe.training.registry import get_spec


@dataclass
class RBMConfig:
    """Everything one RBM run depends on; stored in the checkpoint."""

    model: str = "rbm"
    """Registered RBM stack."""
    dataset: str = "mnist"
    """Image dataset (its labels are not used)."""
    out: str = "runs/rbm"
    """Output folder: best.pt, metrics.jsonl, samples.png, filters.png."""
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    """Hidden units of each RBM, bottom first."""
    epochs: int = 10
    """Epochs per layer."""
    batch_size: int = 100
    """Mini-batch size."""
    lr: float = 0.01
    """Learning rate of the mean-of-batch gradient."""
    momentum: float = 0.9
    """Momentum after the first epochs (0.5 before, as the guide advises)."""
    initial_momentum: float = 0.5
    """Momentum of the first ``momentum_epochs`` epochs of each layer."""
    momentum_epochs: int = 5
    """Epochs at ``initial_momentum`` (at most half of ``epochs``)."""
    weight_decay: float = 2e-4
    """L2 weight decay of the weights (not the biases)."""
    cd_k: int = 1
    """Gibbs steps of the negative phase."""
    persistent: bool = False
    """Persistent CD: the negative chains carry on from one update to the next instead of restarting at the data."""
    val_fraction: float = 0.1
    """Share of the training images held out for the per-epoch validation figures."""
    limit: int | None = None
    """Use only the first N training images."""
    test_limit: int | None = None
    """Use only the first N test images for the final reconstruction error."""
    seed: int = 0
    """Seed for the weights, split, shuffling and Gibbs sampling."""
    threads: int | None = None
    """torch intra-op threads; torch's default when None."""
    progress: bool = True
    """Show a progress bar."""
    samples: int = 64
    """Gibbs chains drawn into samples.png (a square grid)."""
    sample_steps: int = 1000
    """Gibbs steps of each chain in the top RBM."""
    filters: int = 100
    """First-layer filters drawn into filters.png."""
    examples: int = 32
    """Validation images stored (preprocessed) in the checkpoint for export parity checks."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.cd_k < 1:
            raise InputError("epochs, batch size and cd_k must be at least 1 and the learning rate above zero")
        if not 0 <= self.momentum < 1 or not 0 <= self.initial_momentum < 1 or self.weight_decay < 0:
            raise InputError("momentum must be in [0, 1) and weight decay at least 0")
        if not 0 < self.val_fraction < 1:
            raise InputError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.samples < 1 or self.sample_steps < 0 or self.filters < 1:
            raise InputError("samples and filters must be at least 1 and sample_steps at least 0")


@dataclass(frozen=True)
class RBMData:
    """Normalised NCHW images of the run (the model maps them back to pixels) and their dataset."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    dataset: dict[str, Any]


# ------------------------------------------------------------------------------------------------ maths

def free_energy(v: torch.Tensor, model: RBMStack, index: int) -> torch.Tensor:
    """``F(v) = -b.v - sum_j softplus(c_j + W_j.v)`` of RBM ``index``, per row of ``v``."""
    layer = model.layers[index]
    return -(v @ model.visible_biases[index]) - F.softplus(layer(v)).sum(1)


@torch.no_grad()
def pseudo_likelihood(model: RBMStack, index: int, v: torch.Tensor, seed: int = 0) -> float:
    """Mean log pseudo-likelihood per input of RBM ``index`` (nats), estimated as scikit-learn's BernoulliRBM
    does: ``D * log sigmoid(F(v~) - F(v))`` with ``v~`` the input with one random unit flipped. Inputs are
    binarised at 0.5 (flipping a grey level has no meaning) and the flipped units are seeded, so figures from
    different epochs compare the same flips."""
    v = (v > 0.5).float()
    g = torch.Generator().manual_seed(seed)
    flip = torch.randint(v.shape[1], (v.shape[0],), generator=g)
    rows = torch.arange(v.shape[0])
    flipped = v.clone()
    flipped[rows, flip] = 1 - flipped[rows, flip]
    return float((v.shape[1] * F.logsigmoid(free_energy(flipped, model, index) - free_energy(v, model, index))).mean())


@torch.no_grad()
def reconstruction_error(model: RBMStack, index: int, v: torch.Tensor) -> float:
    """Mean squared error per input (summed over units) of RBM ``index``'s mean-field reconstruction of ``v``."""
    return float(((v - model.down(model.up(v, index), index)) ** 2).sum(1).mean())


@torch.no_grad()
def contrastive_divergence(model: RBMStack, index: int, v0: torch.Tensor, k: int, chain: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[float, torch.Tensor]:
    """Put the CD-k (or, given the persistent ``chain``'s visible states, PCD-k) estimate of the negative
    log-likelihood's gradient into RBM ``index``'s ``.grad``s, for an optimizer step.

    Hidden states are sampled while the chain runs and probabilities are used for the last step and the
    statistics; visible units are probabilities (Hinton's guide, sections 3.1-3.4).

    Returns:
        The batch's reconstruction error (mean-field, from the data) and the chain's new visible samples (PCD).
    """
    layer, vbias = model.layers[index], model.visible_biases[index]
    h0 = model.up(v0, index)
    h_prob = h0 if chain is None else model.up(chain, index)
    for _ in range(k):
        v_prob = model.down(torch.bernoulli(h_prob, generator=generator), index)
        h_prob = model.up(v_prob, index)
    n = v0.shape[0]
    layer.weight.grad = -(h0.t() @ v0 - h_prob.t() @ v_prob) / n
    layer.bias.grad = -(h0 - h_prob).mean(0)
    vbias.grad = -(v0 - v_prob).mean(0)
    error = float(((v0 - model.down(h0, index)) ** 2).sum(1).mean())
    return error, torch.bernoulli(v_prob, generator=generator)


@torch.no_grad()
def layer_input(model: RBMStack, index: int, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """The visible probabilities RBM ``index`` trains on: the images' pixels passed up the layers below."""
    out = []
    for part in x.split(batch):
        v = model.visible(part)
        for i in range(index):
            v = model.up(v, i)
        out.append(v)
    return torch.cat(out)


@torch.no_grad()
def stack_error(model: RBMStack, x: torch.Tensor, batch: int = 2048) -> float:
    """Mean squared pixel error per image (summed over pixels) of the whole stack's up-down reconstruction."""
    total = 0.0
    for part in x.split(batch):
        total += float(((model.visible(part) - model(part)[1].flatten(1)) ** 2).sum())
    return total / max(len(x), 1)


@torch.no_grad()
def gibbs_samples(model: RBMStack, start: torch.Tensor, steps: int, seed: int = 0) -> torch.Tensor:
    """Images the model dreams: Gibbs chains of the top RBM started from the top-level representation of
    ``start`` images, ``steps`` alternating samples long, then a mean-field pass down to the pixels."""
    g = torch.Generator().manual_seed(seed)
    top = len(model.layers) - 1
    v = layer_input(model, top, start)
    for _ in range(steps):
        v = torch.bernoulli(model.down(torch.bernoulli(model.up(v, top), generator=g), top), generator=g)
    v = model.down(model.up(v, top), top)
    for i in reversed(range(top)):
        v = model.down(v, i)
    return v.view(-1, *model.image_shape)


# --------------------------------------------------------------------------------------------- the loop

def _optimizer(model: RBMStack, index: int, cfg: RBMConfig) -> torch.optim.SGD:
    """SGD with momentum over RBM ``index``; weight decay on ``W`` only (the guide leaves biases alone)."""
    layer = model.layers[index]
    return torch.optim.SGD([{"params": [layer.weight], "weight_decay": cfg.weight_decay},
                            {"params": [layer.bias, model.visible_biases[index]], "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.initial_momentum)


def _train_layer(model: RBMStack, index: int, data: RBMData, cfg: RBMConfig, bar: tqdm, log: MetricsLog,
                 history: list[dict[str, Any]]) -> None:
    """Train RBM ``index`` for ``cfg.epochs`` on the probabilities of the layers below; one row per epoch."""
    v_train, v_val = layer_input(model, index, data.train), layer_input(model, index, data.val)
    p = v_train.mean(0).clamp(1e-3, 1 - 1e-3)
    model.visible_biases[index].data.copy_(torch.log(p / (1 - p)))  # the guide's section 8
    optimizer, g = _optimizer(model, index, cfg), torch.Generator().manual_seed(cfg.seed + index)
    chain = (torch.bernoulli(v_train[:cfg.batch_size], generator=g) if cfg.persistent else None)
    warm = min(cfg.momentum_epochs, cfg.epochs // 2)
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["momentum"] = cfg.initial_momentum if epoch < warm else cfg.momentum
        start, errors = time.perf_counter(), []
        for batch in torch.randperm(len(v_train), generator=g).split(cfg.batch_size):
            v0 = v_train[batch]
            persistent = chain[:len(v0)] if chain is not None else None
            error, sampled = contrastive_divergence(model, index, v0, cfg.cd_k, persistent, g)
            if chain is not None:
                chain[:len(v0)] = sampled
            optimizer.step()
            errors.append(error)
            bar.update(len(v0))
            bar.set_postfix(layer=index + 1, recon=f"{sum(errors) / len(errors):.2f}", refresh=False)
        row = {"layer": index + 1, "epoch": epoch + 1, "train_recon_error": sum(errors) / len(errors),
               "val_recon_error": reconstruction_error(model, index, v_val),
               "val_pseudo_likelihood": pseudo_likelihood(model, index, v_val, cfg.seed),
               "momentum": optimizer.param_groups[0]["momentum"], "lr": cfg.lr,
               "seconds": time.perf_counter() - start}
        history.append(row)
        log.write(row)
        bar.write(f"layer {index + 1}/{len(model.layers)} epoch {epoch + 1}/{cfg.epochs}: reconstruction error "
                  f"{row['train_recon_error']:.3f} val {row['val_recon_error']:.3f}, pseudo-likelihood "
                  f"{row['val_pseudo_likelihood']:.2f}", file=sys.stderr)


def save_grids(model: RBMStack, start: torch.Tensor, cfg: RBMConfig, out: Path) -> dict[str, str]:
    """``samples.png`` (a square grid of Gibbs-chain samples) and ``filters.png`` (the first layer's weights,
    each scaled to its own range) in ``out``, each written atomically."""
    side = max(1, math.isqrt(cfg.samples))
    start = start.repeat(math.ceil(cfg.samples / len(start)), 1, 1, 1)[:cfg.samples]  # chains diverge as they sample
    samples = gibbs_samples(model, start, cfg.sample_steps, cfg.seed)
    weights = model.layers[0].weight[:cfg.filters].detach().view(-1, *model.image_shape)
    paths = {}
    for name, images, nrow, scale in (("samples", samples, side, False),
                                      ("filters", weights, max(1, math.isqrt(len(weights))), True)):
        grid = make_grid(images, nrow=nrow, padding=2, normalize=scale, scale_each=scale, pad_value=1.0)
        with atomic_output(out / f"{name}.png") as tmp:
            save_image(grid, tmp, format="png")
        paths[name] = str(out / f"{name}.png")
    return paths


def train(cfg: RBMConfig, data: RBMData) -> dict[str, Any]:
    """Train ``cfg.hidden`` RBMs greedily on ``data``; write best.pt (the trained stack), metrics.jsonl and the
    sample and filter grids under ``cfg.out``.

    Returns:
        Paths, the per-epoch history, the stack's reconstruction error on the validation and test images, the
        top RBM's last pseudo-likelihood and the training time.
    """
    out = start_run(cfg)
    started = time.perf_counter()
    info = data.dataset["preprocessing"]
    model_args = {"in_channels": int(data.train.shape[1]), "image_size": list(data.train.shape[2:]),
                  "hidden": [int(h) for h in cfg.hidden], "image_mean": list(info["mean"]),
                  "image_std": list(info["std"])}
    model = get_spec(cfg.model).build(**model_args)
    if not isinstance(model, RBMStack):
        raise InputError(f"{cfg.model} is not an RBM stack")
    log, history = MetricsLog(out / "metrics.jsonl"), []
    bar = tqdm(total=len(data.train) * cfg.epochs * len(cfg.hidden), unit="img", disable=not cfg.progress,
               desc=f"{cfg.model}/{cfg.dataset}", dynamic_ncols=True)
    for index in range(len(cfg.hidden)):
        _train_layer(model, index, data, cfg, bar, log, history)
    bar.close()
    metrics = {"val_recon_error": stack_error(model, data.val), "test_recon_error": stack_error(model, data.test),
               "val_pseudo_likelihood": history[-1]["val_pseudo_likelihood"]}
    grids = save_grids(model, data.val, cfg, out)
    seconds = time.perf_counter() - started
    payload = checkpoint_payload(model=cfg.model, task="features", model_args=model_args, config=asdict(cfg),
                                 dataset=data.dataset, examples=data.val[:cfg.examples].clone())
    save_checkpoint({**payload, "state_dict": model.state_dict(), "epoch": cfg.epochs * len(cfg.hidden),
                     "metric": "val_recon_error", "metrics": {**metrics, "train_seconds": seconds},
                     "history": history}, out / "best.pt")
    return {"best": str(out / "best.pt"), "log": str(log.path), **grids, "history": history, **metrics,
            "train_seconds": seconds, "layers": len(cfg.hidden), "cd_k": cfg.cd_k, "persistent": cfg.persistent}


def summary(result: dict[str, Any]) -> str:
    """What ``dlpipe train rbm`` prints."""
    method = f"{'P' if result['persistent'] else ''}CD-{result['cd_k']}"
    return (f"{result['layers']} RBM layer{'s' * (result['layers'] != 1)} ({method}): reconstruction error "
            f"{result['val_recon_error']:.2f} (validation), {result['test_recon_error']:.2f} (test) per image; "
            f"top pseudo-likelihood {result['val_pseudo_likelihood']:.2f}\n"
            f"samples: {result['samples']}\nfilters: {result['filters']}\ncheckpoint: {result['best']}\n"
            f"next: dlpipe export {result['best']} --out features.onnx, or dlpipe train dbn --init-from "
            f"{result['best']}")
