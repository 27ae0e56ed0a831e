"""``dlpipe export-repo``: a model repository that NVIDIA Triton's onnxruntime backend (and KServe) loads as
it is, and that ``dlpipe serve`` reads too: ``<out>/<name>/1/model.onnx`` (the dlpipe metadata stays inside
the ONNX file), ``<out>/<name>/config.pbtxt`` (Triton's model configuration), ``<out>/<name>/config.json``
(dlpipe's serving settings), for a classifier ``<out>/<name>/labels.txt``, and for a dlpipe model its card,
``<out>/<name>/README.md`` (apps/card.py).

Triton's rules followed here: with ``max_batch_size > 0`` the dims leave out the batch axis, which the
model must have as its dynamic first axis; a model without one (the detector) gets ``max_batch_size: 0``
and no ``dynamic_batching``. See triton-inference-server/server docs/user_guide/model_configuration.md.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from dlpipe.apps.serve.repository import CONFIG_FILE, MODEL_FILE, ModelSettings
from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import ModelFileError, UsageError

# onnxruntime type -> Triton data type
TRITON_TYPES = {"tensor(bool)": "TYPE_BOOL", "tensor(uint8)": "TYPE_UINT8", "tensor(uint16)": "TYPE_UINT16",
                "tensor(uint32)": "TYPE_UINT32", "tensor(uint64)": "TYPE_UINT64", "tensor(int8)": "TYPE_INT8",
                "tensor(int16)": "TYPE_INT16", "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64",
                "tensor(float16)": "TYPE_FP16", "tensor(float)": "TYPE_FP32", "tensor(double)": "TYPE_FP64",
                "tensor(string)": "TYPE_STRING"}
# task -> the index of the output whose last axis the labels name (Triton's classification extension)
LABELLED_OUTPUT = {"classification": 0}
LABELS_FILE = "labels.txt"
CARD_FILE = "README.md"
KINDS = {"cpu": "KIND_CPU", "cuda": "KIND_GPU"}
ENUM_FIELDS = ("data_type", "kind")  # written bare in text format (TYPE_FP32, KIND_CPU), not quoted


def _dims(shape: list, batched: bool) -> list[int]:
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
    return dims[1:] if batched else dims


def _tensor(kind: str, spec, batched: bool, labels: bool) -> dict:
    if spec.type not in TRITON_TYPES:
        raise ModelFileError(f"{kind} '{spec.name}' has type {spec.type}, which Triton cannot take")
    return {"name": spec.name, "data_type": TRITON_TYPES[spec.type], "dims": _dims(spec.shape, batched),
            **({"label_filename": LABELS_FILE} if labels else {})}


def batch_axis(engine: Engine) -> bool:
    """Whether every input and output has a dynamic first axis, which Triton can batch on."""
    return all(s.shape and not isinstance(s.shape[0], int) for s in [*engine.inputs, *engine.outputs])


def model_config(name: str, engine: Engine, settings: ModelSettings, device: str) -> dict:
    """Triton's model configuration for the ONNX model of ``engine``, in the JSON form of its ``ModelConfig``
    message (what Triton answers at ``GET /v2/models/{name}/config`` and ``config.pbtxt`` holds as text)."""
    batched = settings.max_batch_size > 0 and batch_axis(engine)
    labelled = LABELLED_OUTPUT.get(engine.info.task) if engine.info and engine.info.labels else None
    config = {"name": name, "platform": "onnxruntime_onnx", "max_batch_size": settings.max_batch_size if batched else 0,
              "input": [_tensor("input", s, batched, False) for s in engine.inputs],
              "output": [_tensor("output", s, batched, i == labelled) for i, s in enumerate(engine.outputs)],
              "instance_group": [{"count": settings.instances, "kind": KINDS[device]}]}
    if batched:
        config["dynamic_batching"] = {
            **({"preferred_batch_size": list(settings.preferred_batch_size)} if settings.preferred_batch_size else {}),
            "max_queue_delay_microseconds": round(settings.max_queue_delay_ms * 1000)}
    return config


def _pbtxt(value, indent: str = "") -> str:
    """A JSON-like value in protobuf text format (messages in braces, repeated messages in brackets)."""
    lines = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{indent}{key} {{\n{_pbtxt(item, indent + '  ')}\n{indent}}}")
        elif isinstance(item, list) and item and isinstance(item[0], dict):
            body = ",\n".join(f"{indent}  {{\n{_pbtxt(m, indent + '    ')}\n{indent}  }}" for m in item)
            lines.append(f"{indent}{key} [\n{body}\n{indent}]")
        elif isinstance(item, str) and key not in ENUM_FIELDS:
            lines.append(f"{indent}{key}: {json.dumps(item)}")
        else:
            lines.append(f"{indent}{key}: {item}")
    return "\n".join(lines)


def config_pbtxt(name: str, engine: Engine, settings: ModelSettings, device: str) -> str:
    """Triton's ``config.pbtxt`` for the ONNX model of ``engine``."""
    return _pbtxt(model_config(name, engine, settings, device)) + "\n"


def _write_model(model: Path, name: str, folder: Path, engine: Engine, settings: ModelSettings, device: str) -> dict:
    """One model's folder: ``1/model.onnx``, ``config.pbtxt``, labels, dlpipe's settings and the model card."""
    from dlpipe.apps.card import model_card  # here: the server imports this module for model_config alone

    batched = settings.max_batch_size > 0 and batch_axis(engine)
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, folder / "1" / MODEL_FILE)
    (folder / "config.pbtxt").write_text(config_pbtxt(name, engine, settings, device))
    if engine.info and engine.info.labels and LABELLED_OUTPUT.get(engine.info.task) is not None:
        (folder / LABELS_FILE).write_text("\n".join(engine.info.labels) + "\n")
    dlpipe_settings = {"max_batch_size": settings.max_batch_size if batched else 0,
                       "max_queue_delay_ms": settings.max_queue_delay_ms, "instances": settings.instances,
                       "preferred_batch_size": list(settings.preferred_batch_size), "device": device}
    (folder / CONFIG_FILE).write_text(json.dumps(dlpipe_settings, indent=2) + "\n")
    if engine.info is not None:  # the model card (issue 18), from the metadata of the file served
        (folder / CARD_FILE).write_text(model_card(folder / "1" / MODEL_FILE))
    return {"model": name, "max_batch_size": dlpipe_settings["max_batch_size"],
            "task": engine.info.task if engine.info else None}


def export_repository(models: list[str | Path], out: str | Path, settings: ModelSettings, device: str = "cpu",
                      overwrite: bool = False) -> list[dict]:
    """Write the repository for ``models`` (dlpipe ONNX files) under ``out``; one row per model.

    Raises:
        UsageError: an unknown device, a model named twice, or a model folder that exists (without ``overwrite``).
        ModelFileError: a file that is not a loadable ONNX model.

    Every file is checked before anything is written, and each model folder is written whole beside the
    repository, then moved into place: a failure leaves the repository as it was, and ``overwrite`` replaces
    a folder with nothing of the old one left in it.
    """
    if device not in KINDS:
        raise UsageError(f"device must be one of {', '.join(KINDS)}, got {device!r}")
    names = [Path(m).stem for m in models]
    if len(set(names)) != len(names):
        raise UsageError(f"two models would share a name in the repository: {names}")
    engines = []
    for model, name in zip(map(Path, models), names):  # every file checked before anything is written
        if model.is_dir():
            raise ModelFileError(f"'{model}' is a folder; Triton's onnxruntime backend serves single ONNX files")
        folder = Path(out) / name
        if folder.exists() and not overwrite:
            raise UsageError(f"'{folder}' already exists; pass --overwrite to replace it")
        engines.append((model, name, folder, Engine(model, device="cpu", graph_optimization="disable")))
    Path(out).mkdir(parents=True, exist_ok=True)
    rows, staged = [], []
    try:
        for model, name, folder, engine in engines:  # each model written whole into a hidden folder beside
            stage = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
            staged.append((stage, folder))
            written = _write_model(model, name, stage, engine, settings, device)
            rows.append({"model": name, "folder": str(folder), **written})
        for stage, folder in staged:  # then swapped in: a replaced folder keeps none of its old files
            if folder.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=out))
                folder.rename(old / folder.name)
                stage.rename(folder)
                shutil.rmtree(old)
            else:
                stage.rename(folder)
    finally:
        for stage, _ in staged:
            shutil.rmtree(stage, ignore_errors=True)
    return rows
