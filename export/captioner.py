"""The captioner as a model package (issue 4): two ONNX graphs and a manifest, written atomically.

* ``encoder.onnx``: ``image`` -> ``h``, ``c`` (the LSTM's initial state);
* ``decoder.onnx``: ``token``, ``h_in``, ``c_in`` -> ``log_probs``, ``h_out``, ``c_out`` (one step);
* ``manifest.json``: the graphs, the variants, the vocabulary and special tokens, the preprocessing
  and the decoding defaults (each graph's own ``dlpipe`` metadata carries them too).

Each graph is exported by :func:`~dlpipe.export.onnx_export.export_module` and checked against
PyTorch on real inputs: held-out images for the encoder, and for the decoder step real tokens with
the states the model reaches on real captions. :func:`quantize_package` adds the ``fp16`` variant
(both graphs) and the ``int8`` one (decoder: dynamic int8 for the LSTM and MatMul; encoder: static
QDQ int8, or fp16 with ``method='dynamic'``), each with its own manifest, checked by how often its
greedy captions equal the fp32 package's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from dlpipe.export.metadata import build_metadata, read_metadata, write_metadata
from dlpipe.export.onnx_export import ExportReport, _axes, _check_batches, export_module
from dlpipe.export.quantize import QuantizationConfig, QuantizationError, QuantizeReport, _op_counts, _to_fp16, _to_int8
from dlpipe.runtime.captioner import MANIFEST, PACKAGE_FORMAT, SPECIAL_TOKENS, Captioner, read_manifest
from dlpipe.runtime.errors import DlpipeError, InputError, ModelFileError
from dlpipe.runtime.formats import variant_path
from dlpipe.training.captioning import model_and_vocabulary
from dlpipe.training.checkpoint import load_checkpoint
from dlpipe.training.models.captioner import DECODER_CONTRACT, ENCODER_CONTRACT

PARTS = ("encoder", "decoder")


class CaptionEncoder(nn.Module):
    """The encoder graph: image -> initial LSTM state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(image)


class CaptionDecoderStep(nn.Module):
    """The decoder-step graph: previous token and state -> next-token log-probabilities and state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, h_in: torch.Tensor, c_in: torch.Tensor):
        return self.model.step(token, h_in, c_in)


@torch.no_grad()
def decoder_inputs(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Real decoder-step inputs: at each position of real captions, the token and the state the model
    has reached there (teacher-forced from the encoder's state)."""
    h, c = model.encode(images)
    inputs = []
    for t in range(tokens.shape[1]):
        inputs.append((tokens[:, t].clone(), h, c))
        _, h, c = model.step(tokens[:, t], h, c)
    return inputs


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _package_folder(out: str | Path) -> Path:
    """``--out`` names the package folder; ``model.onnx`` or ``model/manifest.json`` mean ``model/``."""
    out = Path(out)
    if out.name == MANIFEST:
        return out.parent
    return out.with_suffix("") if out.suffix.lower() in (".onnx", ".json") else out


def export_captioner(checkpoint: str | Path, out: str | Path, *, opset: int | None = None,
                     exporter: str | None = None) -> ExportReport:
    """Export a captioner checkpoint to a model package folder (replacing an older one only on success).

    Returns:
        An :class:`ExportReport` whose ``path`` is the manifest and whose parity covers both graphs.
    """
    start = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    model, vocabulary = model_and_vocabulary(ckpt)
    folder = _package_folder(out)
    if folder.exists() and not (folder / MANIFEST).is_file():
        raise InputError(f"'{folder}' exists and is not a model package; choose another --out")
    examples, tokens = ckpt["examples"], ckpt["example_tokens"]
    enc_example, enc_checks = _check_batches(examples, True)
    steps = decoder_inputs(model, examples, tokens)
    # export on step 0 of 2 captions; check on 1 caption at step 1 and 16 at step 2
    dec_example = tuple(t[:2] for t in steps[0])
    dec_checks = [tuple(t[2:3] for t in steps[1]), tuple(t[3:19] for t in steps[min(2, len(steps) - 1)])]
    ds = ckpt["dataset"]
    shared = {"vocabulary": list(vocabulary.tokens), "special_tokens": dict(zip(("pad", "bos", "eos", "unk"),
                                                                                 SPECIAL_TOKENS)),
              "decoding": dict(ckpt["decoding"]), "model_args": ckpt["model_args"]}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a package is an ordinary folder
    try:
        reports = {}
        for part, module, contract, example, checks in [
                ("encoder", CaptionEncoder(model), ENCODER_CONTRACT, enc_example, enc_checks),
                ("decoder", CaptionDecoderStep(model), DECODER_CONTRACT, dec_example, dec_checks)]:
            meta = build_metadata(task="captioning", model=ckpt["model"], labels=[],
                                  preprocessing=ds["preprocessing"], inputs=list(contract.inputs),
                                  outputs=list(contract.outputs), dynamic_axes=_axes(contract, True),
                                  dataset=ds["name"], metrics=dict(ckpt.get("metrics", {})))
            meta.update(shared, part=part)
            reports[part] = export_module(module, example, tmp / f"{part}.onnx", contract=contract, metadata=meta,
                                          check_inputs=checks, opset=opset, exporter=exporter or contract.exporter,
                                          name=f"{ckpt['model']} {part}")
        manifest = {"format": PACKAGE_FORMAT, "format_version": 1, "task": "captioning", "model": ckpt["model"],
                    "precision": "fp32", "graphs": {p: f"{p}.onnx" for p in PARTS},
                    "variants": {"fp32": MANIFEST}, "preprocessing": ds["preprocessing"], "dataset": ds["name"],
                    "metrics": dict(ckpt.get("metrics", {})), "inputs": ["image"], "outputs": ["caption"],
                    "opset": reports["encoder"].opset, **shared}
        _write_json(tmp / MANIFEST, manifest)
        if folder.exists():  # swap the finished package in, then drop the old one
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    enc, dec = reports["encoder"], reports["decoder"]
    return ExportReport(str(folder / MANIFEST), ckpt["model"], enc.opset, enc.exporter,
                        {**enc.dynamic_axes, **dec.dynamic_axes}, enc.parity + dec.parity,
                        time.perf_counter() - start)


def _shapes_inputs(doc: dict[str, Any], count: int, start: int) -> np.ndarray:
    """Preprocessed encoder inputs of ``count`` shapes-caption scenes from index ``start`` on."""
    from dlpipe.runtime.images import preprocess
    from dlpipe.runtime.metadata import ModelInfo
    from dlpipe.training.captions import caption_set

    info = ModelInfo.from_json(json.dumps(doc))
    images, _ = caption_set(count, start=start, image_size=info.preprocessing.size[0])
    return preprocess(list(images), info.preprocessing)


def _calibration_images(doc: dict[str, Any], source: str | None, count: int) -> np.ndarray:
    """Preprocessed encoder inputs for int8 calibration: a folder of images, a ``.npy`` of preprocessed
    inputs, or (by default) training scenes of the shapes captions."""
    from dlpipe.export.quantize import load_images_for
    from dlpipe.runtime.metadata import ModelInfo

    if source is not None:
        return load_images_for(ModelInfo.from_json(json.dumps(doc)), source, "train", count)
    if doc.get("dataset") != "shapes-captions":
        raise InputError(f"the package was trained on {doc.get('dataset')!r}; pass --calibration FOLDER|FILE.npy "
                         "with images like its training images")
    return _shapes_inputs(doc, count, start=0)


def _check_images(doc: dict[str, Any], count: int, calibration: np.ndarray | None) -> np.ndarray:
    """Held-out shapes scenes, or for other datasets the last of the calibration images."""
    if doc.get("dataset") == "shapes-captions":
        from dlpipe.training.captions import TEST_START

        return _shapes_inputs(doc, count, start=TEST_START)
    if calibration is None:
        raise InputError("pass --calibration FOLDER|FILE.npy: images to check the variant on")
    return calibration[-count:]


def quantize_package(path: str | Path, out: str | Path | None, config: QuantizationConfig, *,
                     calibration: str | None = None, check_size: int = 256) -> QuantizeReport:
    """Add the ``config.precision`` variant to a captioner package and check it against fp32.

    Args:
        path: The package folder or its fp32 manifest.
        out: The variant's manifest (default ``manifest.<precision>.json`` beside the fp32 one).

    Raises:
        QuantizationError: the variant's greedy captions equal fp32's on fewer than ``min_agreement`` images.
    """
    start = time.perf_counter()
    manifest_path, doc = read_manifest(path)
    if doc.get("precision") != "fp32":
        raise ModelFileError(f"'{manifest_path}' is the {doc.get('precision')} variant; quantize the fp32 package")
    folder = manifest_path.parent
    out = Path(out) if out else variant_path(manifest_path, config.precision)
    if out.resolve().parent != folder.resolve():
        raise InputError(f"a package variant's manifest must sit in the package folder '{folder}', got '{out}'")
    suffix = f".{config.precision}"
    # fp16: both graphs; the LSTM stays float32 (onnxruntime's CPU LSTM kernel is float32 only).
    # int8: decoder dynamic int8 (LSTM, MatMul, Gather); encoder static QDQ, or fp16 with method 'dynamic'.
    plans = {"encoder": config, "decoder": replace(config, keep_fp32=tuple(config.keep_fp32) + ("LSTM",))}
    if config.precision == "int8":
        plans = {"encoder": config if config.method == "static" else QuantizationConfig("fp16"),
                 "decoder": replace(config, method="dynamic")}
    # images from outside the shapes world are needed to check the variant even when not to calibrate it
    needs_images = plans["encoder"].calibrated or doc.get("dataset") != "shapes-captions"
    calib = _calibration_images(doc, calibration, config.calibration_size) if needs_images else None
    checks = _check_images(doc, check_size, calib)
    written, kept, ops = [], [], {}
    try:
        for part in PARTS:
            src, dst = folder / doc["graphs"][part], folder / f"{part}{suffix}.onnx"
            tmp = dst.with_name(dst.name + ".tmp")
            written.append(tmp)
            plan = plans[part]
            try:
                kept += [f"{part}:{k}" for k in (_to_fp16(src, tmp, plan) if plan.precision == "fp16" else
                                                 _to_int8(src, tmp, plan, calib, "image"))]
            except DlpipeError:
                raise
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise QuantizationError(f"{plan.precision} quantization of '{src}' failed: {first}") from None
            model = onnx.load(str(tmp))
            meta = read_metadata(model) or {}
            meta["precision"] = config.precision
            meta["quantization"] = {"precision": plan.precision, "method": plan.method if plan.precision == "int8"
                                    else None, "source": src.name}
            write_metadata(model, meta)
            onnx.save(model, str(tmp))
            ops.update({f"{part}:{k}": v for k, v in _op_counts(model).items()})
        variant = {**doc, "precision": config.precision, "variants": {},
                   "graphs": {p: f"{p}{suffix}.onnx" for p in PARTS},
                   "quantization": {p: {"precision": plans[p].precision,
                                        "method": plans[p].method if plans[p].precision == "int8" else None}
                                    for p in PARTS}}
        if plans["encoder"].calibrated:
            variant["quantization"]["encoder"]["calibration"] = {"source": calibration or doc.get("dataset"),
                                                                 "images": len(calib)}
        out_tmp = out.with_name(out.name + ".tmp")
        written.append(out_tmp)
        _write_json(out_tmp, {**variant, "graphs": {p: f"{p}{suffix}.onnx.tmp" for p in PARTS}})
        agreement, max_diff = _agreement(Captioner(manifest_path, device="cpu"), Captioner(out_tmp, device="cpu"),
                                         checks)
        if agreement < config.min_agreement:
            raise QuantizationError(f"the {config.precision} package's greedy captions equal fp32's on only "
                                    f"{agreement:.2%} of {len(checks)} check images (minimum "
                                    f"{config.min_agreement:.0%}); try --method or --keep-fp32 OP")
        for part in PARTS:
            os.replace(folder / f"{part}{suffix}.onnx.tmp", folder / f"{part}{suffix}.onnx")
        _write_json(out, variant)
        doc["variants"] = {**doc.get("variants", {}), config.precision: out.name}
        _write_json(manifest_path, doc)
    finally:
        for tmp in written:
            if tmp.exists():
                tmp.unlink()
    size = sum((folder / f"{p}{suffix}.onnx").stat().st_size for p in PARTS)
    fp32_size = sum((folder / doc["graphs"][p]).stat().st_size for p in PARTS)
    return QuantizeReport(path=str(out), precision=config.precision,
                          method=config.method if config.precision == "int8" else None, agreement=agreement,
                          check_images=len(checks), max_abs_diff=max_diff, size_bytes=size, fp32_size_bytes=fp32_size,
                          op_counts=ops, kept_fp32=kept, seconds=time.perf_counter() - start)


def _agreement(fp32: Captioner, variant: Captioner, images: np.ndarray) -> tuple[float, float]:
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
