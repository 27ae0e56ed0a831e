"""The generation task (issue 16): a latent (and a class) in, an image out (DCGAN). It trains with its own
adversarial loop (:mod:`dlpipe.training.gan`), exports the generator alone, and judges generated images —
for ``best.pt``, for evaluation and for fp16/int8 variants — with a classifier dlpipe trained on the same
dataset (:mod:`dlpipe.training.gan_quality`), whose checkpoint the model's metadata names."""

from __future__ import annotations

import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.runtime.generator import Generator
from dlpipe.training import gan
from dlpipe.training.gan_quality import QualityClassifier
from dlpipe.training.loop import Metric, TrainConfig
from dlpipe.training.models.dcgan import GeneratorExport
from dlpipe.training.registry import get_spec
from dlpipe.training.tasks.classification import TASK as CLASSIFICATION
from dlpipe.training.tasks.base import Graph, QuantizationPolicy, Task
from dlpipe.training.tasks.common import batch_inputs

METRIC = Metric("fid", "classifier-feature FID (lower is better)")
# The judge trained when none is given: LeNet-5 for a few epochs on the GAN's dataset.
DEFAULT_JUDGE = {"model": "lenet5", "epochs": 3}
# ``dlpipe train`` options a GAN does not use but that always arrive with their defaults
_IGNORED = ("momentum",)


def judge_checkpoint(dataset: str, out: str, data_dir: str | None, seed: int, threads: int | None,
                     progress: bool) -> str:
    """A classifier of ``dataset`` to judge the GAN: ``out/classifier/best.pt``, trained first when missing."""
    path = Path(out) / "classifier" / "best.pt"
    if not path.is_file():
        print(f"no --classifier given: training {DEFAULT_JUDGE['model']} on {dataset} to judge the samples "
              f"({path})", file=sys.stderr)
        CLASSIFICATION.train(TrainConfig(model=DEFAULT_JUDGE["model"], dataset=dataset, epochs=DEFAULT_JUDGE["epochs"],
                                          out=str(path.parent), data_dir=data_dir, seed=seed, threads=threads,
                                          progress=progress))
    return str(path)


def _train_gan(cfg: gan.GANConfig) -> dict[str, Any]:
    """Train the GAN; without a classifier, one is trained first (once the options are known to be good)."""
    if not cfg.classifier:
        resolved = gan.resolve_config(replace(cfg, classifier="-"))  # refuse bad options before training a judge
        cfg = replace(cfg, classifier=judge_checkpoint(resolved.dataset, cfg.out, cfg.data_dir, cfg.seed, cfg.threads,
                                                       cfg.progress))
    return gan.train(cfg)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """A :class:`TrainConfig` as a GAN run (a classifier to judge it is trained first under ``out/classifier``)."""
    return _train_gan(gan.GANConfig(model=cfg.model, dataset=cfg.dataset, out=cfg.out, data_dir=cfg.data_dir,
                                    download=cfg.download, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                    model_args=cfg.model_args, recipe=cfg.recipe, limit=cfg.limit, seed=cfg.seed,
                                    threads=cfg.threads, resume=cfg.resume, progress=cfg.progress))


def command(model: str, progress: bool = True, **opts: Any) -> dict[str, Any]:
    """``dlpipe train dcgan|cdcgan``: :func:`gan.train` from the command's options.

    Raises:
        InputError: an option for classifiers or DQN agents was given.
    """
    names = {f.name for f in fields(gan.GANConfig)}
    given = [k for k, v in opts.items() if k not in names and k not in _IGNORED and v not in (None, False, 0)]
    if given:
        raise InputError(f"{model} trains adversarially (Adam, beta1 0.5); --{given[0].replace('_', '-')} does not "
                         "apply (use --dataset, --epochs, --batch-size, --lr, --model-arg, --classifier, --limit)")
    return _train_gan(gan.GANConfig(model=model, progress=progress,
                                    **{k: v for k, v in opts.items() if k in names and v is not None}))


def summary(result: dict[str, Any]) -> str:
    """What ``dlpipe train dcgan`` prints."""
    last = result["history"][-1] if result["history"] else {}
    return (f"best validation FID {result['best_val_score']:.3f} (classifier features of "
            f"{result['classifier']['checkpoint']}); last epoch: loss_d {last.get('loss_d', float('nan')):.4f}, "
            f"loss_g {last.get('loss_g', float('nan')):.4f}, D(x) {last.get('d_x', float('nan')):.3f}, "
            f"D(G(z)) {last.get('d_g_z', float('nan')):.3f}\nsample grids: {result['samples']}\n"
            f"checkpoint: {result['best']}\nnext: dlpipe export {result['best']} --out generator.onnx && "
            "dlpipe generate generator.onnx --out grid.png")


def graphs(ckpt: dict[str, Any], model, dynamic_batch: bool) -> list[Graph]:
    """The generator alone (latent -> image in [0, 1]), exported on 2 stored latents, checked on 1 and 16."""
    example, checks = batch_inputs(ckpt["examples"], dynamic_batch)
    return [Graph(None, GeneratorExport(model), get_spec(ckpt["model"]).contract, example, checks)]


def metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The latent size, whether the model is conditional, and the classifier that judges its samples."""
    return {"generator": dict(ckpt["generator"]), "quality": dict(ckpt["quality"])}


def mixed_latents(generator: Generator, count: int, seed: int) -> np.ndarray:
    """``count`` generator inputs from ``seed``; a conditional model's classes in turn (equal shares)."""
    if not generator.conditional:
        return generator.latents(count, seed)
    per = -(-count // len(generator.labels))
    parts = [generator.latents(per, seed * 1000 + k, label) for k, label in enumerate(generator.labels)]
    return np.stack(parts, 1).reshape(-1, parts[0].shape[1])[:count]


def latent_inputs(model_path, source: str | None, split: str, count: int, data_dir: str | None = None,
                  offset: int = 0) -> np.ndarray:
    """Generator inputs for ``dlpipe quantize``: latents of seed 1 (calibration) or 2 (checks), or a ``.npy``."""
    from dlpipe.runtime.predictors import load

    del data_dir
    generator = load(model_path, device="cpu")
    width = generator.latent_size + len(generator.labels)
    if source and Path(source).suffix == ".npy":
        arr = np.load(source)
        if arr.ndim != 2 or arr.shape[1] != width:
            raise InputError(f"'{source}' must hold N x {width} generator inputs, got {list(arr.shape)}")
        return np.ascontiguousarray(arr[offset:offset + count], dtype=np.float32)
    if source:
        raise InputError(f"a generator calibrates on latents it draws itself or on a .npy of them, not on '{source}'")
    return mixed_latents(generator, count, seed=1 if split == "train" else 2)


_JUDGES: dict[str, QualityClassifier] = {}


def judge_of(generator: Generator) -> QualityClassifier:
    """The classifier the model's metadata names as its judge (loaded once per process).

    Raises:
        ModelFileError: the metadata names none, or the checkpoint is gone.
    """
    path = (generator.info.raw.get("quality") or {}).get("classifier")
    if not path:
        raise ModelFileError(f"'{generator.path}' names no classifier to judge its images")
    if not Path(path).is_file():
        raise ModelFileError(f"'{generator.path}' is judged by the classifier '{path}', which is missing; quality "
                             "needs that checkpoint")
    if path not in _JUDGES:
        _JUDGES[path] = QualityClassifier(path)
    return _JUDGES[path]


def classifier_agreement(fp32: Generator, variant: Generator, checks: np.ndarray) -> tuple[float, float]:
    """How often the judge classifies the variant's image as it classifies fp32's image from the same latent (a
    quality-based share: what the picture shows, not its pixels), and the largest pixel difference in [0, 1]."""
    a, b = fp32.render(checks), variant.render(checks)
    judge = judge_of(fp32)
    return float((judge.decisions(a) == judge.decisions(b)).mean()), float(np.abs(a - b).max())


def evaluate_onnx(predictor: Generator, model: str | Path, dataset: str | None, split: str = "test",
                  limit: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Quality of ``limit`` (default 10,000) samples against the first 10,000 real images of ``split``: FID and
    KID in the judge's feature space, its mean confidence and per-class shares."""
    del model
    judge = judge_of(predictor)
    if dataset and dataset != judge.dataset:
        raise InputError(f"'{predictor.path}' is judged on {judge.dataset}, not {dataset!r}")
    count = limit or 10_000
    samples = predictor.render(mixed_latents(predictor, count, seed=3))
    report = judge.score(samples, judge.real_features(split, 10_000, data_dir))
    if predictor.conditional:  # mixed_latents asks for the classes in turn: does the judge see the class asked for?
        asked = np.arange(count) % len(predictor.labels)
        report["class_accuracy"] = float((judge.decisions(samples) == asked).mean())
    return {**report, "images": count, "judge": judge.describe()}


TASK = Task(
    name="generation", description="a latent (and a class) in, an image out (a DCGAN generator)",
    metric=METRIC, train=train, command=command, summary=summary, graphs=graphs, metadata=metadata,
    quantization=QuantizationPolicy(inputs=latent_inputs, agreement=classifier_agreement,
                                    agreement_name="same class for the judge on samples from the same latents"),
    evaluate=evaluate_onnx, predictor=Generator,
    report=lambda r: (f"FID {r['fid']:.3f}, KID {r['kid']:.4f} ± {r['kid_std']:.4f}, mean confidence "
                      f"{r['mean_confidence']:.3f}, {r['classes_present']} classes present (classifier features)"))
