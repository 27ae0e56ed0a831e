"""The captioning task: image in, a sentence out (Show and Tell). It exports as a package of two graphs,
``encoder`` (image -> LSTM state) and ``decoder`` (one step), listed in a manifest; best.pt is chosen on
validation BLEU-4 of greedy captions, and a quantized package is judged by how often its greedy
captions equal fp32's."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlpipe.runtime.captioner import SPECIAL_TOKENS, Captioner, read_manifest
from dlpipe.runtime.errors import InputError
from dlpipe.runtime.images import preprocess
from dlpipe.runtime.metadata import ModelInfo
from dlpipe.training import report_plots
from dlpipe.training.captioning import METRIC, SHAPES_CAPTIONS, evaluate_captioner, train_captioner
from dlpipe.training.captions import TEST_START, caption_set
from dlpipe.training.loop import TrainConfig
from dlpipe.training.models.captioner import (DECODER_CONTRACT, ENCODER_CONTRACT, CaptionDecoderStep,
                                              CaptionEncoder)
from dlpipe.training.tasks.base import DemoRow, Graph, QuantizationPolicy, Task
from dlpipe.training.tasks.common import batch_inputs, load_images_for, supervised_command, supervised_summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train the captioner on the shared loop with the default :class:`CaptionOptions`."""
    return train_captioner(cfg)


@torch.no_grad()
def decoder_inputs(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
                   ) -> list[tuple[torch.Tensor, ...]]:
    """Real decoder-step inputs: at each position of real captions, the token and the state the model
    has reached there (teacher-forced from the encoder's state)."""
    h, c = model.encode(images)
    inputs = []
    for t in range(tokens.shape[1]):
        inputs.append((tokens[:, t].clone(), h, c))
        _, h, c = model.step(tokens[:, t], h, c)
    return inputs


def graphs(ckpt: dict[str, Any], model: torch.nn.Module, dynamic_batch: bool) -> list[Graph]:
    """The encoder, exported on held-out images; the decoder step, exported on step 0 of 2 real captions and
    checked on 1 caption at step 1 and 16 at step 2."""
    examples, tokens = ckpt["examples"], ckpt["example_tokens"]
    enc_example, enc_checks = batch_inputs(examples, True)
    steps = decoder_inputs(model, examples, tokens)
    dec_example = tuple(t[:2] for t in steps[0])
    dec_checks = [tuple(t[2:3] for t in steps[1]), tuple(t[3:19] for t in steps[min(2, len(steps) - 1)])]
    return [Graph("encoder", CaptionEncoder(model), ENCODER_CONTRACT, enc_example, enc_checks),
            Graph("decoder", CaptionDecoderStep(model), DECODER_CONTRACT, dec_example, dec_checks)]


def metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The vocabulary, special tokens and decoding defaults every graph and the manifest carry."""
    return {"vocabulary": list(ckpt["vocabulary"]), "special_tokens": dict(zip(("pad", "bos", "eos", "unk"),
                                                                                SPECIAL_TOKENS)),
            "decoding": dict(ckpt["decoding"]), "model_args": ckpt["model_args"],
            "manifest": {"inputs": ["image"], "outputs": ["caption"]}}


def part_plans(config: Any) -> dict[str, Any]:
    """fp16: both graphs, the LSTM kept float32 (onnxruntime's CPU LSTM is float32 only). int8: the
    decoder dynamic int8 (LSTM, MatMul, Gather); the encoder static QDQ, or fp16 with method 'dynamic'."""
    if config.precision == "int8":
        return {"encoder": config if config.method == "static" else replace(config, precision="fp16"),
                "decoder": replace(config, method="dynamic")}
    return {"encoder": config, "decoder": replace(config, keep_fp32=tuple(config.keep_fp32) + ("LSTM",))}


def _shapes_inputs(info: ModelInfo, count: int, start: int) -> np.ndarray:
    images, _ = caption_set(count, start=start, image_size=info.preprocessing.size[0])
    return preprocess(list(images), info.preprocessing)


def package_inputs(model_path, source, split, count, data_dir=None, offset=0) -> np.ndarray:
    """Encoder inputs: a folder of images or a ``.npy`` of preprocessed inputs when given; by default
    training scenes of the shapes captions for calibration and held-out ones for checks."""
    _, doc = read_manifest(model_path)
    info = ModelInfo.from_json(json.dumps(doc))
    if source is not None:
        return load_images_for(info, source, split, count, data_dir, offset)
    if doc.get("dataset") != SHAPES_CAPTIONS:
        raise InputError(f"the package was trained on {doc.get('dataset')!r}; pass --calibration FOLDER|FILE.npy "
                         "with images like its training images")
    return _shapes_inputs(info, count, start=0 if split == "train" else TEST_START)


def caption_agreement(fp32: Captioner, variant: Captioner, images: np.ndarray) -> tuple[float, float]:
    """Share of identical greedy captions, and the largest first-step log-probability difference."""
    max_len = int(fp32.decoding.get("max_len", 20))
    same, diff = 0, 0.0
    for first in range(0, len(images), 64):
        batch = images[first:first + 64]
        a, b = fp32.decode(batch, 1, max_len), variant.decode(batch, 1, max_len)
        same += sum(x.tokens == y.tokens for x, y in zip(a, b))
        bos = np.full(len(batch), 1, dtype=np.int64)
        lp_a = fp32.step(bos, *fp32.state(batch))[0]
        lp_b = variant.step(bos, *variant.state(batch))[0]
        diff = max(diff, float(np.abs(lp_a - lp_b).max()))
    return same / len(images), diff


def evaluate_onnx(predictor: Captioner, model: str | Path, dataset: str | None, split: str = "test",
                  limit: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Corpus BLEU-4 and the exact-sentence rate of a package (any variant)."""
    del model, data_dir
    return evaluate_captioner(predictor, dataset, split, limit)


def _describe(rows: list[dict[str, Any]]) -> str:
    return f"'{rows[0]['caption']}'" if rows else "no captions"


TASK = Task(
    name="captioning", description="image in, a sentence out (a package: encoder and decoder-step graphs)",
    data_parallel=True,
    metric=METRIC, train=train, command=supervised_command(train),
    summary=supervised_summary(METRIC, (("exact", "exact sentences"), ("beam_bleu", "BLEU-4 with beam search")),
                               out="captioner/manifest.json"),
    graphs=graphs, metadata=metadata,
    quantization=QuantizationPolicy(inputs=package_inputs, agreement=caption_agreement,
                                    agreement_name="identical greedy captions", parts=part_plans),
    evaluate=evaluate_onnx, plots=report_plots.bleu_by_length, predictor=Captioner,
    report=lambda r: f"BLEU-4 {r['bleu']:.4f}, exact sentences {100 * r['exact']:.1f}%",
    demo=DemoRow(model="captioner", options=dict(epochs=8, limit=6000, test_limit=100, schedule="onecycle",
                                                 model_args={"hidden": 128}),
                 quick=dict(epochs=1, limit=200), precisions=("int8",), app=("caption", "{model}", "{images}"),
                 describe=_describe, evaluate_limit=100,
                 quantize={"calibration_size": 64, "min_agreement": 0.0, "check_size": 64},
                 samples=lambda count: caption_set(count, start=TEST_START)[0]))
