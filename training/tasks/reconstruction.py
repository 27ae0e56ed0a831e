"""The reconstruction task (issue 15): an image in, the same image out through a small code — the stacked,
denoising and variational autoencoders. A model exports as a package of two graphs, ``encoder`` (image ->
code; a VAE's latent mean and log-variance) and ``decoder`` (code -> image in [0, 1]), listed in a manifest
so either half can be embedded; ``best.pt`` is chosen on validation PSNR, and a quantized package is kept
only when its mean reconstruction PSNR is within 0.5 dB of fp32's."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlpipe.runtime.autoencoder import Autoencoder
from dlpipe.runtime.captioner import read_manifest
from dlpipe.runtime.errors import InputError
from dlpipe.runtime.metadata import ModelInfo
from dlpipe.training import data as datasets
from dlpipe.training.autoencoders import (METRIC, PSNR_TOLERANCE_DB, evaluate_autoencoder, model_code, prepare,
                                          psnr_agreement)
from dlpipe.training.loop import TrainConfig, run_supervised
from dlpipe.training.models.autoencoders import DECODER_CONTRACT, DecoderGraph, EncoderGraph
from dlpipe.training.registry import get_spec
from dlpipe.training.tasks.base import Graph, QuantizationPolicy, Task
from dlpipe.training.tasks.common import batch_inputs, load_images_for, supervised_command, supervised_summary


def image_dataset(name: str):
    """The dataset's :class:`DatasetInfo`, refused unless it is a dataset of whole images (a classification one)."""
    info = datasets.get_dataset(name)
    if info.task != "classification":
        raise InputError(f"autoencoders train on image datasets (mnist, fashion-mnist, shapes); {name!r} is a "
                         f"{info.task} dataset")
    return info


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train an autoencoder on the shared loop (best.pt on validation PSNR)."""
    return run_supervised(cfg, functools.partial(prepare, dataset_info=image_dataset), METRIC, "reconstruction")


@torch.no_grad()
def graphs(ckpt: dict[str, Any], model: torch.nn.Module, dynamic_batch: bool) -> list[Graph]:
    """The encoder exported on 2 held-out images and checked on 1 and 16; the decoder the same on those
    images' codes (a VAE's latent means)."""
    del dynamic_batch  # a package's graphs always take a batch
    examples = ckpt["examples"]
    enc_example, enc_checks = batch_inputs(examples, True)
    dec_example, dec_checks = batch_inputs(model_code(model.eval(), examples), True)
    return [Graph("encoder", EncoderGraph(model), get_spec(ckpt["model"]).contract, enc_example, enc_checks),
            Graph("decoder", DecoderGraph(model), DECODER_CONTRACT, dec_example, dec_checks)]


def metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The model arguments (noise, code size...) in every graph, and the package's inputs and outputs."""
    return {"model_args": ckpt["model_args"], "manifest": {"inputs": ["image"], "outputs": ["code", "image"]}}


def part_plans(config: Any) -> dict[str, Any]:
    """fp16: both graphs. int8: the encoder as asked (static QDQ calibrated on images); the decoder dynamic
    int8, since its input is a code that the image calibration set cannot feed."""
    if config.precision == "int8":
        return {"encoder": config, "decoder": replace(config, method="dynamic")}
    return {"encoder": config, "decoder": config}


def package_inputs(model_path, source, split, count, data_dir=None, offset=0) -> np.ndarray:
    """Encoder inputs for calibration and checks: the package's dataset (``train`` / ``test`` split), or the
    folder, dataset or ``.npy`` given."""
    _, doc = read_manifest(model_path)
    return load_images_for(ModelInfo.from_json(json.dumps(doc)), source, split, count, data_dir, offset)


def evaluate_onnx(predictor: Autoencoder, model: str | Path, dataset: str, split: str = "test",
                  limit: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """PSNR and SSIM (clean and per noise), and a VAE's ELBO, of a package through the runtime."""
    del model
    return evaluate_autoencoder(predictor, dataset, split, limit, data_dir)


def describe(report: dict[str, Any]) -> str:
    """PSNR, SSIM, the best denoising gain, and the ELBO of a VAE, in words."""
    text = f"PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.3f}"
    if report.get("noisy"):
        best = max(report["noisy"], key=lambda r: r["gain"])
        text += (f", denoising {best['noise']} {best['level']:g}: {best['input_psnr']:.1f} -> "
                 f"{best['output_psnr']:.1f} dB")
    if report.get("elbo") is not None:
        text += f", ELBO {report['elbo']:.1f} nats"
    return text


TASK = Task(
    name="reconstruction",
    description="image in, the image back through a code (autoencoders; a package: encoder and decoder graphs)",
    metric=METRIC, train=train, command=supervised_command(train),
    summary=supervised_summary(METRIC, (("clean_psnr", "clean-input PSNR"), ("ssim", "SSIM"), ("elbo", "ELBO")),
                               out="autoencoder/manifest.json"),
    graphs=graphs, metadata=metadata,
    quantization=QuantizationPolicy(inputs=package_inputs, agreement=psnr_agreement,
                                    agreement_name=f"mean reconstruction PSNR within {PSNR_TOLERANCE_DB} dB of fp32's",
                                    parts=part_plans),
    evaluate=evaluate_onnx, predictor=Autoencoder, report=describe)
