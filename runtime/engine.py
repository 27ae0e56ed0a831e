"""The inference engine: one onnxruntime session, on the device that was asked for and can really run.

``device="auto"`` takes CUDA only when a CUDA session is actually created (onnxruntime otherwise
falls back to the CPU quietly, or loudly, by itself); ``device="cuda"`` that cannot run is an
error, never a silent fallback. :attr:`Engine.providers` says what is really in use. When the CUDA provider
cannot start because CUDA/cuDNN are not on the library path, the engine asks onnxruntime to load them from
the ``nvidia-*`` pip packages (``onnxruntime.preload_dlls``, what a ``pip install torch`` brings) and tries once more.

:meth:`Engine.run` takes and returns numpy arrays. :meth:`Engine.run_bound` runs through onnxruntime's IO
binding: inputs copied to the device once with :meth:`Engine.to_device` stay there between calls, and outputs
can stay on the device (``on_device=True``) for the next model or a later copy, so a GPU pays for the
host-device copies only where the caller needs them.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from dlpipe.runtime.cpu import tuned_elsewhere
from dlpipe.runtime.errors import DeviceUnavailableError, InputError, ModelFileError
from dlpipe.runtime.metadata import ModelInfo, info_from_session

DEVICES = ("auto", "cpu", "cuda")
GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_CPU_PROVIDERS = ["CPUExecutionProvider"]


def _cuda_providers(tf32: bool) -> list:
    return [("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"}), "CPUExecutionProvider"]
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
              "tensor(int8)": np.int8, "tensor(bool)": np.bool_}
_probe_lock = threading.Lock()
_preloaded = False
# What InferenceSession.run raises for a graph that cannot run on the inputs it was given (a size too small
# for a kernel or a resize, a shape its reshape cannot take): pybind exceptions that derive from Exception only.
_RUN_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name) for name in
                    ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented", "InvalidGraph", "EPFail")
                    if hasattr(ort.capi.onnxruntime_pybind11_state, name))


def available_devices() -> list[str]:
    """Devices this onnxruntime build was compiled for (``cuda`` may still fail to start; see Engine)."""
    return ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])


def _session(path: Path, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises several pybind exception types
        raise ModelFileError(f"'{path}' is not a loadable ONNX model: {_first_line(exc)}") from None


def _preload_cuda_libraries() -> bool:
    """Have onnxruntime load CUDA/cuDNN from the nvidia pip packages, once per process; False when there
    is nothing new to try. Its messages about libraries it cannot find are dropped: the caller's own error
    says what failed."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return False
    _preloaded = True
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            ort.preload_dlls()
        except Exception:  # a broken or partial CUDA install: the retry below fails the same way  # noqa: BLE001
            return False
    return True


class PrecisionWarning(UserWarning):
    """A model runs on a device its precision was not built for (it runs, but slower or less exactly)."""


class CpuMismatchWarning(UserWarning):
    """An int8 model runs on another kind of CPU than the one its format was chosen on (it runs, but its format
    may not be this CPU's fastest: see :mod:`dlpipe.runtime.cpu`)."""


def device_mismatch(device: str, precision: str, path: Path | str) -> str:
    """Why ``precision`` on ``device`` is a poor pair ('' when it is not): dlpipe's int8 files are QDQ models
    built for CPUs' integer kernels; the CUDA provider runs them as float emulation, slower than fp32, with
    answers that can differ from the CPU's int8 (on an H100: 2 of 4 photographs' top-1, README's GPU section)."""
    if device == "cuda" and precision == "int8":
        return (f"'{path}' is an int8 model built for CPUs: the CUDA provider runs it as float emulation, slower "
                "than fp32 and not the CPU's int8 answers; on a GPU serve the fp16 variant (dlpipe quantize --to "
                "fp16), or run this one with device 'cpu'")
    return ""


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Engine:
    """An onnxruntime session for one ONNX file.

    Sessions are created once; :meth:`run` is safe to call from several threads at once.

    Args:
        path: ONNX file.
        device: ``auto`` (CUDA when it really runs, else CPU), ``cpu`` or ``cuda``.
        threads: Intra-op threads (onnxruntime's default, one per core, when None).
        graph_optimization: ``disable``, ``basic``, ``extended`` or ``all``.
        spinning: let idle intra-op threads spin-wait for the next run (onnxruntime's default; fastest when
            the session has the cores to itself). A server turns it off: its event loop needs those cores.
        tf32: CUDA only: float32 convolutions and matrix products on TF32 tensor cores (10-bit mantissa), as
            onnxruntime and PyTorch's cuDNN do by default. ``False`` gives the CPU provider's float32 answers
            (ImageNet MobileNetV2's logits on an H200: max |diff| 1e-5 instead of 1e-2) at up to 1.2x the time
            at batch 32-128 (bench/results/gpu.json); cuDNN's frontend then logs "No execution plans support
            the graph" while it falls back to its older API, which does not change the answers.

    Raises:
        ModelFileError: missing or unreadable file.
        DeviceUnavailableError: ``cuda`` asked for but not usable here.
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None,
                 graph_optimization: str = "all", spinning: bool = True, tf32: bool = True):
        self.path = Path(path)
        self.tf32 = tf32
        if device not in DEVICES:
            raise InputError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise InputError(f"unknown graph optimization level {graph_optimization!r}; "
                             f"choose from {', '.join(GRAPH_OPTIMIZATION)}")
        if not self.path.is_file():
            raise ModelFileError(f"model file '{self.path}' does not exist")
        options = ort.SessionOptions()
        options.graph_optimization_level = GRAPH_OPTIMIZATION[graph_optimization]
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:  # idle intra-op threads sleep instead of spinning: they share cores with other work
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = self._create(options, device)
        self.providers: list[str] = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.inputs = self.session.get_inputs()
        self.outputs = self.session.get_outputs()
        self.input_names = [i.name for i in self.inputs]
        self.output_names = [o.name for o in self.outputs]
        self.info: ModelInfo | None = info_from_session(self.session, self.path)
        mismatch = device_mismatch(self.device, self.info.precision if self.info else "", self.path)
        if mismatch:
            warnings.warn(mismatch, PrecisionWarning, stacklevel=2)
        elif self.device == "cpu" and self.info and self.info.precision == "int8":
            elsewhere = tuned_elsewhere(self.info.raw.get("quantization"), self.path)
            if elsewhere:
                warnings.warn(elsewhere, CpuMismatchWarning, stacklevel=2)
        # A run that fails comes back as an InputError; onnxruntime's own log line would only repeat it.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        # What run() checks, worked out once: (name, dtype, rank, [(axis, fixed size), ...]).
        self._contract = [(spec.name, self.input_dtype(i), len(spec.shape),
                           [(a, d) for a, d in enumerate(spec.shape) if isinstance(d, int)])
                          for i, spec in enumerate(self.inputs)]

    def _create(self, options: ort.SessionOptions, device: str) -> ort.InferenceSession:
        if device == "cpu" or "CUDAExecutionProvider" not in ort.get_available_providers():
            if device == "cuda":
                raise DeviceUnavailableError("device 'cuda' asked for, but this onnxruntime build has no CUDA "
                                             "provider (install onnxruntime-gpu)")
            return _session(self.path, options, _CPU_PROVIDERS)
        # Try CUDA with onnxruntime's logging silenced: a machine without a GPU or CUDA libraries
        # otherwise prints a screen of errors before onnxruntime carries on with the CPU.
        with _probe_lock:
            options.log_severity_level = 4
            ort.set_default_logger_severity(4)
            try:
                session = _session(self.path, options, _cuda_providers(self.tf32))
                if session.get_providers()[0] != "CUDAExecutionProvider" and _preload_cuda_libraries():
                    session = _session(self.path, options, _cuda_providers(self.tf32))
            finally:
                ort.set_default_logger_severity(2)
                options.log_severity_level = 2
        if session.get_providers()[0] == "CUDAExecutionProvider":
            return session
        if device == "cuda":
            raise DeviceUnavailableError(f"device 'cuda' asked for, but onnxruntime could not start its CUDA "
                                         f"provider for '{self.path}' (no GPU, driver or CUDA/cuDNN libraries); "
                                         "use --device cpu or auto")
        return session  # onnxruntime already placed it on the CPU provider alone

    def input_dtype(self, index: int = 0) -> np.dtype:
        """numpy dtype of an input."""
        return np.dtype(_ORT_TYPES.get(self.inputs[index].type, np.float32))

    def run(self, feeds: np.ndarray | Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run the model.

        Args:
            feeds: One array for a single-input model, or ``{input name: array}`` (``OrtValue`` s from
                :meth:`to_device` go through :meth:`run_bound`).
            outputs: Output names to fetch (all when None).

        Raises:
            InputError: wrong input names, rank, fixed dimension or dtype, unknown output names, or inputs the
                graph cannot run on (e.g. an image too small for its kernels).
        """
        feeds, resident = self._checked(feeds)
        if resident:  # inputs already on the device go through IO binding
            return self._bound(feeds, self._wanted(outputs), on_device=False)
        wanted = self._wanted(outputs) if outputs else None
        try:
            return self.session.run(wanted, feeds, self._run_options)
        except _RUN_ERRORS as exc:
            raise self._cannot_run(feeds, exc) from None

    def _cannot_run(self, feeds: Mapping[str, np.ndarray | ort.OrtValue], exc: Exception) -> InputError:
        shapes = {name: list(v.shape() if isinstance(v, ort.OrtValue) else v.shape) for name, v in feeds.items()}
        return InputError(f"'{self.path}' cannot run on inputs of shape {shapes}: {_first_line(exc)}")

    def _wanted(self, outputs: Sequence[str] | None) -> list[str]:
        """The output names to fetch (all when None), each checked."""
        wanted = list(outputs) if outputs else self.output_names
        unknown = [o for o in wanted if o not in self.output_names]
        if unknown:
            raise InputError(f"'{self.path}' has outputs {self.output_names}, not {unknown}")
        return wanted

    def _checked(self, feeds) -> tuple[Mapping[str, np.ndarray | ort.OrtValue], bool]:
        """``feeds`` as ``{input name: array}``, checked against the inputs' names, dtypes, ranks and fixed sizes,
        and whether any input is an ``OrtValue`` (already on the device)."""
        if isinstance(feeds, (np.ndarray, ort.OrtValue)):
            if len(self._contract) != 1:
                raise InputError(f"'{self.path}' takes inputs {self.input_names}; pass a dict")
            feeds = {self._contract[0][0]: feeds}
        elif not isinstance(feeds, Mapping):
            raise InputError(f"'{self.path}' takes a numpy array or a dict of them by input name, "
                             f"got {type(feeds).__name__}")
        elif len(feeds) != len(self._contract):
            raise InputError(f"'{self.path}' expects inputs {self.input_names}, got {sorted(map(str, feeds))}")
        resident = False
        for name, dtype, rank, fixed in self._contract:
            arr = feeds.get(name)
            if arr is None:
                raise InputError(f"'{self.path}' expects inputs {self.input_names}, got {sorted(map(str, feeds))}")
            if isinstance(arr, ort.OrtValue):
                got_dtype = np.dtype(_ORT_TYPES[arr.data_type()]) if arr.data_type() in _ORT_TYPES else arr.data_type()
                shape = tuple(arr.shape())
                resident = True
            elif isinstance(arr, np.ndarray):
                got_dtype, shape = arr.dtype, arr.shape
            else:
                raise InputError(f"input '{name}' of '{self.path}' must be a {dtype} array, got {type(arr).__name__}")
            if got_dtype != dtype:
                raise InputError(f"input '{name}' of '{self.path}' must be a {dtype} array, got {got_dtype}")
            if len(shape) != rank or any(shape[a] != d for a, d in fixed):
                want = [d if isinstance(d, int) else str(d) for d in self.session.get_inputs()[
                    self.input_names.index(name)].shape]
                raise InputError(f"input '{name}' of '{self.path}' must have shape {want}, got {list(shape)}")
        return feeds, resident

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        """A copy of ``array`` in the memory of the engine's device (the GPU's under CUDA), for
        :meth:`run_bound` to read call after call without copying it again."""
        if not isinstance(array, np.ndarray):
            raise InputError(f"to_device takes a numpy array, got {type(array).__name__}")
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def run_bound(self, feeds: np.ndarray | ort.OrtValue | Mapping[str, np.ndarray | ort.OrtValue],
                  outputs: Sequence[str] | None = None, on_device: bool = False) -> list[np.ndarray] | list[ort.OrtValue]:
        """Run the model through onnxruntime's IO binding.

        Args:
            feeds: Like :meth:`run`'s, where each input may also be an ``OrtValue`` already on the device
                (:meth:`to_device`); numpy inputs are copied to the device for this call.
            outputs: Output names to fetch (all when None).
            on_device: Leave the outputs in the device's memory and return them as ``OrtValue`` s (``.numpy()``
                copies one back); the device has finished computing them when this returns. Otherwise
                numpy arrays, as :meth:`run` returns.

        Raises:
            InputError: as :meth:`run`.
        """
        feeds, _ = self._checked(feeds)
        return self._bound(feeds, self._wanted(outputs), on_device)

    def _bound(self, feeds: Mapping[str, np.ndarray | ort.OrtValue], wanted: list[str],
               on_device: bool) -> list[np.ndarray] | list[ort.OrtValue]:
        """:meth:`run_bound` on checked feeds and output names."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in wanted:
            binding.bind_output(name, self.device if on_device else "cpu")
        try:
            self.session.run_with_iobinding(binding, self._run_options)
        except _RUN_ERRORS as exc:
            raise self._cannot_run(feeds, exc) from None
        if on_device:
            binding.synchronize_outputs()
            return binding.get_outputs()
        return binding.copy_outputs_to_cpu()

    def __repr__(self) -> str:
        return f"Engine('{self.path}', providers={self.providers})"


def read_metadata(path: str | Path) -> ModelInfo:
    """Metadata of a dlpipe ONNX file.

    Raises:
        ModelFileError: missing or corrupt file, or an ONNX file without dlpipe metadata.
    """
    engine = Engine(path, device="cpu", graph_optimization="disable")
    if engine.info is None:
        raise ModelFileError(f"'{path}' has no dlpipe metadata (it was not written by 'dlpipe export'); "
                             "it can still be run as a raw dlpipe.runtime.Engine")
    return engine.info
