"""fp16 and int8 variants of a dlpipe ONNX model, path in, path out (onnxruntime's ``quantize_static``
style), configured by a small frozen :class:`QuantizationConfig`. Every result records what was done
in its metadata and is checked against the fp32 model on real inputs (top-1 agreement)."""

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
from dlpipe.runtime.captioner import is_package
from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import DlpipeError, InputError, ModelFileError
from dlpipe.runtime.files import publish
from dlpipe.runtime.formats import QUANTIZED
from dlpipe.runtime.images import preprocess
from dlpipe.runtime.metadata import ModelInfo

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
        source = info.raw["dataset"]  # fine-tuned on an image folder (issue 6): calibrate on it
    if source and Path(source).is_dir():
        files = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        if not files:
            raise InputError(f"calibration folder '{source}' holds no PNG/JPEG/BMP images")
        return preprocess(files[offset:offset + count] or files[:count], info.preprocessing)
    if source and ("/" in source or Path(source).suffix):
        raise InputError(f"calibration source '{source}' does not exist")
    dataset = source or info.raw.get("dataset")
    if not dataset:
        raise InputError("the model does not name its dataset; pass --calibration DATASET|FOLDER|FILE.npy")
    from dlpipe.training.data import load_split  # torch-side; quantization is a build step

    images, _ = load_split(dataset, split, data_dir, limit=offset + count)
    return preprocess(list(images[offset:offset + count]), info.preprocessing)


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


# Detectors in fp16: the networks (backbone, RPN head, box head) only; the resizing, anchor and box
# arithmetic, RoIAlign, NMS and the shape computations around them stay float32.
DETECTION_FP16_SCOPES = ("/detector/backbone/", "/detector/rpn/head/", "/detector/roi_heads/box_head/",
                         "/detector/roi_heads/box_predictor/")


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


def _to_fp16(src: Path, dst: Path, cfg: QuantizationConfig, task: str = "classification") -> list[str]:
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    block = sorted(set(FP16_BLOCK_LIST) | set(cfg.keep_fp32))
    nodes = list(cfg.exclude_nodes)
    if task == "detection":
        convert = {n.name for n in model.graph.node if n.name.startswith(DETECTION_FP16_SCOPES)
                   and n.op_type not in block and n.name not in nodes}
        kept = [n for n in model.graph.node if n.name not in convert]
        named = [f"{n.op_type}:{n.name}" for n in kept if n.op_type in DETECTION_FP32_REPORTED]
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


# Detectors: only the convolutions (backbone and RPN) go to int8. The box head's fully connected
# layers, RoIAlign, box decoding, NMS and the resizing stay float32 (quantizing them costs mAP).
DETECTION_INT8_OPS = ("Conv",)
DETECTION_FP32_REPORTED = ("Gemm", "MatMul", "RoiAlign", "NonMaxSuppression", "Resize", "TopK", "Exp")


def _to_int8(src: Path, dst: Path, cfg: QuantizationConfig, calibration: np.ndarray | None,
             input_name: str, task: str = "classification") -> list[str]:
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
        op_types = list(DETECTION_INT8_OPS) if task == "detection" else None
        if cfg.method == "dynamic":
            quantize_dynamic(str(prep), str(dst), per_channel=cfg.per_channel, weight_type=QuantType.QInt8,
                             nodes_to_exclude=excluded, op_types_to_quantize=op_types)
        else:
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                      "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
            reader = ArrayCalibrationReader(input_name, calibration, unbatched=task == "detection")
            quantize_static(str(prep), str(dst), reader, op_types_to_quantize=op_types,
                            quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method, nodes_to_exclude=excluded,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        if task == "detection":
            excluded += [f"{n.op_type}:{n.name}" for n in model.graph.node if n.op_type in DETECTION_FP32_REPORTED]
    return excluded


def _agreement(fp32: Engine, variant: Engine, checks: np.ndarray) -> tuple[float, float]:
    """How often the variant makes the fp32 model's decision on the check inputs, and the largest output
    difference. Classifiers: top-1 (argmax over axis 1, per pixel for segmentation). Policies: the greedy
    action, where the fp32 policy prefers it by a margin.
    Detectors: confident (score >= 0.5) fp32 detections matched by a variant detection of the same class
    at IoU >= 0.5, over the larger of the two counts; the difference is over matched boxes."""
    name = fp32.input_names[0]
    if fp32.info is not None and fp32.info.task == "detection":
        matched, total, max_abs = 0, 0, 0.0
        for image in checks:
            (rb, rl, rs), (gb, gl, gs) = fp32.run({name: image})[:3], variant.run({name: image})[:3]
            rb, rl, gb, gl = rb[rs >= 0.5], rl[rs >= 0.5], gb[gs >= 0.5], gl[gs >= 0.5]
            total += max(len(rb), len(gb))
            used = np.zeros(len(gb), dtype=bool)
            for box, label in zip(rb, rl):
                iou = _iou(box, gb) * (gl == label) * ~used
                if len(iou) and iou.max() >= 0.5:
                    j = int(iou.argmax())
                    used[j] = True
                    matched += 1
                    max_abs = max(max_abs, float(np.abs(gb[j] - box).max()))
        return (matched / total if total else 1.0), max_abs
    ref, got = fp32.run({name: checks})[0], variant.run({name: checks})[0]
    same = ref.argmax(1) == got.argmax(1)
    if fp32.info is not None and fp32.info.task == "control":
        # A policy's Q-values for its actions can be nearly equal (CartPole: ~90 each, ~0.1 apart); where the
        # fp32 network itself is indifferent (its best two within 1% of the Q scale) either action is its
        # choice, so only the decisions it makes with a margin count.
        top2 = np.sort(ref, axis=1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) >= 0.01 * np.abs(ref).mean()
        same = same[decisive] if decisive.any() else same
    return float(same.mean()), float(np.abs(ref - got).max())


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``x0,y0,x1,y1`` box with each of ``boxes``."""
    if not len(boxes):
        return np.zeros(0)
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def quantize(model_path: str | Path, out: str | Path, config: QuantizationConfig, *,
             calibration: str | None = None, check: str | None = None, check_size: int = 512,
             data_dir: str | None = None) -> QuantizeReport:
    """Write the ``config.precision`` variant of a dlpipe fp32 ONNX model to ``out`` and check it.

    Args:
        calibration: Where calibration images come from (int8 static): dataset name, image folder or
            ``.npy``; the model's own training dataset when None.
        check: Where the agreement-check images come from; the test split of the model's dataset (or
            the calibration source) when None.

    Raises:
        ModelFileError: not a dlpipe fp32 model. QuantizationError: agreement below ``min_agreement``.
    """
    start = time.perf_counter()
    if is_package(model_path):  # a captioner package: both graphs, checked caption by caption (issue 4)
        from dlpipe.export.captioner import quantize_package

        return quantize_package(model_path, out, config, calibration=calibration, check_size=min(check_size, 256))
    model_path, out = Path(model_path), Path(out)
    fp32 = Engine(model_path, device="cpu")
    if fp32.info is None:
        raise ModelFileError(f"'{model_path}' has no dlpipe metadata; export it with 'dlpipe export' first")
    if fp32.info.precision != "fp32":
        raise ModelFileError(f"'{model_path}' is already a {fp32.info.precision} model; quantize the fp32 export")
    input_name = fp32.input_names[0]
    load_inputs, post_process = load_images_for, None
    if fp32.info.task == "control":  # DQN policies: observations recorded in their environment (issue 5)
        from dlpipe.training.dqn import head_bias_correction, int8_fp32_nodes, observation_loader

        load_inputs = observation_loader(model_path)
        if config.precision == "int8":
            config = replace(config, exclude_nodes=config.exclude_nodes + int8_fp32_nodes(model_path))
            post_process = head_bias_correction(model_path)
    calib = None
    if config.calibrated:
        calib = load_inputs(fp32.info, calibration, "train", config.calibration_size, data_dir)
    # Check on images calibration did not see: the test split of a dataset, or the rest of a
    # calibration folder / array (all of it when it holds no more than the calibration images).
    own_files = check is None and calibration is not None and Path(calibration).exists()
    checks = load_inputs(fp32.info, check or calibration, "test", check_size, data_dir,
                         offset=config.calibration_size if own_files else 0)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out.stem + ".", suffix=".onnx.tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            if config.precision == "fp16":
                kept = _to_fp16(model_path, tmp, config, fp32.info.task)
            else:
                kept = _to_int8(model_path, tmp, config, calib, input_name, fp32.info.task)
                if post_process is not None:
                    post_process(tmp, calib)
        except DlpipeError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise QuantizationError(f"{config.precision} quantization of '{model_path}' failed: {first}") from None
        model = onnx.load(str(tmp))
        doc = read_metadata(model) or {}
        doc["precision"] = config.precision
        doc["quantization"] = {k: v for k, v in asdict(config).items() if k != "min_agreement"}
        doc["quantization"]["kept_fp32"] = kept
        doc["quantization"]["source"] = model_path.name
        if calib is not None:
            doc["quantization"]["calibration"] = {"source": calibration or doc.get("dataset"), "images": len(calib)}
        write_metadata(model, doc)
        onnx.save(model, str(tmp))
        agreement, max_abs = _agreement(fp32, Engine(tmp, device="cpu"), checks)
        if agreement < config.min_agreement:
            raise QuantizationError(f"{config.precision} model agrees with fp32 on only {agreement:.2%} of the "
                                    f"predictions for {len(checks)} check images (minimum {config.min_agreement:.0%}); "
                                    "try --method, more calibration images or --keep-fp32 OP")
        publish(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return QuantizeReport(path=str(out), precision=config.precision,
                          method=config.method if config.precision == "int8" else None, agreement=agreement,
                          check_images=len(checks), max_abs_diff=max_abs,
                          size_bytes=out.stat().st_size, fp32_size_bytes=model_path.stat().st_size,
                          op_counts=_op_counts(model), kept_fp32=kept, seconds=time.perf_counter() - start)

