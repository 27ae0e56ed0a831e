"""fp16 and int8 variants of a dlpipe ONNX model or model package, path in, path out (onnxruntime's
``quantize_static`` style), configured by a small frozen :class:`QuantizationConfig`. What the quantizer
keeps in float, where its calibration and check inputs come from and how agreement is measured are the
task's :class:`~dlpipe.training.tasks.QuantizationPolicy`. Every result records what was done in its
metadata and is checked against fp32 on real inputs."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dlpipe.export.metadata import read_metadata, write_metadata
from dlpipe.runtime.captioner import is_package, read_manifest
from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import DlpipeError, InputError, ModelFileError
from dlpipe.runtime.files import atomic_output, write_json
from dlpipe.runtime.formats import QUANTIZED, variant_path
from dlpipe.runtime.predictors import load
from dlpipe.training.tasks import QuantizationPolicy, Task, get_task
from dlpipe.training.tasks.common import load_images_for

__all__ = ["QuantizationConfig", "QuantizeReport", "QuantizationError", "quantize", "load_images_for"]

METHODS = ("static", "dynamic")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Operators that lose too much in float16 or have no float16 kernel; kept in float32.
FP16_BLOCK_LIST = ("Resize", "RoiAlign", "NonMaxSuppression", "TopK", "Softmax", "LogSoftmax", "Range", "Exp")


class QuantizationError(DlpipeError):
    """Quantization failed or its result disagrees with the fp32 model more than allowed."""


@dataclass(frozen=True)
class QuantizationConfig:
    """How to quantize (optimum's ``QuantizationConfig``).

    Attributes:
        precision: ``fp16`` or ``int8``.
        method: int8 only: ``static`` (QDQ, calibrated activations) or ``dynamic`` (weights only).
        per_channel: int8 only: per-channel weight scales.
        calibration_method: int8 static: ``minmax``, ``entropy`` or ``percentile``.
        calibration_size: Number of calibration images.
        keep_fp32: Operator types kept in float32 (fp16) or not quantized (int8), on top of the defaults.
        exclude_nodes: Node names left in float32.
        min_agreement: Smallest accepted top-1 agreement with the fp32 model on the check images.
    """

    precision: str
    method: str = "static"
    per_channel: bool = True
    calibration_method: str = "minmax"
    calibration_size: int = 256
    keep_fp32: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    min_agreement: float = 0.98

    def __post_init__(self) -> None:
        if self.precision not in QUANTIZED:
            raise InputError(f"unknown precision {self.precision!r}; choose from {', '.join(QUANTIZED)}")
        if self.method not in METHODS:
            raise InputError(f"unknown int8 method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise InputError(f"unknown calibration method {self.calibration_method!r}; "
                             f"choose from {', '.join(CALIBRATION_METHODS)}")
        if self.calibration_size < 1:
            raise InputError("calibration size must be at least 1")
        if not 0 <= self.min_agreement <= 1:
            raise InputError("min_agreement must be between 0 and 1")

    @property
    def calibrated(self) -> bool:
        return self.precision == "int8" and self.method == "static"


@dataclass
class QuantizeReport:
    """What a quantization produced."""

    path: str
    precision: str
    method: str | None
    agreement: float
    check_images: int
    max_abs_diff: float
    size_bytes: int
    fp32_size_bytes: int
    op_counts: dict[str, int] = field(default_factory=dict)
    kept_fp32: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ArrayCalibrationReader:
    """``CalibrationDataReader`` over a preprocessed float32 batch, fed a few images at a time (one
    unbatched ``CxHxW`` image at a time for models without a batch axis, such as detectors)."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int = 16, unbatched: bool = False):
        self.input_name, self.data, self.pos = input_name, data, 0
        self.batch, self.unbatched = (1 if unbatched else batch), unbatched

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.data):
            return None
        chunk = self.data[self.pos] if self.unbatched else self.data[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: chunk}

    def rewind(self) -> None:
        self.pos = 0


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _scoped_fp16(model: onnx.ModelProto, convert: set[str]) -> onnx.ModelProto:
    """Run the nodes named in ``convert`` in float16 and everything else in float32: their float32
    weights become float16, and Cast nodes go where a converted node reads a float32 tensor made
    outside the set (or writes one read outside it). onnxconverter-common's block lists cannot express
    this for graphs whose tensors have no type information (torchvision's detectors)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    made_inside = {o for n in graph.node if n.name in convert for o in n.output}
    readers_outside = {i for n in graph.node if n.name not in convert for i in n.input}
    readers_outside |= {o.name for o in graph.output}
    casts_in: dict[str, str] = {}
    renamed: dict[str, str] = {}  # float16 outputs that outside readers get through a Cast
    new_nodes = []
    for node in graph.node:
        if node.name in convert:
            for k, name in enumerate(node.input):
                if name in renamed:
                    node.input[k] = renamed[name]
                elif name in inits and inits[name].data_type == TensorProto.FLOAT:
                    half = numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float16),
                                                   f"{name}_fp16")
                    if half.name not in inits:
                        graph.initializer.append(half)
                        inits[half.name] = half
                    node.input[k] = half.name
                elif name and name not in inits and name not in made_inside:
                    if name not in casts_in:
                        casts_in[name] = f"{name}_to_fp16"
                        new_nodes.append(helper.make_node("Cast", [name], [casts_in[name]], to=TensorProto.FLOAT16,
                                                          name=f"{name}_Cast_fp16"))
                    node.input[k] = casts_in[name]
        new_nodes.append(node)
        if node.name in convert:
            for k, name in enumerate(node.output):
                if name in readers_outside:
                    node.output[k] = renamed[name] = f"{name}_fp16"
                    new_nodes.append(helper.make_node("Cast", [node.output[k]], [name], to=TensorProto.FLOAT,
                                                      name=f"{name}_Cast_fp32"))
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    stale = {o for n in graph.node if n.name in convert for o in n.output}
    keep_info = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(keep_info)
    return model


def _to_fp16(src: Path, dst: Path, cfg: QuantizationConfig, policy: QuantizationPolicy) -> list[str]:
    """float16 weights and activations, float32 inputs and outputs; the policy's operators (and scopes)
    kept in float32. Returns what was kept."""
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    block = sorted(set(FP16_BLOCK_LIST) | set(cfg.keep_fp32) | set(policy.fp16_keep_ops))
    nodes = list(cfg.exclude_nodes)
    if policy.fp16_scopes:
        convert = {n.name for n in model.graph.node if n.name.startswith(policy.fp16_scopes)
                   and n.op_type not in block and n.name not in nodes}
        kept = [n for n in model.graph.node if n.name not in convert]
        named = [f"{n.op_type}:{n.name}" for n in kept if n.op_type in policy.reported_fp32_ops]
        onnx.save(_scoped_fp16(model, convert), str(dst))
        return named + [f"{len(kept) - len(named)} resize, anchor, box-decoding and shape nodes"]
    with warnings.catch_warnings():  # it warns for every weight below float16's smallest normal number
        warnings.simplefilter("ignore", UserWarning)
        fp16 = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                                node_block_list=nodes)
    onnx.save(fp16, str(dst))
    return [f"{n.op_type}:{n.name}" for n in model.graph.node if n.op_type in block or n.name in nodes]


@contextlib.contextmanager
def _working_directory(path: str):
    """Run inside ``path``: onnxruntime's symbolic shape inference leaves temporary files (a model and
    its external data) in the current directory when it gives up."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _stem_convs(model: onnx.ModelProto) -> list[str]:
    """Convolutions over 1-3 input channels (an image stem). Their GEMM depth (channels x kernel) is
    too shallow for int8 kernels to pay off (measured 10x slower than fp32 for LeNet/VGG stems on
    an AVX-512 VNNI CPU), and first layers are the most sensitive to quantization, so they stay fp32."""
    weights = {t.name: t for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in weights
            and len(weights[n.input[1]].dims) == 4 and weights[n.input[1]].dims[1] <= 3]


def _to_int8(src: Path, dst: Path, cfg: QuantizationConfig, calibration: np.ndarray | None, input_name: str,
             policy: QuantizationPolicy, unbatched: bool = False) -> list[str]:
    """Static QDQ (calibrated, uint8 activations, int8 per-channel weights) or dynamic int8, with the
    policy's operator set and the image stem and the policy's nodes left in float32. Returns what was kept."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = src.resolve(), dst.resolve()  # the work below runs in a temporary directory
    with tempfile.TemporaryDirectory() as tmp, _working_directory(tmp):
        prep = Path(tmp) / "prep.onnx"
        try:
            quant_pre_process(str(src), str(prep), skip_symbolic_shape=False)
        except Exception:  # symbolic inference gives up on some dynamic spatial axes; ONNX's own suffices
            quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
        model = onnx.load(str(prep))
        excluded = [n.name for n in model.graph.node if n.op_type in cfg.keep_fp32 or n.name in cfg.exclude_nodes]
        excluded += [name for name in _stem_convs(model) if name not in excluded]
        op_types = list(policy.int8_ops) if policy.int8_ops else None
        if cfg.method == "dynamic":
            quantize_dynamic(str(prep), str(dst), per_channel=cfg.per_channel, weight_type=QuantType.QInt8,
                             nodes_to_exclude=excluded, op_types_to_quantize=op_types)
        else:
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                      "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
            reader = ArrayCalibrationReader(input_name, calibration, unbatched=unbatched)
            quantize_static(str(prep), str(dst), reader, op_types_to_quantize=op_types,
                            quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method, nodes_to_exclude=excluded,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        excluded += [f"{n.op_type}:{n.name}" for n in model.graph.node if n.op_type in policy.reported_fp32_ops]
    return excluded


def _convert(src: Path, dst: Path, cfg: QuantizationConfig, calibration: np.ndarray | None, task: Task) -> list[str]:
    """``src`` as ``cfg.precision`` in ``dst``; onnxruntime's and the converter's failures as one clear error."""
    try:
        if cfg.precision == "fp16":
            return _to_fp16(src, dst, cfg, task.quantization)
        input_name = Engine(src, device="cpu").input_names[0]
        return _to_int8(src, dst, cfg, calibration, input_name, task.quantization, unbatched=not task.batched)
    except DlpipeError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QuantizationError(f"{cfg.precision} quantization of '{src}' failed: {first}") from None


def correct_output_bias(quantized: Path, fp32_path: Path, inputs: np.ndarray) -> None:
    """Bias correction (Nagel et al., 2019) of the float32 output layer of an int8 model: int8 layers shift
    the outputs by a systematic offset, and for a Q-network a shift of a few tenths flips actions whose gap
    is ~0.1 (measured on CartPole: one seed's int8 policy fell from 500 to 130, 500 again after correction).
    Subtracts the mean (int8 - fp32) output error on ``inputs`` from the output Gemm's bias, in place."""
    from onnx import numpy_helper

    error = (Engine(quantized, device="cpu").run(inputs)[0] - Engine(fp32_path, device="cpu").run(inputs)[0]).mean(0)
    model = onnx.load(str(quantized))
    dense = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Conv")]
    node = dense[-1] if dense else None
    inits = {t.name: t for t in model.graph.initializer}
    if node is None or node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
        return  # no float Gemm with a bias at the output: leave the model as quantized
    bias = numpy_helper.to_array(inits[node.input[2]]) - error.astype(np.float32)
    inits[node.input[2]].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), node.input[2]))
    doc = read_metadata(model) or {}
    doc["bias_correction"] = {"node": node.name, "inputs": len(inputs),
                              "subtracted": [round(float(e), 6) for e in error]}
    write_metadata(model, doc)
    onnx.save(model, str(quantized))


def _record(path: Path, config: QuantizationConfig, kept: list[str], source: str, calibration: dict | None) -> onnx.ModelProto:
    """Write what quantization did into the model's metadata; returns the model."""
    model = onnx.load(str(path))
    doc = read_metadata(model) or {}
    doc["precision"] = config.precision
    doc["quantization"] = {k: v for k, v in asdict(config).items() if k != "min_agreement"}
    doc["quantization"].update(kept_fp32=kept, source=source)
    if calibration is not None:
        doc["quantization"]["calibration"] = calibration
    write_metadata(model, doc)
    onnx.save(model, str(path))
    return model


def _gate(agreement: float, config: QuantizationConfig, task: Task, checks: int) -> None:
    if agreement < config.min_agreement:
        raise QuantizationError(f"{config.precision} model agrees with fp32 on only {agreement:.2%} "
                                f"({task.quantization.agreement_name}) for {checks} check inputs (minimum "
                                f"{config.min_agreement:.0%}); try --method, more calibration images or --keep-fp32 OP")


def quantize(model_path: str | Path, out: str | Path, config: QuantizationConfig, *,
             calibration: str | None = None, check: str | None = None, check_size: int = 512,
             data_dir: str | None = None) -> QuantizeReport:
    """Write the ``config.precision`` variant of a dlpipe fp32 ONNX model (or package) to ``out`` and check it.

    Args:
        calibration: Where calibration inputs come from (int8 static): dataset name, image folder or
            ``.npy``; the task's default (the model's own training data) when None.
        check: Where the agreement-check inputs come from; the test split of the model's dataset (or
            the rest of the calibration source) when None.

    Raises:
        ModelFileError: not a dlpipe fp32 model. QuantizationError: agreement below ``min_agreement``.
    """
    start = time.perf_counter()
    if is_package(model_path):
        return quantize_package(model_path, out, config, calibration=calibration, check=check,
                                check_size=min(check_size, 256), data_dir=data_dir)
    model_path, out = Path(model_path), Path(out)
    fp32 = _fp32_model(model_path)
    task = get_task(fp32.info.task)
    policy = task.quantization
    if config.precision == "int8" and policy.keep_fp32_nodes is not None:
        config = replace(config, exclude_nodes=config.exclude_nodes + policy.keep_fp32_nodes(onnx.load(str(model_path))))
    calib = policy.inputs(model_path, calibration, "train", config.calibration_size, data_dir, 0) \
        if config.calibrated else None
    checks = _check_inputs(policy, model_path, config, calibration, check, check_size, data_dir)
    with atomic_output(out) as tmp:
        kept = _convert(model_path, tmp, config, calib, task)
        if config.precision == "int8" and policy.bias_correct_output:
            bias_inputs = calib if calib is not None else policy.inputs(model_path, None, "train", 256, data_dir, 0)
            correct_output_bias(tmp, model_path, bias_inputs)
        model = _record(tmp, config, kept, model_path.name,
                        {"source": calibration or fp32.info.raw.get("dataset"), "images": len(calib)}
                        if calib is not None else None)
        agreement, max_abs = policy.agreement(fp32, load(tmp, device="cpu"), checks)
        _gate(agreement, config, task, len(checks))
    return QuantizeReport(path=str(out), precision=config.precision,
                          method=config.method if config.precision == "int8" else None, agreement=agreement,
                          check_images=len(checks), max_abs_diff=max_abs,
                          size_bytes=out.stat().st_size, fp32_size_bytes=model_path.stat().st_size,
                          op_counts=_op_counts(model), kept_fp32=kept, seconds=time.perf_counter() - start)


def _fp32_model(model_path: Path):
    """The fp32 model's predictor (the one agreement is measured against); a file without dlpipe metadata
    is refused by :func:`load`, a variant here."""
    fp32 = load(model_path, device="cpu")
    if fp32.info.precision != "fp32":
        raise ModelFileError(f"'{model_path}' is already a {fp32.info.precision} model; quantize the fp32 export")
    return fp32


def _check_inputs(policy: QuantizationPolicy, model_path: Path, config: QuantizationConfig, calibration: str | None,
                  check: str | None, check_size: int, data_dir: str | None) -> np.ndarray:
    """Inputs calibration did not see: the test split of a dataset, or the rest of a calibration folder or
    array (all of it when it holds no more than the calibration images)."""
    own_files = check is None and calibration is not None and Path(calibration).exists()
    return policy.inputs(model_path, check or calibration, "test", check_size, data_dir,
                         config.calibration_size if own_files else 0)


def quantize_package(path: str | Path, out: str | Path | None, config: QuantizationConfig, *,
                     calibration: str | None = None, check: str | None = None, check_size: int = 256,
                     data_dir: str | None = None) -> QuantizeReport:
    """Add the ``config.precision`` variant of every graph of a model package, planned part by part by the
    task's policy, with its own manifest; checked against the fp32 package with the task's agreement.

    Args:
        path: The package folder or its fp32 manifest.
        out: The variant's manifest (default ``manifest.<precision>.json`` beside the fp32 one).
    """
    start = time.perf_counter()
    manifest_path, doc = read_manifest(path)
    if doc.get("precision") != "fp32":
        raise ModelFileError(f"'{manifest_path}' is the {doc.get('precision')} variant; quantize the fp32 package")
    folder = manifest_path.parent
    out = Path(out) if out else variant_path(manifest_path, config.precision)
    if out.resolve().parent != folder.resolve():
        raise InputError(f"a package variant's manifest must sit in the package folder '{folder}', got '{out}'")
    task = get_task(doc["task"])
    policy = task.quantization
    plans = policy.parts(config) if policy.parts else {part: config for part in doc["graphs"]}
    calibrated = any(p.calibrated for p in plans.values())
    calib = policy.inputs(manifest_path, calibration, "train", config.calibration_size, data_dir, 0) \
        if calibrated else None
    checks = _check_inputs(policy, manifest_path, config, calibration, check, check_size, data_dir)
    suffix, kept, ops, written = f".{config.precision}", [], {}, []
    try:
        for part, plan in plans.items():
            src, tmp = folder / doc["graphs"][part], folder / f"{part}{suffix}.onnx.tmp"
            written.append(tmp)
            kept += [f"{part}:{k}" for k in _convert(src, tmp, plan, calib, task)]
            model = _record(tmp, plan, [], src.name, None)
            ops.update({f"{part}:{k}": v for k, v in _op_counts(model).items()})
        variant = {**doc, "precision": config.precision, "variants": {},
                   "graphs": {p: f"{p}{suffix}.onnx" for p in plans},
                   "quantization": {p: {"precision": plan.precision, "method": plan.method if plan.precision == "int8"
                                        else None} for p, plan in plans.items()}}
        out_tmp = out.with_name(out.stem + ".tmp.json")  # a .json name: it loads as a package
        written.append(out_tmp)
        write_json(out_tmp, {**variant, "graphs": {p: f"{p}{suffix}.onnx.tmp" for p in plans}})
        agreement, max_diff = policy.agreement(load(manifest_path, device="cpu"), load(out_tmp, device="cpu"), checks)
        _gate(agreement, config, task, len(checks))
        for part in plans:
            os.replace(folder / f"{part}{suffix}.onnx.tmp", folder / f"{part}{suffix}.onnx")
        write_json(out, variant)
        write_json(manifest_path, {**doc, "variants": {**doc.get("variants", {}), config.precision: out.name}})
    finally:
        for tmp in written:
            if tmp.exists():
                tmp.unlink()
    return QuantizeReport(path=str(out), precision=config.precision,
                          method=config.method if config.precision == "int8" else None, agreement=agreement,
                          check_images=len(checks), max_abs_diff=max_diff,
                          size_bytes=sum((folder / f"{p}{suffix}.onnx").stat().st_size for p in plans),
                          fp32_size_bytes=sum((folder / doc["graphs"][p]).stat().st_size for p in plans),
                          op_counts=ops, kept_fp32=kept, seconds=time.perf_counter() - start)
