"""The features task: image in, a feature vector out (an RBM stack's hidden probabilities, issue 15). It trains
with its own loop (greedy contrastive divergence, :mod:`dlpipe.training.rbm`), exports one graph whose outputs
are the features and the stack's mean-field reconstruction, is judged by the reconstruction error, and its
quantized variants by how closely their features follow fp32's (cosine similarity)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlpipe.runtime.errors import InputError
from dlpipe.runtime.features import FeatureExtractor
from dlpipe.training import data as datasets
from dlpipe.training import rbm
from dlpipe.training.loop import Metric, TrainConfig, resolve_config, split_indices
from dlpipe.training.registry import get_spec
from dlpipe.training.models.rbm import RBMStack
from dlpipe.training.tasks.base import Graph, QuantizationPolicy, Task
from dlpipe.training.tasks.common import model_images, single_graph

# Lower is better: the loop of this task keeps the stack it trained, so nothing ranks epochs by it.
METRIC = Metric("recon_error", "reconstruction error")
MIN_COSINE = 0.99  # a variant's features "agree" with fp32's on an input when their cosine is at least this
# TrainConfig fields an RBM run does not take (the rest map onto RBMConfig)
_NOT_FOR_RBM = ("optimizer", "init", "batch_norm", "schedule", "augment", "label_smoothing", "resume", "init_from")
_RBM_OPTIONS = ("cd_k", "persistent")


def load_data(cfg: TrainConfig | rbm.RBMConfig, data_dir: str | None, download: bool = False) -> rbm.RBMData:
    """The run's images, normalised, split into training and validation, and the test images.

    Raises:
        InputError: a dataset of dense targets (masks, boxes): an RBM learns from whole images.
    """
    info = datasets.get_dataset(cfg.dataset)
    if info.task != "classification":  # segmentation scenes and detection boxes have no image-level dataset
        raise InputError(f"{cfg.model} learns from an image dataset (mnist, fashion-mnist, shapes); "
                         f"{cfg.dataset!r} is for {info.task}")
    images, _ = datasets.load_split(cfg.dataset, "train", data_dir, cfg.limit, download)
    x = datasets.normalize(datasets.to_nchw(images), info)
    train_idx, val_idx = split_indices(len(x), cfg.val_fraction, cfg.seed)
    test, _ = datasets.load_split(cfg.dataset, "test", data_dir, cfg.test_limit, download)
    return rbm.RBMData(x[train_idx], x[val_idx], datasets.normalize(datasets.to_nchw(test), info),
                       {"name": info.name, "labels": [], "preprocessing": info.preprocessing()})


def rbm_config(cfg: TrainConfig, **options: Any) -> rbm.RBMConfig:
    """A :class:`TrainConfig` (its recipe filled in) and the RBM's own ``options`` as an :class:`RBMConfig`."""
    given = [k for k in _NOT_FOR_RBM if getattr(cfg, k) is not None] + ["patience"] * bool(cfg.patience)
    if given:
        raise InputError(f"{cfg.model} trains with contrastive divergence; --{given[0].replace('_', '-')} does not "
                         "apply (use --epochs, --batch-size, --lr, --momentum, --weight-decay, --cd-k, --persistent)")
    resolved = resolve_config(cfg)
    hidden = (resolved.model_args or {}).get("hidden", get_spec(cfg.model).recipe.model_args.get("hidden"))
    if not isinstance(hidden, list) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise InputError(f"model argument hidden must be a list of positive widths, e.g. [500,500]; got {hidden!r}")
    return rbm.RBMConfig(model=cfg.model, dataset=resolved.dataset, out=cfg.out, hidden=hidden, epochs=resolved.epochs,
                         batch_size=resolved.batch_size, lr=resolved.lr, momentum=cfg.momentum,
                         weight_decay=resolved.weight_decay, val_fraction=cfg.val_fraction, limit=cfg.limit,
                         test_limit=cfg.test_limit, seed=cfg.seed, threads=cfg.threads, progress=cfg.progress,
                         examples=cfg.examples, **{k: v for k, v in options.items() if v is not None})


def train(cfg: TrainConfig, **options: Any) -> dict[str, Any]:
    """Train an RBM stack from a :class:`TrainConfig` (and the RBM's ``cd_k``/``persistent`` options)."""
    rcfg = rbm_config(cfg, **options)
    return rbm.train(rcfg, load_data(rcfg, cfg.data_dir, cfg.download))


def command(model: str, progress: bool = True, **options: Any) -> dict[str, Any]:
    """``dlpipe train rbm``: the command's options as a :class:`TrainConfig` and the RBM's own; options of
    other kinds of training (an environment's) are refused by name."""
    known = {f.name for f in fields(TrainConfig)}
    foreign = [k for k, v in options.items() if k not in known and k not in _RBM_OPTIONS and v not in (None, False)]
    if foreign:
        raise InputError(f"{model} trains on a dataset; --{foreign[0].replace('_', '-')} does not apply")
    return train(TrainConfig(model=model, progress=progress, **{k: v for k, v in options.items() if k in known}),
                 **{k: options.get(k) for k in _RBM_OPTIONS})


def feature_agreement(fp32: FeatureExtractor, variant: FeatureExtractor, checks: np.ndarray) -> tuple[float, float]:
    """Share of inputs whose variant features have a cosine similarity of at least :data:`MIN_COSINE` with
    fp32's, and the largest feature difference."""
    name = fp32.engine.input_names[0]
    ref = fp32.engine.run({name: checks})[fp32.feature_output].astype(np.float64)
    got = variant.engine.run({name: checks})[variant.feature_output].astype(np.float64)
    cosine = (ref * got).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-12)
    return float((cosine >= MIN_COSINE).mean()), float(np.abs(ref - got).max())


def evaluate_onnx(predictor: FeatureExtractor, model: str | Path, dataset: str, split: str = "test",
                  limit: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Reconstruction error (squared pixel error summed per image, and per pixel) of an exported feature
    model on a dataset split, through the runtime's own preprocessing."""
    del model
    images, _ = datasets.load_split(dataset, split, data_dir, limit)
    pixels, recon = predictor.reconstruct(images)
    per_image = ((pixels - recon) ** 2).reshape(len(pixels), -1).sum(1)
    return {"recon_error": float(per_image.mean()), "pixel_mse": float(per_image.mean() / pixels[0].size),
            "images": int(len(images)), "features": int(predictor.encode(images[:1]).shape[1])}


class UntiedStack(torch.nn.Module):
    """The RBM stack with its down pass on copies of the weights (``W`` transposed, as its own tensor): the
    exported graph then uses each initializer once, which the fp16 converter and int8's per-channel scales
    need (a tensor read both as ``W`` and as ``W.T`` cannot have one data type per node or one scale axis)."""

    def __init__(self, model: RBMStack):
        super().__init__()
        self.stack = model
        self.decoders = torch.nn.ModuleList()
        for layer, vbias in zip(model.layers, model.visible_biases):
            decoder = torch.nn.Linear(layer.out_features, layer.in_features)
            with torch.no_grad():
                decoder.weight.copy_(layer.weight.t())
                decoder.bias.copy_(vbias)
            self.decoders.append(decoder)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stack.visible(x)
        for i in range(len(self.stack.layers) - 1):
            h = self.stack.up(h, i)
        top = self.stack.layers[-1](h)
        # the down pass starts from its own sigmoid of the top layer, written as 0.5 (1 + tanh(z / 2)) so the
        # exporter does not merge it with the output's: a graph output that also feeds other nodes trips
        # onnxconverter-common's fp16 conversion (the output's Cast lands on the inner edge too)
        h, r = torch.sigmoid(top), 0.5 * (1 + torch.tanh(0.5 * top))
        for decoder in reversed(self.decoders):
            r = torch.sigmoid(decoder(r))
        return h, r.view(-1, *self.stack.image_shape)


def graphs(ckpt: dict[str, Any], model: RBMStack, dynamic_batch: bool) -> list[Graph]:
    """The feature graph (features and reconstruction), its weights untied, at two batch sizes."""
    return single_graph(ckpt, UntiedStack(model).eval(), dynamic_batch)


def _train_hook(cfg: TrainConfig) -> dict[str, Any]:
    return train(cfg)


TASK = Task(
    name="features", description="image in, a feature vector out (an RBM stack's hidden probabilities)",
    metric=METRIC, train=_train_hook, command=command, summary=rbm.summary, graphs=graphs,
    quantization=QuantizationPolicy(inputs=model_images, agreement=feature_agreement,
                                    agreement_name=f"share of inputs with feature cosine >= {MIN_COSINE} to fp32"),
    evaluate=evaluate_onnx, predictor=FeatureExtractor,
    report=lambda r: (f"reconstruction error {r['recon_error']:.2f} per image ({r['pixel_mse']:.4f} per pixel) "
                      f"on {r['images']} images"))

__all__ = ["TASK", "train", "command", "feature_agreement", "evaluate_onnx", "load_data", "rbm_config"]
