"""Export to a self-describing ONNX file: torch.onnx, ``onnx.checker``, metadata, then parity on
real inputs of two other batch sizes, written atomically (nothing is left half-written)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch
from torch import nn

from dlpipe.export.metadata import build_metadata, write_metadata
from dlpipe.export.validate import ParityResult, validate_parity
from dlpipe.runtime.errors import DlpipeError, InputError, ModelFileError
from dlpipe.runtime.captioner import MANIFEST, PACKAGE_FORMAT
from dlpipe.runtime.files import atomic_folder, atomic_output, write_json
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint
from dlpipe.training.pretrained import load_torchvision
from dlpipe.training.registry import OnnxContract, get_spec
from dlpipe.training.tasks import Graph, get_task

EXPORTERS = ("dynamo", "torchscript")


class ExportError(DlpipeError):
    """torch.onnx could not export the model, or the result failed ``onnx.checker``."""


@dataclass
class ExportReport:
    """What an export produced and how it was checked."""

    path: str
    model: str
    opset: int
    exporter: str
    dynamic_axes: dict[str, dict[int, str]]
    parity: list[ParityResult] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "model": self.model, "opset": self.opset, "exporter": self.exporter,
                "dynamic_axes": self.dynamic_axes, "parity": [p.as_dict() for p in self.parity],
                "seconds": round(self.seconds, 3)}


def _axes(contract: OnnxContract, dynamic_batch: bool) -> dict[str, dict[int, str]]:
    axes = {**contract.inputs, **contract.outputs}
    if not dynamic_batch:
        axes = {k: {a: n for a, n in v.items() if a != 0} for k, v in axes.items()}
    return {k: v for k, v in axes.items() if v}


def _torch_export(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, contract: OnnxContract,
                  opset: int, axes: dict[str, dict[int, str]], exporter: str) -> None:
    kwargs: dict[str, Any] = dict(input_names=list(contract.inputs), output_names=list(contract.outputs),
                                  opset_version=opset, dynamic_axes=axes or None)
    if exporter == "dynamo":
        kwargs.update(dynamo=True, external_data=False, verbose=False)
    else:
        kwargs.update(dynamo=False)
    # torch.onnx prints progress and deprecation chatter; keep the user's terminal for our own lines.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), **kwargs)


def export_module(module: nn.Module, example: tuple[torch.Tensor, ...], out: str | Path, *, contract: OnnxContract,
                  metadata: dict[str, Any], check_inputs: Sequence[tuple[torch.Tensor, ...]], opset: int | None = None,
                  dynamic_batch: bool = True, exporter: str = "dynamo", name: str = "") -> ExportReport:
    """Export ``module`` traced on ``example`` to ``out`` and validate it on ``check_inputs``.

    Raises:
        ExportError: torch.onnx failed or the graph is invalid.
        ParityError: the exported graph disagrees with PyTorch on a check input.
    """
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    start = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    opset = opset or contract.opset
    axes = _axes(contract, dynamic_batch)
    module = module.eval()
    with atomic_output(out) as tmp:
        try:
            _torch_export(module, example, tmp, contract, opset, axes, exporter)
            model = onnx.load(str(tmp))
            onnx.checker.check_model(model, full_check=True)
        except DlpipeError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            hint = " (try --exporter torchscript)" if exporter == "dynamo" else ""
            raise ExportError(f"exporting {name or type(module).__name__} to '{out}' failed: {first}{hint}") from None
        metadata = {**metadata, "opset": opset, "exporter": exporter}
        write_metadata(model, metadata)
        onnx.save(model, str(tmp))
        parity = validate_parity(tmp, module, check_inputs, list(contract.outputs), contract.atol, contract.rtol)
    return ExportReport(str(out), name, opset, exporter, axes, parity, time.perf_counter() - start)


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, opset: int | None = None, dynamic_batch: bool = True,
                      exporter: str | None = None) -> ExportReport:
    """Export a dlpipe training checkpoint (any registered model) to a self-describing ONNX file, or to a
    package folder of several graphs with a manifest when its task exports several (the task's ``graphs``)."""
    ckpt = load_checkpoint(checkpoint)
    _check_checkpoint_labels(ckpt, checkpoint)
    spec = get_spec(ckpt["model"])
    task = get_task(spec.task)
    graphs = task.graphs(ckpt, model_from_checkpoint(ckpt), dynamic_batch)
    extra = dict(task.metadata(ckpt))
    manifest = extra.pop("manifest", {})
    if len(graphs) > 1:
        return export_package(ckpt, graphs, out, extra, manifest, opset=opset, exporter=exporter)
    graph = graphs[0]
    meta = graph_metadata(ckpt, graph.contract, dynamic_batch, extra)
    return export_module(graph.module, graph.example, out, contract=graph.contract, metadata=meta,
                         check_inputs=graph.checks, opset=opset, dynamic_batch=dynamic_batch,
                         exporter=exporter or graph.contract.exporter, name=spec.name)


def export_torchvision(name: str, out: str | Path, *, weights: str | Path | None = None, opset: int | None = None,
                       dynamic_batch: bool = True, exporter: str = "dynamo") -> ExportReport:
    """Export a torchvision classifier named ``torchvision:ARCH[:WEIGHTS|:FILE.pth]`` (or with ``weights``, a
    state dict file), its category names and preprocessing (shorter side resized, centre crop, mean/std)
    taken from the weights' own metadata and ``transforms()``.

    Raises:
        InputError: an unknown architecture or weights name, or categories that do not match the output.
        DataNotFoundError: named weights not in the local torch cache (never downloaded).
        ModelFileError: a weights file that is missing or does not fit.
    """
    found = load_torchvision(name, weights)
    preprocessing = found.preprocessing()
    size = preprocessing["size"]
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(2 if dynamic_batch else 1, 3, *size, generator=g),)
    classes = _output_classes(found.module, example, name)
    if classes != len(found.categories):
        raise InputError(f"{name} names {len(found.categories)} categories, but its output has {classes} classes")
    contract = OnnxContract(inputs={"image": {0: "batch"}}, outputs={"logits": {0: "batch"}}, atol=1e-4, rtol=1e-3)
    meta = build_metadata(task="classification", model=f"torchvision:{found.arch}", labels=found.categories,
                          preprocessing=preprocessing, inputs=["image"], outputs=["logits"],
                          dynamic_axes=_axes(contract, dynamic_batch))
    meta["weights"] = {"name": str(found.weights), "file": str(found.file)}
    checks = [(torch.randn(1, 3, *size, generator=g),), (torch.randn(5 if dynamic_batch else 1, 3, *size, generator=g),)]
    return export_module(found.module, example, out, contract=contract, metadata=meta, check_inputs=checks, opset=opset,
                         dynamic_batch=dynamic_batch, exporter=exporter, name=f"torchvision {found.arch}")


# The builder arguments that size a model's output: its classes, or a Q-network's actions.
_OUTPUT_SIZE_ARGS = ("num_classes", "num_actions")


def _check_checkpoint_labels(ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose labels do not name its model's outputs one to one (issue 12).

    Raises:
        ModelFileError: naming both numbers.
    """
    labels, args = ckpt["dataset"]["labels"], ckpt["model_args"]
    for key in _OUTPUT_SIZE_ARGS:
        if labels and key in args and int(args[key]) != len(labels):
            raise ModelFileError(f"checkpoint '{path}' carries {len(labels)} labels but its {ckpt['model']} model "
                                 f"has {args[key]} outputs ({key}); they must match one to one")


def graph_metadata(ckpt: dict[str, Any], contract: OnnxContract, dynamic_batch: bool,
                   extra: dict[str, Any]) -> dict[str, Any]:
    """The metadata document of one exported graph of a checkpoint (with the task's ``extra`` content)."""
    ds = ckpt["dataset"]
    preprocessing = {**ds["preprocessing"], "size_multiple": contract.size_multiple}
    meta = build_metadata(task=ckpt["task"], model=ckpt["model"], labels=list(ds["labels"]),
                          preprocessing=preprocessing, inputs=list(contract.inputs), outputs=list(contract.outputs),
                          dynamic_axes=_axes(contract, dynamic_batch), dataset=ds["name"],
                          metrics=dict(ckpt.get("metrics", {})))
    # The recipe (the run's resolved configuration) travels with the model, for its model card (issue 18).
    training = {k: v for k, v in (ckpt.get("config") or {}).items() if _json_value(v)}
    return {**meta, "model_args": ckpt["model_args"], "training": training, **extra}


def _json_value(value: Any) -> bool:
    """Whether ``value`` is plain JSON (a config value such as a path object is left out of the metadata)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _package_folder(out: str | Path) -> Path:
    """``--out`` names the package folder; ``model.onnx`` or ``model/manifest.json`` mean ``model/``."""
    out = Path(out)
    if out.name == MANIFEST:
        return out.parent
    return out.with_suffix("") if out.suffix.lower() in (".onnx", ".json") else out


def export_package(ckpt: dict[str, Any], graphs: list[Graph], out: str | Path, extra: dict[str, Any],
                   manifest_extra: dict[str, Any], *, opset: int | None = None,
                   exporter: str | None = None) -> ExportReport:
    """Export the parts of a model to a package folder (``<part>.onnx`` each, and ``manifest.json`` naming
    them with the shared metadata); an older package is replaced only once the new one is complete.

    Returns:
        An :class:`ExportReport` whose ``path`` is the manifest and whose parity covers every graph.
    """
    start = time.perf_counter()
    folder = _package_folder(out)
    if folder.exists() and not (folder / MANIFEST).is_file():
        raise InputError(f"'{folder}' exists and is not a model package; choose another --out")
    reports = []
    with atomic_folder(folder) as tmp:
        for graph in graphs:
            meta = {**graph_metadata(ckpt, graph.contract, True, extra), "part": graph.part}
            reports.append(export_module(graph.module, graph.example, tmp / f"{graph.part}.onnx",
                                         contract=graph.contract, metadata=meta, check_inputs=graph.checks,
                                         opset=opset, exporter=exporter or graph.contract.exporter,
                                         name=f"{ckpt['model']} {graph.part}"))
        ds = ckpt["dataset"]
        write_json(tmp / MANIFEST, {"format": PACKAGE_FORMAT, "format_version": 1, "task": ckpt["task"],
                                    "model": ckpt["model"], "precision": "fp32", "variants": {"fp32": MANIFEST},
                                    "graphs": {g.part: f"{g.part}.onnx" for g in graphs},
                                    "preprocessing": ds["preprocessing"], "dataset": ds["name"],
                                    "metrics": dict(ckpt.get("metrics", {})), "opset": reports[0].opset,
                                    "model_args": ckpt["model_args"], "training": meta["training"],
                                    "versions": meta["versions"], **extra, **manifest_extra})
    axes = {k: v for r in reports for k, v in r.dynamic_axes.items()}
    return ExportReport(str(folder / MANIFEST), ckpt["model"], reports[0].opset, reports[0].exporter, axes,
                        [p for r in reports for p in r.parity], time.perf_counter() - start)


def import_builder(target: str):
    """Import ``package.module:function``; only ever called for a builder the user named."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise InputError(f"builder {target!r} must look like 'package.module:function'")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import module '{module_name}' for builder {target!r}: {exc}") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise InputError(f"'{module_name}' has no callable '{attr}' (builder {target!r})")
    return fn


def read_labels(spec: str) -> list[str]:
    """Class names as ``--labels`` gives them: comma-separated, or ``@FILE`` with one name per line (names
    may hold spaces, as ImageNet's "grand piano" does; each is stripped and blank lines are skipped).

    Raises:
        InputError: the file is missing or unreadable, or no name is given.
    """
    if not spec.startswith("@"):
        names = [name.strip() for name in spec.split(",") if name.strip()]
        if not names:
            raise InputError(f"--labels {spec!r} names no class")
        return names
    path = Path(spec[1:])
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"labels file '{path}' does not exist") from None
    except UnicodeDecodeError:
        raise InputError(f"labels file '{path}' is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"labels file '{path}' cannot be read: {exc.strerror or exc}") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise InputError(f"labels file '{path}' holds no labels (one per line)")
    return names


def _output_classes(module: nn.Module, example: tuple[torch.Tensor, ...], builder: str) -> int:
    """The class dimension (axis 1) of the module's logits on ``example``."""
    try:
        with torch.no_grad():
            out = module(*example)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"builder {builder!r}'s module fails on an input of shape {list(example[0].shape)}: "
                         f"{first}") from None
    out = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(out, torch.Tensor) or out.ndim < 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"builder {builder!r}'s module must return logits (batch x classes...), got {shape}")
    return int(out.shape[1])


def export_user_module(builder: str, out: str | Path, *, input_shape: Sequence[int], labels: Sequence[str],
                       weights: str | Path | None = None, color: str | None = None,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       task: str = "classification", opset: int | None = None, dynamic_batch: bool = True,
                       exporter: str = "dynamo", atol: float = 1e-4, rtol: float = 1e-3) -> ExportReport:
    """Export a user's own ``nn.Module`` with the same checks and metadata as a registry model.

    Args:
        builder: ``package.module:function`` returning the module (called without arguments).
        input_shape: ``(channels, height, width)`` of one input image.
        labels: Class names in output order, as many as the module's output has classes (axis 1).
        weights: A state dict saved with ``torch.save(model.state_dict(), ...)``.

    Raises:
        InputError: a bad shape or builder, or labels that do not match the output's classes.
        ModelFileError: unreadable weights.
    """
    if len(input_shape) != 3:
        raise InputError(f"input shape must be C,H,W, got {list(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    module = import_builder(builder)()
    if not isinstance(module, nn.Module):
        raise InputError(f"builder {builder!r} returned a {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        if not Path(weights).is_file():
            raise ModelFileError(f"weights file '{weights}' does not exist")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            module.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelFileError(f"cannot load weights '{weights}' into {builder}: {first}") from None
    color = color or ("L" if c == 1 else "RGB")
    preprocessing = {"color": color, "size": [h, w], "resize": "bilinear", "scale": 1 / 255,
                     "mean": list(mean or [0.0] * c), "std": list(std or [1.0] * c), "layout": "NCHW"}
    contract = OnnxContract(inputs={"image": {0: "batch"}}, outputs={"logits": {0: "batch"}}, atol=atol, rtol=rtol)
    g = torch.Generator().manual_seed(0)
    meta = build_metadata(task=task, model=builder, labels=list(labels), preprocessing=preprocessing,
                          inputs=["image"], outputs=["logits"], dynamic_axes=_axes(contract, dynamic_batch))
    example = (torch.randn(1 if not dynamic_batch else 2, c, h, w, generator=g),)
    classes = _output_classes(module.eval(), example, builder)
    if classes != len(labels):  # checked before anything is written (issue 12)
        raise InputError(f"{len(labels)} labels given, but {builder}'s output has {classes} classes; "
                         "give one label per class, in output order")
    checks = [(torch.randn(1, c, h, w, generator=g),), (torch.randn(1 if not dynamic_batch else 5, c, h, w, generator=g),)]
    return export_module(module, example, out, contract=contract, metadata=meta, check_inputs=checks, opset=opset,
                         dynamic_batch=dynamic_batch, exporter=exporter, name=builder)
