"""Hooks several task declarations share: the supervised ``train`` command, single-graph export inputs,
image inputs for calibration and checks, top-1 agreement and demo sample images."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.runtime.images import preprocess
from dlpipe.runtime.metadata import ModelInfo
from dlpipe.training import data as datasets
from dlpipe.training.loop import Metric, TrainConfig
from dlpipe.training.registry import ModelSpec, get_spec
from dlpipe.training.tasks.base import Graph

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


# ------------------------------------------------------------------------------------------- training

def dataset_info(cfg: TrainConfig, spec: ModelSpec) -> datasets.DatasetInfo:
    """The run's dataset, refused when it is made for another task than the model's."""
    info = datasets.get_dataset(cfg.dataset)
    if info.task != spec.task:
        raise InputError(f"{cfg.model} is a {spec.task} model but dataset {cfg.dataset!r} is for {info.task}")
    return info


def supervised_command(train: Callable[[TrainConfig], dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """``dlpipe train MODEL`` for a task on the shared loop: the command's options become a
    :class:`TrainConfig`; options it does not know (an environment's) are refused by name."""
    known = {f.name for f in fields(TrainConfig)}

    def command(model: str, progress: bool = True, **options: Any) -> dict[str, Any]:
        foreign = [k for k, v in options.items() if k not in known and v not in (None, False)]
        if foreign:
            raise InputError(f"{model} trains on a dataset; --{foreign[0].replace('_', '-')} is for models of "
                             "another task (dqn-... in an environment, stylizer with --style)")
        return train(TrainConfig(model=model, progress=progress, **{k: v for k, v in options.items() if k in known}))

    return command


def supervised_summary(metric: Metric, more: tuple[tuple[str, str], ...] = (), out: str = "model.onnx"
                       ) -> Callable[[dict[str, Any]], str]:
    """What ``dlpipe train`` prints: the best validation and test figures, the checkpoint and what next."""

    def summary(result: dict[str, Any]) -> str:
        text = (f"best validation {metric.name} {result['best_val_score']:.4f}, test {metric.name} "
                f"{result['test_' + metric.key]:.4f}")
        text += "".join(f", test {words} {result['test_' + key]:.4f}" for key, words in more
                        if result.get("test_" + key) is not None)
        return f"{text}\ncheckpoint: {result['best']}\nnext: dlpipe export {result['best']} --out {out}"

    return summary


# --------------------------------------------------------------------------------------------- export

def batch_inputs(examples: torch.Tensor, dynamic_batch: bool, dynamic_size: bool = False,
                 multiple: int = 1) -> tuple[tuple, list[tuple]]:
    """Export on 2 real inputs; check on 1 and on up to 16 others (two other batch sizes). Models with
    dynamic height and width are also checked at another resolution (the real images resized)."""
    if len(examples) < 4:
        raise ModelFileError("the checkpoint holds fewer than 4 example inputs; cannot prove parity")
    if not dynamic_batch:
        example, checks = (examples[:1],), [(examples[1:2],), (examples[2:3],)]
    else:
        example, checks = (examples[:2],), [(examples[2:3],), (examples[3:19],)]
    if dynamic_size:
        h, w = examples.shape[-2:]
        size = (h + 2 * max(multiple, 16), w + 4 * max(multiple, 16))
        resized = torch.nn.functional.interpolate(checks[1][0], size=size, mode="bilinear", align_corners=False)
        checks[1] = (resized,)
    return example, checks


def single_graph(ckpt: dict[str, Any], model: torch.nn.Module, dynamic_batch: bool) -> list[Graph]:
    """One graph of the whole model, exported on real examples and checked at two batch sizes (and at
    another resolution when height and width are dynamic)."""
    contract = get_spec(ckpt["model"]).contract
    example, checks = batch_inputs(ckpt["examples"], dynamic_batch, contract.dynamic_size, contract.size_multiple)
    return [Graph(None, model, contract, example, checks)]


# ------------------------------------------------------------------------------------ quantization

def load_images_for(info: ModelInfo, source: str | None, split: str, count: int, data_dir: str | None = None,
                    offset: int = 0) -> np.ndarray:
    """Real preprocessed model inputs for calibration or checks.

    Args:
        source: A dataset name, a folder of images, a ``.npy`` array of preprocessed inputs, or None
            for the dataset the model was trained on.
        split: Dataset split to read (``train`` for calibration, ``test`` for checks).
    """
    if source and Path(source).suffix == ".npy":
        arr = np.load(source)
        if arr.dtype != np.float32 or arr.ndim != 4:
            raise InputError(f"'{source}' must hold a float32 NCHW array of preprocessed inputs, got "
                             f"{arr.dtype} {list(arr.shape)}")
        return arr[offset:offset + count]
    if source is None and Path(str(info.raw.get("dataset") or "")).is_dir():
        source = info.raw["dataset"]  # fine-tuned on an image folder: calibrate on it
    if source and Path(source).is_dir():
        return preprocess(_folder_images(source, count, offset), info.preprocessing)
    if source and ("/" in source or Path(source).suffix):
        raise InputError(f"calibration source '{source}' does not exist")
    dataset = source or info.raw.get("dataset")
    if not dataset:
        raise InputError("the model does not name its dataset; pass --calibration DATASET|FOLDER|FILE.npy")
    images, _ = datasets.load_split(dataset, split, data_dir, limit=offset + count)
    return preprocess(list(images[offset:offset + count]), info.preprocessing)


def _folder_images(folder: str, count: int, offset: int) -> list[Path]:
    """The image files of ``folder`` (recursively, sorted) that calibration or checks read: ``count`` from
    ``offset``, or the first ``count`` when the folder holds no more than ``offset``."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"calibration folder '{folder}' holds no PNG/JPEG/BMP images")
    return files[offset:offset + count] or files[:count]


def model_images(model_path, source, split, count, data_dir=None, offset=0) -> np.ndarray:
    """:func:`load_images_for` the model file at ``model_path`` (the policy's ``inputs`` hook)."""
    from dlpipe.runtime.engine import Engine

    return load_images_for(Engine(model_path, device="cpu").info, source, split, count, data_dir, offset)


def model_labels(model_path, source, split, count, data_dir=None, offset=0) -> np.ndarray | None:
    """The class indices, in the model's label order, of the inputs :func:`model_images` returns for the same
    arguments: the model's own dataset (its split), or a folder whose images sit in class folders named as the
    model's labels. None where they are not known: an array of inputs, another dataset than the model's (its
    classes are not the model's), a folder of other names."""
    from dlpipe.runtime.engine import Engine

    info = Engine(model_path, device="cpu").info
    if source and Path(source).suffix == ".npy":
        return None
    own = info.raw.get("dataset")
    if source is None and Path(str(own or "")).is_dir():
        source = own
    if source and Path(source).is_dir():
        names = [p.parent.name for p in _folder_images(source, count, offset)]
        index = {label: i for i, label in enumerate(info.labels)}
        return np.array([index[n] for n in names]) if names and all(n in index for n in names) else None
    if (source or own) != own or not own:
        return None
    _, labels = datasets.load_split(own, split, data_dir, limit=offset + count)
    labels = np.asarray(labels[offset:offset + count])
    return labels if labels.ndim == 1 and len(info.labels) > int(labels.max(initial=0)) else None


def top1_accuracy(predictor, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``inputs`` whose argmax over the first output's axis 1 is the label."""
    out = predictor.engine.run({predictor.engine.input_names[0]: inputs})[0]
    return float((out.argmax(1) == labels).mean())


def top1_agreement(fp32, variant, checks: np.ndarray) -> tuple[float, float]:
    """How often the variant's argmax over axis 1 (per pixel for dense outputs) is fp32's, and the
    largest output difference."""
    name = fp32.engine.input_names[0]
    ref, got = fp32.engine.run({name: checks})[0], variant.engine.run({name: checks})[0]
    return float((ref.argmax(1) == got.argmax(1)).mean()), float(np.abs(ref - got).max())


# ----------------------------------------------------------------------------------------------- demo

def dataset_samples(dataset: str) -> Callable[[int], np.ndarray]:
    """``f(count)``: the first test images of a registered dataset, for the demo's app."""

    def samples(count: int) -> np.ndarray:
        images, _ = datasets.load_split(dataset, "test", limit=count)
        return images

    return samples
