"""fp16 and int8 variants of a dlpipe ONNX model or model package, path in, path out (onnxruntime's
``quantize_static`` style), configured by a small frozen :class:`QuantizationConfig`. What the quantizer
keeps in float, where its calibration and check inputs come from and how agreement is measured are the
task's :class:`~dlpipe.training.tasks.QuantizationPolicy`. Every result records what was done in its
metadata and is checked against fp32 on real inputs."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort

from dlpipe.export.metadata import read_metadata, write_metadata
from dlpipe.runtime.captioner import is_package, read_manifest
from dlpipe.runtime.cpu import cpu_info
from dlpipe.runtime.engine import GRAPH_OPTIMIZATION, Engine
from dlpipe.runtime.errors import DlpipeError, InputError, ModelFileError
from dlpipe.runtime.files import atomic_output, write_json
from dlpipe.runtime.formats import QUANTIZED, labelled_text, variant_path
from dlpipe.runtime.predictors import load
from dlpipe.training.tasks import QuantizationPolicy, Task, get_task
from dlpipe.training.tasks.common import load_images_for

__all__ = ["QuantizationConfig", "QuantizeReport", "QuantizationError", "quantize", "load_images_for",
           "optimized_op_counts", "conv_kernels", "INT8_FORMATS", "FORMATS"]

METHODS = ("static", "dynamic")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# The static int8 formats onnxruntime builds, in order of preference: format -> (QuantFormat, activation type);
# weights are int8 (per-channel unless asked otherwise). On this AVX-512 VNNI CPU onnxruntime fuses U8S8 QDQ and
# QOperator convolutions alike into QLinearConv but leaves S8S8 QDQ depthwise convolutions unfused (issue 17:
# MobileNetV2 37 of 52 fused, 0.7-0.9x fp32), so which one wins is measured per model (``auto``).
INT8_FORMATS = {"qdq-u8s8": ("QDQ", "QUInt8"), "qop-u8s8": ("QOperator", "QUInt8"), "qdq-s8s8": ("QDQ", "QInt8")}
FORMATS = ("auto", *INT8_FORMATS)
# A candidate later in the order of preference must be this much faster to win (timing noise must not flip it).
PREFERENCE_MARGIN = 1.10
# Convolution kernels in the optimized graph, of any domain (onnxruntime's NHWC QLinearConv, the NCHWc Conv).
INTEGER_CONV_OPS = ("QLinearConv", "ConvInteger")
FLOAT_CONV_OPS = ("Conv", "FusedConv")
# Timing of the candidates: about this many seconds per candidate and batch size, within these call counts.
# (At least 12: 3 calls a candidate were too few for MobileNetV2 at batch 32, where one search found the int8
# stem 7% slower and the next, like the benchmark, faster.)
TIMING_BUDGET_S = 0.6
TIMING_ITERS = (12, 60)
# Rest between two candidates' blocks of calls: onnxruntime's intra-op threads spin some 50 ms after a session's
# last call, and bill it to the next session's calls (measured on 2 cores, resnet_small at batch 64: after a
# 10 ms rest the first 50 ms of calls ran 1.7-2x slower, fp32 23 ms instead of 12.5; after 50 ms or more, none;
# MobileNetV2 at batch 4 in bench/results/int8_timing.json: the first call 1.6-1.8x after 0-10 ms, 1.03x after 50).
TIMING_PAUSE_S = 0.1
# A less exact twin (int8 image stem, per-tensor weight scales) may be this much slower at a smaller batch size
# than the largest timed, where it must be faster (MobileNetV2's int8 stem on the AVX-512 VNNI EPYC, the median
# of 5 side-by-side comparisons: 8% faster at batch 32, 3.5% slower at batch 1; bench/results/int8_timing.json).
TWIN_SLOWER_LIMIT = 1.10
CALIBRATION_STRIDE = 32  # calibration inputs per collection (memory; see _calibrate)
ENTROPY_BINS = 512  # histogram bins for entropy calibration (128 quantized bins, onnxruntime's default)
SENSITIVITY_INPUTS = 16  # calibration inputs the per-convolution error ranking runs on
# Layer-wise bias correction (correct_biases): calibration inputs its means are taken on, how many go through a
# session at a time, and the activations onnxruntime folds into a quantized layer's output range.
BIAS_CORRECTION_INPUTS = 128
BIAS_CORRECTION_CHUNK = 32
FOLDED_ACTIVATIONS = ("Relu", "Clip")
# Agreement of an int8 candidate (a file) with fp32 on the check inputs, as the task's policy measures it.
# A candidate's top-1 agreement with fp32 and whether the gate accepts it (agreement, or the labelled metric
# within max_accuracy_drop).
Judge = Callable[[Path], "tuple[float, bool]"]
# Operators that lose too much in float16 or have no float16 kernel; kept in float32.
FP16_BLOCK_LIST = ("Resize", "RoiAlign", "NonMaxSuppression", "TopK", "Softmax", "LogSoftmax", "Range", "Exp")


class QuantizationError(DlpipeError):
    """Quantization failed or its result disagrees with the fp32 model more than allowed."""


@dataclass(frozen=True)
class QuantizationConfig:
    """How to quantize (optimum's ``QuantizationConfig``).

    Attributes:
        precision: ``fp16`` or ``int8``.
        method: int8 only: ``static`` (calibrated activations) or ``dynamic`` (weights only).
        format: int8 static: one of :data:`INT8_FORMATS`, or ``auto``: build each (and the first with
            per-tensor weights too, when ``per_channel``), read which kernels onnxruntime fuses, time them at
            batch 1 and ``batch`` and keep the fastest that passes the gate.
        batch: The typical batch size the ``auto`` format is timed at (besides 1).
        per_channel: int8 only: per-channel weight scales. With format ``auto`` per-tensor scales are tried
            too (onnxruntime's default), and kept only when they pass the gate and run faster at every batch
            size timed; the model's metadata records which were kept.
        calibration_method: int8 static: ``minmax``, ``entropy`` or ``percentile`` (the default, chosen by
            measurement: bench/int8_real.py, top-1 agreement with fp32 on held-out images of MobileNetV2 /
            deep_convnet / resnet_small: percentile 66.8 / 97.7 / 99.6%, minmax 58.6 / 97.7 / 99.6%, entropy
            57.8 / 87.9 / 93.0%; with 256 calibration and 512 held-out images 60.7 / 98.4 / 99.8%, 59.4 / 98.4 /
            99.6% and 58.2 / 88.1 / 93.0%; with the bias correction 76.6 / 99.6 / 99.6%, 73.8 / 100 / 99.6% and
            57.8 / 73.4 / 97.3%. percentile was below minmax once by one image in 256, at up to 1.8x its
            calibration time; entropy the worst and slowest).
        calibration_size: Number of calibration images.
        keep_fp32: Operator types kept in float32 (fp16) or not quantized (int8), on top of the defaults.
        exclude_nodes: Node names left in float32.
        min_agreement: Smallest accepted top-1 agreement with the fp32 model on the check images.
        max_accuracy_drop: Also accept a variant below ``min_agreement`` whose task metric on the labelled check
            inputs (a classifier's own test split) is at most this many points below fp32's: what users of a
            fine-tuned model care about (MobileNetV2 on Fashion-MNIST: 97.5% agreement, 0.24 points lost).
        bias_correction: int8 static QDQ: layer-wise empirical bias correction (:func:`correct_biases`) on
            the calibration inputs; measured on MobileNetV2 fine-tuned on Fashion-MNIST (issue 17): int8 lost
            0.73 points of test accuracy without it, 0.24 with it (bench/transfer_imagenet.py --deploy).
    """

    precision: str
    method: str = "static"
    format: str = "auto"
    batch: int = 32
    per_channel: bool = True
    calibration_method: str = "percentile"
    calibration_size: int = 256
    keep_fp32: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    min_agreement: float = 0.98
    bias_correction: bool = True
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in QUANTIZED:
            raise InputError(f"unknown precision {self.precision!r}; choose from {', '.join(QUANTIZED)}")
        if self.method not in METHODS:
            raise InputError(f"unknown int8 method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise InputError(f"unknown calibration method {self.calibration_method!r}; "
                             f"choose from {', '.join(CALIBRATION_METHODS)}")
        if self.format not in FORMATS:
            raise InputError(f"unknown int8 format {self.format!r}; choose from {', '.join(FORMATS)}")
        if self.calibration_size < 1 or self.batch < 1:
            raise InputError("calibration size and batch must be at least 1")
        if not 0 <= self.min_agreement <= 1:
            raise InputError("min_agreement must be between 0 and 1")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 100:
            raise InputError("max_accuracy_drop must be between 0 and 100 points")

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
    agreement_name: str = "top-1 agreement"  # what ``agreement`` measures (the task's policy says)
    format: str | None = None  # int8: the format built (one of INT8_FORMATS, or ``dynamic``)
    format_reason: str = ""  # why: the candidates' kernels, latencies and agreement
    candidates: list[dict[str, Any]] = field(default_factory=list)
    convs: int = 0  # convolutions in the fp32 model
    integer_convs: int = 0  # convolution kernels onnxruntime runs in int8 (its optimized graph, this CPU)
    float_convs: int = 0  # convolution kernels it runs in float
    conv_kernels: dict[str, int] = field(default_factory=dict)  # the optimized graph's convolution operators
    fp32_p50_ms: dict[str, float] = field(default_factory=dict)  # int8 auto: fp32 timed beside the candidates
    int8_p50_ms: dict[str, float] = field(default_factory=dict)  # int8 auto: the candidate kept, timed beside fp32
    warning: str = ""  # int8 auto: set when the model built is no faster than fp32 at any batch size timed
    bias_corrected_layers: int = 0  # int8 static QDQ: layers whose bias the layer-wise correction adjusted
    per_channel: bool | None = None  # int8: per-channel weight scales (False: per-tensor, kept by the auto search)
    # The task metric on the check inputs where their labels are known (the model's own test split):
    # {"name", "fp32", "variant", "inputs"}; None otherwise.
    labelled_check: dict[str, Any] | None = None
    passed_by: str = "agreement"  # or "accuracy": below min_agreement, within max_accuracy_drop

    @property
    def conv_summary(self) -> str:
        """``N of M convolutions run as integer kernels`` (read from onnxruntime's optimized graph)."""
        return (f"{self.integer_convs} of {self.convs} convolutions run as integer kernels "
                f"({self.float_convs} in float)")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "conv_summary": self.conv_summary}


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
    """Image stems: ordinary (not grouped) convolutions over 1-3 input channels. Their GEMM depth (channels x
    kernel) is too shallow for int8 kernels to pay off on their own (measured on this AVX-512 VNNI CPU, one conv
    alone: LeNet's 1->6 5x5 stem 0.31 ms fp32 vs 1.42 ms int8 at batch 64, MobileNetV2's 3->32 3x3 0.13 vs 0.34 ms
    at batch 1), but in a whole model int8 can still win (MobileNetV2: 33-37 vs 38-46 ms at batch 32, no float-to-int8
    layout change after the stem), so int8 runs a stem in int8 where the whole model measures faster that way
    (:func:`_select_int8`), in float otherwise (LeNet-5, deep_convnet). Depthwise convolutions (weights ``C x 1 x k x k``, ``group = C``) are not stems: an
    earlier rule tested the weights' second dimension alone and kept all 17 of MobileNetV2's in float (issue 17)."""
    weights = {t.name: t for t in model.graph.initializer}
    stems = []
    for n in model.graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        dims = weights[n.input[1]].dims if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in weights else []
        if len(dims) == 4 and group == 1 and dims[1] <= 3:
            stems.append(n.name)
    return stems


def optimized_op_counts(path: str | Path, folder: str | Path | None = None) -> dict[str, int]:
    """Operator counts of the graph onnxruntime really runs on this CPU: ``path`` after the runtime's own graph
    optimizations (level ``all``, as :class:`~dlpipe.runtime.engine.Engine` runs it, with its QDQ fusions and
    NCHWc / NHWC layout changes), read back from ``SessionOptions.optimized_model_filepath``. Operators of another
    domain than ONNX's are counted as ``domain:op`` (``com.microsoft:QLinearConv``)."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _optimized_session(Path(path), Path(tmp) / "optimized.onnx")
        return _counts(Path(tmp) / "optimized.onnx")


def _optimized_session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    """A CPU session as the runtime makes one (all graph optimizations, default threads); with ``optimized``,
    the graph it runs is written there (onnxruntime's warning that such a file is hardware-specific is silenced:
    that is why it is read)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = GRAPH_OPTIMIZATION["all"]
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def conv_kernels(counts: dict[str, int]) -> tuple[int, int]:
    """(integer, float) convolution kernels among optimized operator counts: QLinearConv (ONNX's or onnxruntime's
    NHWC one) and ConvInteger run in int8; Conv (ONNX's or the NCHWc one) and FusedConv in float."""
    def total(ops: tuple[str, ...]) -> int:
        return sum(v for k, v in counts.items() if k.rpartition(":")[2] in ops)
    return total(INTEGER_CONV_OPS), total(FLOAT_CONV_OPS)


@dataclass
class Conversion:
    """What a conversion built: the format (``fp16``, an int8 format or ``dynamic``), the nodes kept in float32,
    why that format, and every int8 candidate measured."""

    format: str
    kept: list[str]
    reason: str
    candidates: list[dict[str, Any]] = field(default_factory=list)
    search: str = ""  # what leaving convolutions out of quantization achieved, when no candidate passed the gate
    fp32_p50_ms: dict[str, float] = field(default_factory=dict)  # fp32 timed beside the candidates
    int8_p50_ms: dict[str, float] = field(default_factory=dict)  # the candidate kept, timed beside fp32
    warning: str = ""  # said when the int8 model built is no faster than fp32 at any batch size timed
    bias_corrected: int = 0  # layers whose bias correct_biases adjusted in the model kept
    per_channel: bool | None = None  # the kept int8 model's weight scales, where the search chose them


@dataclass
class _Candidate:
    """One int8 build of the model: its format, what it leaves in float, and what was measured of it."""

    name: str
    format: str
    path: Path
    excluded: list[str]
    kernels: dict[str, int] = field(default_factory=dict)
    agreement: float | None = None
    p50_ms: dict[int, float] = field(default_factory=dict)
    same_as: str | None = None
    accepted: bool = False  # by the gate (the judge says)
    bias_check: dict[str, Any] | None = None  # what correct_biases measured (None: not run)
    per_channel: bool = True

    @property
    def bias_corrected(self) -> int:
        """Layers whose bias correct_biases adjusted (0: not run, or not kept)."""
        return self.bias_check["layers"] if self.bias_check else 0

    def score(self) -> float:
        """Geometric mean of the median latencies over the timed batch sizes (lower is faster)."""
        return float(np.exp(np.mean(np.log(list(self.p50_ms.values()))))) if self.p50_ms else float("inf")

    def as_dict(self) -> dict[str, Any]:
        integer, floating = conv_kernels(self.kernels)
        return {"name": self.name, "format": self.format, "per_channel": self.per_channel,
                "float_nodes": len(self.excluded),
                "integer_convs": integer, "float_convs": floating, "agreement": self.agreement,
                "p50_ms": {str(b): round(v, 4) for b, v in self.p50_ms.items()}, "same_kernels_as": self.same_as,
                "bias_corrected_layers": self.bias_corrected, "bias_correction_check": self.bias_check}


@dataclass
class _Int8Build:
    """Builds int8 variants of one pre-processed model from one calibration: the activation ranges are computed
    once (:func:`_calibrate`) and every candidate reads them from onnxruntime's calibration cache."""

    prep: Path
    folder: Path
    cfg: QuantizationConfig
    op_types: list[str] | None
    cache: Path | None
    finish: Callable[[Path], None] | None = None  # applied to every build (the policy's output bias correction)
    bias_inputs: np.ndarray | None = None  # calibration inputs for correct_biases (None: no layer-wise correction)
    input_name: str = ""

    def __call__(self, fmt: str, excluded: list[str], name: str, per_channel: bool | None = None) -> _Candidate:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

        per_channel = self.cfg.per_channel if per_channel is None else per_channel
        out = self.folder / f"{name}.onnx"
        if self.cfg.method == "dynamic":
            quantize_dynamic(str(self.prep), str(out), per_channel=per_channel, weight_type=QuantType.QInt8,
                             nodes_to_exclude=excluded, op_types_to_quantize=self.op_types)
        else:
            quant_format, activation = INT8_FORMATS[fmt]
            quantize_static(str(self.prep), str(out), None, op_types_to_quantize=self.op_types,
                            quant_format=QuantFormat[quant_format], per_channel=per_channel,
                            activation_type=QuantType[activation], weight_type=QuantType.QInt8,
                            calibrate_method=_calibration_method(self.cfg), nodes_to_exclude=excluded,
                            calibration_cache_path=str(self.cache),
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        check = None
        if self.bias_inputs is not None and fmt.startswith("qdq"):
            check = correct_biases(out, self.prep, self.bias_inputs, self.input_name)
        if self.finish is not None:
            self.finish(out)
        return _Candidate(name, fmt, out, list(excluded), bias_check=check, per_channel=per_channel)


def _calibration_method(cfg: QuantizationConfig):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]


def _calibrate(prep: Path, folder: Path, cfg: QuantizationConfig, op_types: list[str] | None, input_name: str,
               calibration: np.ndarray, unbatched: bool) -> Path:
    """Activation ranges of ``prep`` on the calibration inputs, computed once and saved as onnxruntime's
    calibration cache (what ``quantize_static`` would compute itself, for the same operator types). The inputs
    go in :data:`CALIBRATION_STRIDE` at a time: onnxruntime's calibrators keep every intermediate tensor of
    one collection in memory (256 MobileNetV2 inputs at 224x224 ran a 23 GB machine out of memory); minmax
    ranges and histograms merge across collections."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    # onnxruntime's entropy calibrator defaults to 128 histogram bins for 128 quantized bins, which leaves it one
    # threshold to try, the full range: minmax's answer (measured: identical ranges and outputs on MobileNetV2).
    options = {"num_bins": ENTROPY_BINS} if cfg.calibration_method == "entropy" else {}
    calibrator = create_calibrator(prep, op_types or sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                   augmented_model_path=str(folder / "augmented.onnx"),
                                   calibrate_method=_calibration_method(cfg), extra_options=options)
    for start in range(0, len(calibration), CALIBRATION_STRIDE):
        chunk = calibration[start:start + CALIBRATION_STRIDE]
        # one batch per collection: the histogram collectors (percentile, entropy) stack a collection's
        # batches, so a short last batch would make them ragged
        calibrator.collect_data(ArrayCalibrationReader(input_name, chunk, batch=len(chunk), unbatched=unbatched))
    cache = folder / "calibration.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def _preprocess(src: Path, prep: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(prep), skip_symbolic_shape=False)
    except Exception:  # symbolic inference gives up on some dynamic spatial axes; ONNX's own suffices
        quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)


def _to_int8(src: Path, dst: Path, cfg: QuantizationConfig, calibration: np.ndarray | None, input_name: str,
             policy: QuantizationPolicy, unbatched: bool = False, judge: Judge | None = None,
             finish: Callable[[Path], None] | None = None) -> Conversion:
    """Static (calibrated, per-channel int8 weights) or dynamic int8 with the policy's operator set; the format
    (:data:`INT8_FORMATS`), and which convolutions stay in float, picked by measurement when ``judge`` is given
    (:func:`_select_int8`), else ``qdq-u8s8`` with the image stems in float. Returns what was done."""
    src, dst = src.resolve(), dst.resolve()  # the work below runs in a temporary directory
    # onnxruntime's calibrators print progress; the command line's stdout may be JSON
    with tempfile.TemporaryDirectory() as tmp, _working_directory(tmp), contextlib.redirect_stdout(io.StringIO()):
        folder = Path(tmp)
        _preprocess(src, folder / "prep.onnx")
        model = onnx.load(str(folder / "prep.onnx"))
        excluded = [n.name for n in model.graph.node if n.op_type in cfg.keep_fp32 or n.name in cfg.exclude_nodes]
        stems = [name for name in _stem_convs(model) if name not in excluded]
        op_types = list(policy.int8_ops) if policy.int8_ops else None
        cache = None if cfg.method == "dynamic" else _calibrate(folder / "prep.onnx", folder, cfg, op_types, input_name,
                                                                calibration, unbatched)
        correct = cfg.bias_correction and cfg.method == "static" and not unbatched and calibration is not None
        build = _Int8Build(folder / "prep.onnx", folder, cfg, op_types, cache, finish,
                           calibration[:BIAS_CORRECTION_INPUTS] if correct else None, input_name)
        if judge is None or cfg.method == "dynamic":
            fmt = "dynamic" if cfg.method == "dynamic" else ("qdq-u8s8" if cfg.format == "auto" else cfg.format)
            built = build(fmt, excluded + stems, fmt)
            shutil.copyfile(built.path, dst)
            why = ("dynamic int8 (ConvInteger/MatMulInteger)" if fmt == "dynamic" else
                   f"{fmt}, {'the default' if cfg.format == 'auto' else 'as asked'}: a package's graphs are not timed")
            choice = Conversion(fmt, excluded + stems, why, bias_corrected=built.bias_corrected)
        else:
            inputs = _timing_inputs(calibration, cfg.batch, unbatched)
            choice, winner = _select_int8(build, judge, src, input_name, inputs, excluded, stems, calibration)
            shutil.copyfile(winner.path, dst)
    choice.kept += [f"{n.op_type}:{n.name}" for n in model.graph.node if n.op_type in policy.reported_fp32_ops]
    return choice


def _timing_inputs(calibration: np.ndarray, batch: int, unbatched: bool) -> dict[int, np.ndarray]:
    """Inputs to time candidates on: one input, and (for batched models) ``batch`` inputs (repeated calibration
    inputs where there are fewer)."""
    if unbatched:
        return {1: calibration[0]}
    many = np.concatenate([calibration] * -(-batch // len(calibration)))[:batch]
    return {1: calibration[:1], batch: np.ascontiguousarray(many)} if batch > 1 else {1: calibration[:1]}


def _measure(candidates: list[_Candidate], judge: Judge, src: Path, input_name: str,
             inputs: dict[int, np.ndarray]) -> dict[int, float]:
    """Fill in each candidate's optimized kernels, agreement and latencies (timed side by side, interleaved,
    with fp32 as the reference). A candidate that quantizes the same nodes to the same activation type as an
    earlier one and whose optimized graph runs the same kernels (QDQ and QOperator U8S8 both become QLinearConv)
    is the same program: it is marked ``same_as`` and neither judged nor timed.
    Returns fp32's latencies."""
    from dlpipe.runtime.benchmark import measure_interleaved

    sessions = {"fp32": _optimized_session(src)}
    seen: dict[tuple, str] = {}
    for c in candidates:
        optimized = c.path.with_suffix(".optimized.onnx")
        session = _optimized_session(c.path, optimized)
        c.kernels = _counts(optimized)
        key = (INT8_FORMATS.get(c.format, ("", c.format))[1], c.per_channel, tuple(sorted(c.excluded)),
               tuple(sorted(c.kernels.items())))
        if key in seen:
            c.same_as = seen[key]
            continue
        seen[key] = c.name
        if c.agreement is None:
            c.agreement, c.accepted = judge(c.path)
        sessions[c.name] = session
    reference: dict[int, float] = {}
    for batch, x in inputs.items():
        runners = {name: (lambda s=s: s.run(None, {input_name: x})) for name, s in sessions.items()}
        runners["fp32"]()  # the first run of a session is slow; the second sizes the timing
        start = time.perf_counter()
        runners["fp32"]()
        iters = int(min(TIMING_ITERS[1], max(TIMING_ITERS[0], TIMING_BUDGET_S / (time.perf_counter() - start))))
        stats = measure_interleaved(runners, batch=batch, warmup=1, iters=iters, rounds=3, pause_s=TIMING_PAUSE_S,
                                    attempts=2)
        reference[batch] = stats["fp32"].p50_ms
        for c in candidates:
            if c.name in stats:
                c.p50_ms[batch] = stats[c.name].p50_ms
    return reference


def _counts(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _worth_its_cost(c: _Candidate, other: _Candidate) -> bool:
    """Whether ``c``, a less exact twin of ``other``, is worth keeping: faster at the largest batch size both were
    timed at (throughput, where int8 pays) and at most :data:`TWIN_SLOWER_LIMIT` slower at every other."""
    timed = [b for b in c.p50_ms if b in other.p50_ms]
    if not timed:
        return False
    largest = max(timed)
    return c.p50_ms[largest] < other.p50_ms[largest] and \
        all(c.p50_ms[b] <= TWIN_SLOWER_LIMIT * other.p50_ms[b] for b in timed)


def _choose(candidates: list[_Candidate]) -> tuple[_Candidate | None, str]:
    """The fastest candidate that passes the agreement gate. Between formats, the first passing one in
    :data:`INT8_FORMATS`' order of preference unless the fastest beats it by :data:`PREFERENCE_MARGIN` (timing
    noise on a shared machine must not flip the format); within a format, image stems run in int8, and weights
    have per-tensor scales, only when that is faster at the largest batch size timed, and nowhere more than
    :data:`TWIN_SLOWER_LIMIT` slower, than the same build with the stems in float / per-channel scales (each
    costs accuracy: an int8 stem of one or three input channels the most, and onnxruntime's integer kernel for
    it can be faster at batch 1 and several times slower at batch 64, which a geometric mean of the two would
    hide). Returns it (None when none passes) and why."""
    passing = [c for c in candidates if c.same_as is None and c.agreement is not None and c.accepted]
    for c in list(passing):  # the less exact twin stays in the running only when worth its cost
        twin = next((t for t in passing if t is not c and t.format == c.format and (
            (t.per_channel == c.per_channel and set(t.excluded) > set(c.excluded))
            or (t.per_channel and not c.per_channel and t.excluded == c.excluded))), None)
        if twin is not None and not _worth_its_cost(c, twin):
            passing.remove(c)
    if not passing:
        return None, ""
    fastest = min(passing, key=_Candidate.score)
    if fastest.format == passing[0].format or passing[0].score() >= PREFERENCE_MARGIN * fastest.score():
        return fastest, f"fastest of {len(passing)} passing the gate: {_describe(fastest)}"
    chosen = min((c for c in passing if c.format == passing[0].format), key=_Candidate.score)
    return chosen, (f"first format in order of preference, {_describe(chosen)}; the fastest, {fastest.name}, was "
                    f"within {PREFERENCE_MARGIN - 1:.0%}")


def _describe(c: _Candidate) -> str:
    times = ", ".join(f"{v:.3g} ms at batch {b}" for b, v in c.p50_ms.items())
    integer, floating = conv_kernels(c.kernels)
    return f"{c.name} ({times}; {integer} integer / {floating} float conv kernels; agreement {c.agreement:.2%})"


def _select_int8(build: _Int8Build, judge: Judge, src: Path, input_name: str, inputs: dict[int, np.ndarray],
                 excluded: list[str], stems: list[str], calibration: np.ndarray) -> tuple[Conversion, _Candidate]:
    """Build every requested format with the image stems in float, and the first format with them in int8 too
    (a stem runs in int8 when that measures faster); read which kernels onnxruntime fuses, check agreement and
    time them side by side (:func:`_measure`); keep the fastest that passes the gate (:func:`_choose`). When none agrees well enough, the convolutions int8 hurts most are
    left out of quantization (:func:`_float_search`)."""
    formats = list(INT8_FORMATS) if build.cfg.format == "auto" else [build.cfg.format]
    plans = [(fmt, excluded + stems, fmt, None) for fmt in formats]
    plans += [(formats[0], list(excluded), f"{formats[0]}-int8-stem", None)] if stems else []
    if build.cfg.format == "auto" and build.cfg.per_channel:  # onnxruntime's default weight scales, measured too
        plans += [(formats[0], excluded + stems, f"{formats[0]}-per-tensor", False)]
    candidates, failed = [], []
    for fmt, nodes, name, per_channel in plans:
        try:
            candidates.append(build(fmt, nodes, name, per_channel))
        except Exception as exc:  # a format onnxruntime cannot build for this graph is reported, not fatal
            failed.append({"name": name, "format": fmt, "error": (str(exc).strip().splitlines() or [type(exc).__name__])[0]})
    if not candidates:
        raise QuantizationError(f"no int8 format could be built: {failed}")
    fp32_ms = _measure(candidates, judge, src, input_name, inputs)
    winner, why = _choose(candidates)
    search = ""
    if winner is None:
        first = min((c for c in candidates if c.same_as is None and c.per_channel == build.cfg.per_channel),
                    key=_Candidate.score)
        winner, search = _float_search(build, judge, first, first.excluded, calibration, input_name)
        if not winner.p50_ms:  # what leaving convolutions out costs, timed beside the fastest candidate
            first.p50_ms = {}
            _measure([first, winner], judge, src, input_name, inputs)
        why = f"{search}; result: {_describe(winner)}"
        candidates += [winner] if all(c is not winner for c in candidates) else []
    if stems:
        twins = {c.excluded == excluded: c for c in candidates[:len(plans)]
                 if c.format == formats[0] and c.per_channel == build.cfg.per_channel}
        if len(twins) == 2 and twins[True].p50_ms:
            where = "int8" if set(stems).isdisjoint(winner.excluded) else "float"
            why += (f"; image stem {', '.join(stems)} in {where}: with it in int8 {_describe(twins[True])}, "
                    f"in float {_describe(twins[False])}")
    why += "; fp32 " + ", ".join(f"{v:.3g} ms at batch {b}" for b, v in fp32_ms.items())
    return Conversion(winner.format, winner.excluded, why, [*(c.as_dict() for c in candidates), *failed], search,
                      {str(b): round(v, 4) for b, v in fp32_ms.items()}, {str(b): round(v, 4) for b, v in
                      winner.p50_ms.items()}, _slower_warning(winner, fp32_ms), winner.bias_corrected,
                      winner.per_channel), winner


def _slower_warning(winner: _Candidate, fp32_ms: dict[int, float]) -> str:
    """A warning when the int8 model is no faster than fp32 at every batch size timed (small convolutions, where
    quantizing and dequantizing costs more than integer kernels save): it is still smaller, but not faster."""
    timed = [b for b in fp32_ms if b in winner.p50_ms]
    if not timed or any(winner.p50_ms[b] < fp32_ms[b] for b in timed):
        return ""
    return ("int8 is no faster than fp32 on this CPU (" + ", ".join(
        f"batch {b}: {winner.p50_ms[b]:.3g} vs {fp32_ms[b]:.3g} ms" for b in timed) + "); keep the fp32 model where "
        "speed matters: the int8 one is only smaller")


def _float_search(build: _Int8Build, judge: Judge, start: _Candidate, excluded: list[str], calibration: np.ndarray,
                  input_name: str) -> tuple[_Candidate, str]:
    """No candidate agrees with fp32 well enough: leave out of quantization the convolutions that int8 hurts most,
    ranked by :func:`_conv_sensitivity`, 1, 2, 4... of them (at most a quarter of the convolutions), re-measuring
    agreement each time; the first set that passes wins. When none does, the best attempt is returned (and the
    gate refuses it). Returns the candidate and the reason."""
    model = onnx.load(str(build.prep))
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in excluded]
    ranking = _conv_sensitivity(build, start, convs, calibration[:SENSITIVITY_INPUTS], input_name)
    best, tried, count, cap = start, [], 1, max(1, len(convs) // 4)
    while ranking and count <= cap:
        trial = build(start.format, excluded + ranking[:count], f"{start.format}-float{count}")
        trial.agreement, trial.accepted = judge(trial.path)
        tried.append(f"{count}: {trial.agreement:.2%}")
        if trial.accepted or trial.agreement > (best.agreement or 0):
            best = trial
        if trial.accepted:
            break
        count = cap if count < cap < 2 * count else 2 * count
    verdict = "passes" if best.accepted else "still fails"
    # An excluded QDQ convolution between quantized neighbours is quantized again by onnxruntime itself (its
    # WeightBiasQuantization pass; MobileNetV2: 13 left out, 3 ran in float): what runs is in the kernel counts.
    trials = ", ".join(tried) or "none to try"
    return best, (f"no format agreed with fp32 (the fastest, {start.name}: {start.agreement:.2%}); left out of "
                  f"quantization the convolutions int8 hurts most (agreement by count: {trials}): "
                  f"{len(best.excluded) - len(excluded)} left out {verdict} (onnxruntime quantizes the weights "
                  f"of those between quantized neighbours itself; the convolution counts say what runs in float)")


def _conv_sensitivity(build: _Int8Build, candidate: _Candidate, convs: list[onnx.NodeProto], inputs: np.ndarray,
                      input_name: str) -> list[str]:
    """Convolutions ordered by the error int8 adds in each: the relative error of its output minus that of its
    input, fp32 against a QDQ build (whose tensors keep their fp32 names) on a few calibration inputs."""
    qdq = candidate if candidate.format.startswith("qdq") else build(
        "qdq-" + candidate.format.partition("-")[2], candidate.excluded, "ranking")
    names = sorted({t for n in convs for t in (n.input[0], n.output[0])})
    ref, got = _intermediates(build.prep, names, inputs, input_name), _intermediates(qdq.path, names, inputs, input_name)
    error = {t: float(np.linalg.norm(got[t] - ref[t]) / (np.linalg.norm(ref[t]) + 1e-12))
             for t in names if t in got and t in ref and got[t].shape == ref[t].shape}
    added = {n.name: error.get(n.output[0], 0.0) - error.get(n.input[0], 0.0) for n in convs}
    return sorted(added, key=added.__getitem__, reverse=True)


def _intermediates(path: Path, names: list[str], inputs: np.ndarray, input_name: str) -> dict[str, np.ndarray]:
    """The tensors ``names`` (those the model has) computed on ``inputs``."""
    model = onnx.load(str(path))
    produced = {o for n in model.graph.node for o in n.output}  # a graph input is the same in both models
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names if t in produced and t not in outputs)
    exposed = path.with_suffix(".intermediates.onnx")
    onnx.save(model, str(exposed))
    options = ort.SessionOptions()
    options.graph_optimization_level = GRAPH_OPTIMIZATION["disable"]
    session = ort.InferenceSession(str(exposed), options, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs() if o.name in names]
    if len(session.get_inputs()[0].shape) == inputs.ndim - 1:  # a graph without a batch axis: one at a time
        runs = [session.run(wanted, {input_name: x}) for x in inputs]
        return {name: np.concatenate([r[i].ravel() for r in runs]) for i, name in enumerate(wanted)}
    return dict(zip(wanted, session.run(wanted, {input_name: inputs})))


def _convert(src: Path, dst: Path, cfg: QuantizationConfig, calibration: np.ndarray | None, task: Task, *,
             judge: Judge | None = None, finish: Callable[[Path], None] | None = None) -> Conversion:
    """``src`` as ``cfg.precision`` in ``dst``; onnxruntime's and the converter's failures as one clear error."""
    try:
        if cfg.precision == "fp16":
            return Conversion("fp16", _to_fp16(src, dst, cfg, task.quantization), "")
        input_name = Engine(src, device="cpu").input_names[0]
        return _to_int8(src, dst, cfg, calibration, input_name, task.quantization, unbatched=not task.batched,
                        judge=judge, finish=finish)
    except DlpipeError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QuantizationError(f"{cfg.precision} quantization of '{src}' failed: {first}") from None


def _upstream(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """``model`` with ``outputs`` as its outputs and only the nodes and initializers they need (onnxruntime
    would run the whole graph: an early layer of MobileNetV2 at 224x224 took 0.19 s for 32 images instead of
    0.08). A graph with subgraphs (If, Loop) is only given the new outputs."""
    made = {o: n for n in model.graph.node for o in n.output}
    needed, stack = set(), list(outputs)
    while stack:
        node = made.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                 for n in model.graph.node for a in n.attribute)
    kept = [n for n in model.graph.node if nested or id(n) in needed]
    used = {t for n in kept for t in n.input}
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    del pruned.graph.node[:], pruned.graph.output[:]
    pruned.graph.node.extend(kept)
    pruned.graph.output.extend(onnx.ValueInfoProto(name=t) for t in outputs)
    if not nested:
        initializers = [t for t in pruned.graph.initializer if t.name in used]
        del pruned.graph.initializer[:]
        pruned.graph.initializer.extend(initializers)
    return pruned


def _chunked_runs(model: onnx.ModelProto, names: list[str], inputs: np.ndarray, input_name: str):
    """The tensors ``names`` of ``model`` on ``inputs``, :data:`BIAS_CORRECTION_CHUNK` inputs at a time (a list
    per chunk), from a CPU session at the runtime's optimization level (what the deployed model computes) over
    the part of the graph they need (:func:`_upstream`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = GRAPH_OPTIMIZATION["all"]
    session = ort.InferenceSession(_upstream(model, names).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    for start in range(0, len(inputs), BIAS_CORRECTION_CHUNK):
        yield session.run(names, {input_name: inputs[start:start + BIAS_CORRECTION_CHUNK]})


def _layer_means(model: onnx.ModelProto, channels: dict[str, int], inputs: np.ndarray,
                 input_name: str) -> dict[str, np.ndarray]:
    """Per-channel means of the tensors named in ``channels`` (name -> its channel axis) of ``model`` on
    ``inputs``, summed a chunk at a time (a reference's every layer at once would not fit in memory)."""
    names = list(channels)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for outs in _chunked_runs(model, names, inputs, input_name):
        for name, out in zip(names, outs):
            axis = channels[name] % out.ndim
            total = out.astype(np.float64).sum(axis=tuple(a for a in range(out.ndim) if a != axis))
            sums[name] = sums[name] + total if name in sums else total
            counts[name] = counts.get(name, 0) + out.size // out.shape[axis]
    return {name: sums[name] / counts[name] for name in names}


def _run_outputs(model: onnx.ModelProto, names: list[str], inputs: np.ndarray,
                 input_name: str) -> dict[str, np.ndarray]:
    """The graph outputs ``names`` of ``model`` on ``inputs``."""
    runs = list(_chunked_runs(model, names, inputs, input_name))
    return {name: np.concatenate([r[j] for r in runs]) for j, name in enumerate(names)}


def _output_error(model: onnx.ModelProto, reference: dict[str, np.ndarray], inputs: np.ndarray,
                  input_name: str) -> float:
    """Mean absolute difference of ``model``'s outputs from ``reference``'s, relative to the reference's mean
    magnitude, summed over the outputs."""
    got = _run_outputs(model, list(reference), inputs, input_name)
    return float(sum(np.abs(got[k] - v).mean() / (np.abs(v).mean() + 1e-12) for k, v in reference.items()))


def _dequantized_name(model: onnx.ModelProto, tensor: str) -> str:
    """The name ``tensor`` has again after a QuantizeLinear -> DequantizeLinear pair (itself when none)."""
    after = {n.input[0]: n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    q = after.get(tensor)
    dq = after.get(q.output[0]) if q is not None and q.op_type == "QuantizeLinear" else None
    return dq.output[0] if dq is not None and dq.op_type == "DequantizeLinear" else tensor


def correct_biases(quantized: Path, reference: Path, inputs: np.ndarray, input_name: str) -> dict[str, Any]:
    """Empirical bias correction (Nagel et al., 2019, "Data-Free Quantization", section 4.2), layer by layer
    from the input: int8 weights, clipped activation ranges and rounding shift the mean output of a layer, and
    each shift feeds the next layer. For every QDQ Conv and Gemm with an int32 bias, in graph order, the mean
    output per channel on ``inputs`` as the int8 model computes it (with every earlier correction in place, at
    the runtime's optimization level) is made equal to the fp32 ``reference``'s, by subtracting the difference
    from the int32 bias in the bias's own scale. A layer whose output onnxruntime merged with a ReLU/Clip is
    compared before that activation. Measured on MobileNetV2 fine-tuned on Fashion-MNIST (issue 17): the
    int8 model's test accuracy went from 0.73 to 0.24 points below fp32 (bench/transfer_imagenet.py --deploy).
    It does not help every model (a randomly initialised quarter-width MobileNetV2 came out further from
    fp32), so the result is kept only when the outputs on ``inputs`` come closer to fp32's (mean absolute
    difference). Rewrites ``quantized`` in place when kept; returns what it did: layers corrected (0 when not
    kept), whether kept, and the output error before and after."""
    from onnx import numpy_helper

    model, ref = onnx.load(str(quantized)), onnx.load(str(reference))
    inits = {t.name: t for t in model.graph.initializer}
    made = {o: n for n in model.graph.node for o in n.output}
    ref_made = {o: n for n in ref.graph.node for o in n.output}
    layers = []  # (output, the reference tensor, the int32 bias initializer, its scale initializer, operator)
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        dq = made.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
            continue
        if inits[dq.input[0]].data_type != onnx.TensorProto.INT32:
            continue
        out = node.output[0]
        # a graph output is quantized and dequantized again under its own name (`logits`); the layer writes
        # `logits_QuantizeLinear_Input`, which the reference does not have
        source = ref_made.get(_dequantized_name(model, out) if out not in ref_made else out)
        if source is not None and source.op_type in FOLDED_ACTIVATIONS:  # the activation folded into the range
            source = ref_made.get(source.input[0])
        out_ref = source.output[0] if source is not None else None
        if source is None or source.op_type != node.op_type:
            continue
        layers.append((out, out_ref, dq.input[0], dq.input[1], node.op_type))
    if not layers:
        return {"layers": 0, "kept": False, "output_error": None}
    outputs = [o.name for o in model.graph.output]
    expected = _run_outputs(ref, outputs, inputs, input_name)
    before = _output_error(model, expected, inputs, input_name)
    channel = {"Conv": 1, "Gemm": -1}
    target = _layer_means(ref, {r: channel[op] for _, r, *_, op in layers}, inputs, input_name)
    corrected = 0
    for out, out_ref, bias_name, scale_name, op in layers:
        got = _layer_means(model, {out: channel[op]}, inputs, input_name)[out]
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.int64)
        scale = numpy_helper.to_array(inits[scale_name]).astype(np.float64)
        shift = got - target[out_ref]
        if shift.shape != bias.shape or not np.all(np.isfinite(shift)):
            continue
        fixed = np.clip(bias - np.round(shift / scale).astype(np.int64), np.iinfo(np.int32).min, np.iinfo(np.int32).max)
        inits[bias_name].CopyFrom(numpy_helper.from_array(fixed.astype(np.int32), bias_name))
        corrected += 1
    after = _output_error(model, expected, inputs, input_name)
    kept = corrected > 0 and after < before
    if kept:
        onnx.save(model, str(quantized))
    return {"layers": corrected if kept else 0, "kept": kept, "output_error": [round(before, 6), round(after, 6)]}


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


def _record(path: Path, config: QuantizationConfig, kept: list[str], source: str, calibration: dict | None,
            extra: dict[str, Any] | None = None) -> onnx.ModelProto:
    """Write what quantization did into the model's metadata; returns the model."""
    model = onnx.load(str(path))
    doc = read_metadata(model) or {}
    doc["precision"] = config.precision
    doc["quantization"] = {k: v for k, v in asdict(config).items() if k != "min_agreement"}
    doc["quantization"].update(kept_fp32=kept, source=source, **(extra or {}))
    if calibration is not None:
        doc["quantization"]["calibration"] = calibration
    write_metadata(model, doc)
    onnx.save(model, str(path))
    return model


def _record_gate(path: Path, gate: dict[str, Any]) -> None:
    """Add the agreement gate the variant passed (measured, threshold, inputs) to its metadata (model cards)."""
    model = onnx.load(str(path))
    doc = read_metadata(model) or {}
    doc.setdefault("quantization", {})["gate"] = gate
    write_metadata(model, doc)
    onnx.save(model, str(path))


def _conv_counts(fp32_path: Path, variant: Path) -> dict[str, Any]:
    """The fp32 model's convolutions and how the variant's run in onnxruntime's optimized graph (QuantizeReport's
    ``convs``, ``integer_convs``, ``float_convs`` and ``conv_kernels``)."""
    total = sum(n.op_type == "Conv" for n in onnx.load(str(fp32_path), load_external_data=False).graph.node)
    kernels = optimized_op_counts(variant, folder=variant.parent)
    integer, floating = conv_kernels(kernels)
    return {"convs": total, "integer_convs": integer, "float_convs": floating,
            "conv_kernels": {k: v for k, v in kernels.items() if k.rpartition(":")[2] in INTEGER_CONV_OPS + FLOAT_CONV_OPS}}


def _what_was_done(conversion: Conversion, convs: dict[str, Any], config: QuantizationConfig) -> dict[str, Any]:
    """The conversion's format, why, its candidates and convolution counts, for the model's metadata."""
    return {"format": conversion.format, "format_requested": config.format if config.precision == "int8" else None,
            "format_reason": conversion.reason, "candidates": conversion.candidates,
            "fp32_p50_ms": conversion.fp32_p50_ms, "int8_p50_ms": conversion.int8_p50_ms,
            "warning": conversion.warning, "bias_corrected_layers": conversion.bias_corrected,
            "convolutions": {"integer": convs["integer_convs"], "float": convs["float_convs"], "total": convs["convs"]},
            # the CPU the format was timed on: the runtime warns when the file runs on another kind
            "cpu": cpu_info() if config.precision == "int8" else None}


def _passed_by(agreement: float, config: QuantizationConfig, labelled: dict[str, Any] | None) -> str | None:
    """What a variant passes the gate by: ``agreement`` (at least ``min_agreement``), else ``accuracy`` (its
    labelled metric within ``max_accuracy_drop`` points of fp32's), else None."""
    if agreement >= config.min_agreement:
        return "agreement"
    if labelled and config.max_accuracy_drop is not None and \
            100 * (labelled["fp32"] - labelled["variant"]) <= config.max_accuracy_drop + 1e-9:
        return "accuracy"
    return None


def _judge(path: Path, fp32, policy: QuantizationPolicy, checks: np.ndarray, labels: np.ndarray | None,
           config: QuantizationConfig, fp32_metric: dict[str, float]) -> tuple[float, bool]:
    """An int8 candidate's agreement with fp32 on the checks and whether the gate accepts it (its labelled metric
    is measured only when agreement alone does not pass and ``max_accuracy_drop`` is set; fp32's once, kept in
    ``fp32_metric``)."""
    variant = load(path, device="cpu")
    agreement = policy.agreement(fp32, variant, checks)[0]
    labelled = None
    if agreement < config.min_agreement and config.max_accuracy_drop is not None and labels is not None:
        if "fp32" not in fp32_metric:
            fp32_metric["fp32"] = policy.labelled_metric(fp32, checks, labels)
        labelled = {"fp32": fp32_metric["fp32"], "variant": policy.labelled_metric(variant, checks, labels)}
    return agreement, _passed_by(agreement, config, labelled) is not None


def _gate(agreement: float, config: QuantizationConfig, task: Task, checks: int, search: str = "",
          labelled: dict[str, Any] | None = None) -> str:
    """Refuse a variant below the agreement gate, unless its labelled metric is within ``max_accuracy_drop``
    points of fp32's. Returns what it passed by: ``agreement`` or ``accuracy``."""
    passed = _passed_by(agreement, config, labelled)
    if passed:
        return passed
    floor = np.floor(round(agreement * 100, 6)) / 100  # the threshold this result would pass
    metric = (f"; its {labelled_text(labelled, config.precision)}" if labelled else "")
    raise QuantizationError(f"{config.precision} model agrees with fp32 on only {agreement:.2%} "
                            f"({task.quantization.agreement_name}) for {checks} check inputs (minimum "
                            f"{config.min_agreement:.0%}){metric}; try --method, more calibration images or "
                            f"--keep-fp32 OP, or accept it with --min-agreement {floor:.2f}"
                            + (" or --max-accuracy-drop POINTS" if labelled else "")
                            + " and compare the task metric with `dlpipe evaluate`"
                            + (f" ({search})" if search else ""))


def quantize(model_path: str | Path, out: str | Path | None, config: QuantizationConfig, *,
             calibration: str | None = None, check: str | None = None, check_size: int = 512,
             data_dir: str | None = None) -> QuantizeReport:
    """Write the ``config.precision`` variant of a dlpipe fp32 ONNX model (or package) to ``out`` and check it.

    Args:
        model_path: An ONNX file, or a package folder or its fp32 manifest.
        out: The variant's file; when None ``model.<precision>.onnx`` beside an ONNX file, or
            ``manifest.<precision>.json`` in a package folder.
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
    model_path = Path(model_path)
    out = Path(out) if out else variant_path(model_path, config.precision)
    fp32 = _fp32_model(model_path)
    task = get_task(fp32.info.task)
    policy = task.quantization
    if config.precision == "int8" and policy.keep_fp32_nodes is not None:
        config = replace(config, exclude_nodes=config.exclude_nodes + policy.keep_fp32_nodes(onnx.load(str(model_path))))
    calib = policy.inputs(model_path, calibration, "train", config.calibration_size, data_dir, 0) \
        if config.calibrated else None
    checks = _check_inputs(policy, model_path, config, calibration, check, check_size, data_dir)
    labels = _check_labels(policy, model_path, config, calibration, check, len(checks), data_dir)
    fp32_metric: dict[str, float] = {}  # fp32's labelled metric on the checks, measured once when needed
    if config.max_accuracy_drop is not None and labels is None:
        raise InputError(f"--max-accuracy-drop needs labelled check inputs: the model's own dataset, or a folder of "
                         f"class folders named as its labels ('{model_path}' checked on "
                         f"{check or calibration or 'its dataset'}: labels unknown)")
    bias = None
    if config.precision == "int8" and policy.bias_correct_output:
        bias = calib if calib is not None else policy.inputs(model_path, None, "train", 256, data_dir, 0)
    with atomic_output(out) as tmp:
        conversion = _convert(model_path, tmp, config, calib, task,
                              judge=lambda path: _judge(path, fp32, policy, checks, labels, config, fp32_metric),
                              finish=(lambda path: correct_output_bias(path, model_path, bias)) if bias is not None else None)
        convs = _conv_counts(model_path, tmp)
        if conversion.per_channel is not None:  # the weight scales the search kept
            config = replace(config, per_channel=conversion.per_channel)
        model = _record(tmp, config, conversion.kept, model_path.name,
                        {"source": calibration or fp32.info.raw.get("dataset"), "images": len(calib)}
                        if calib is not None else None, _what_was_done(conversion, convs, config))
        variant = load(tmp, device="cpu")
        agreement, max_abs = policy.agreement(fp32, variant, checks)
        labelled = None if labels is None else {
            "name": policy.labelled_metric_name, "fp32": policy.labelled_metric(fp32, checks, labels),
            "variant": policy.labelled_metric(variant, checks, labels), "inputs": len(labels)}
        passed_by = _gate(agreement, config, task, len(checks), conversion.search, labelled)
        _record_gate(tmp, {"agreement": agreement, "agreement_name": policy.agreement_name,
                           "min_agreement": config.min_agreement, "check_inputs": len(checks),
                           "max_abs_diff": max_abs, "labelled_check": labelled,
                           "max_accuracy_drop": config.max_accuracy_drop, "passed_by": passed_by})
    return QuantizeReport(path=str(out), precision=config.precision,
                          method=config.method if config.precision == "int8" else None, agreement=agreement,
                          check_images=len(checks), max_abs_diff=max_abs,
                          size_bytes=out.stat().st_size, fp32_size_bytes=model_path.stat().st_size,
                          op_counts=_op_counts(model), kept_fp32=conversion.kept, seconds=time.perf_counter() - start,
                          agreement_name=policy.agreement_name,
                          format=conversion.format if config.precision == "int8" else None,
                          format_reason=conversion.reason, candidates=conversion.candidates,
                          fp32_p50_ms=conversion.fp32_p50_ms, int8_p50_ms=conversion.int8_p50_ms,
                          warning=conversion.warning, bias_corrected_layers=conversion.bias_corrected,
                          per_channel=config.per_channel if config.precision == "int8" else None,
                          labelled_check=labelled, passed_by=passed_by, **convs)


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


def _check_labels(policy: QuantizationPolicy, model_path: Path, config: QuantizationConfig, calibration: str | None,
                  check: str | None, count: int, data_dir: str | None) -> np.ndarray | None:
    """The labels of :func:`_check_inputs`' inputs (same source and offset), where the task measures a labelled
    metric and they are known; None otherwise."""
    if policy.labels is None or policy.labelled_metric is None:
        return None
    own_files = check is None and calibration is not None and Path(calibration).exists()
    labels = policy.labels(model_path, check or calibration, "test", count, data_dir,
                           config.calibration_size if own_files else 0)
    return labels if labels is not None and len(labels) == count else None


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
    if config.max_accuracy_drop is not None:
        raise InputError(f"--max-accuracy-drop needs labelled check inputs; '{path}' is a package of several graphs, "
                         "gated on agreement only")
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
    suffix, kept, ops, written, formats = f".{config.precision}", [], {}, [], []
    convs = {"convs": 0, "integer_convs": 0, "float_convs": 0, "conv_kernels": {}}
    try:
        for part, plan in plans.items():
            src, tmp = folder / doc["graphs"][part], folder / f"{part}{suffix}.onnx.tmp"
            written.append(tmp)
            conversion = _convert(src, tmp, plan, calib, task)  # parts are not timed one by one: fixed formats
            kept += [f"{part}:{k}" for k in conversion.kept]
            formats.append(f"{part}:{conversion.format}")
            counts = _conv_counts(src, tmp)
            convs = {k: ({f"{part}:{op}": n for op, n in counts[k].items()} | v if isinstance(v, dict) else v + counts[k])
                     for k, v in convs.items()}
            model = _record(tmp, plan, [], src.name, None, _what_was_done(conversion, counts, plan))
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
        # the gate it passed, as a single file records it in its metadata (model cards read it)
        variant["gate"] = {"agreement": agreement, "agreement_name": policy.agreement_name,
                           "min_agreement": config.min_agreement, "check_inputs": len(checks),
                           "max_abs_diff": max_diff}
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
                          op_counts=ops, kept_fp32=kept, seconds=time.perf_counter() - start,
                          agreement_name=policy.agreement_name, format=", ".join(formats), **convs)
