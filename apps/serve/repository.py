"""A model repository in Triton's layout: ``REPOSITORY/<name>/<version>/model.onnx`` (or a model package: the
version folder holds a captioner's or an autoencoder's graphs and ``manifest.json``) with an optional
``REPOSITORY/<name>/config.json`` of batching and device settings; plain ``.onnx`` paths and package folders
serve too (name = the file's stem or the folder's name, version 1). A package answers on its task endpoint
(``/v1/models/<name>/predict``) only: its graphs run in a loop (a decoder step per word) no single tensor
request describes.

``config.json`` keys (each optional; the server's command-line settings fill the rest): ``max_batch_size``
(0 turns dynamic batching off), ``preferred_batch_size`` (a list), ``max_queue_delay_ms``, ``max_queue``,
``instances``, ``threads``, ``device``, ``timeout_s``, ``idle_run``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from dlpipe.runtime.captioner import MANIFEST
from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import ModelFileError, UsageError
from dlpipe.runtime.predictors import PREDICTORS, Predictor, load

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class ModelSettings:
    """How one model is served.

    Attributes:
        max_batch_size: The most rows one execution takes; 0: no dynamic batching (one request at a time).
        preferred_batch_size: Batch sizes run at once when the queue can form one (the largest first).
        max_queue_delay_ms: How long a request may wait for others to join its batch.
        max_queue: Requests waiting at most; more are refused at once with 503 and Retry-After.
        instances: Sessions of the model, each running one batch at a time.
        threads: onnxruntime intra-op threads per session (its default when None).
        device: auto, cpu or cuda.
        timeout_s: How long a request may take in all before it is answered 504.
        idle_run: Run at once whatever is queued when no session is busy, instead of waiting out the delay
            (Triton always waits); batches still form while sessions are busy.
    """

    max_batch_size: int = 64
    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256
    instances: int = 1
    threads: int | None = None
    device: str = "auto"
    timeout_s: float = 30.0
    idle_run: bool = True

    def __post_init__(self):
        if self.max_batch_size < 0 or self.max_queue < 1 or self.instances < 1 or self.timeout_s <= 0:
            raise UsageError(f"invalid serving settings {self}: max_batch_size >= 0, max_queue >= 1, "
                             "instances >= 1 and timeout_s > 0 are required")
        if self.max_queue_delay_ms < 0 or any(b < 1 for b in self.preferred_batch_size):
            raise UsageError(f"invalid serving settings {self}: delays and batch sizes must be positive")

    def updated(self, doc: dict, source: object) -> "ModelSettings":
        """These settings with a ``config.json`` document's values."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ModelFileError(f"{source}: unknown settings {unknown}; known: {sorted(known)}")
        values = dict(doc)
        if "preferred_batch_size" in values:
            values["preferred_batch_size"] = tuple(int(b) for b in values["preferred_batch_size"])
        return replace(self, **values)


@dataclass
class ServedModel:
    """One version of one model: its sessions, its settings and, for a dlpipe model, its task predictor. A model
    package has no sessions of its own here (``engines`` is empty): its predictor holds its graphs."""

    name: str
    version: str
    path: Path
    settings: ModelSettings
    engines: list[Engine]
    predictor: Predictor | None

    @property
    def engine(self) -> Engine:
        return self.engines[0]

    @property
    def package(self) -> bool:
        """Whether it is a package of several graphs, served on its task endpoint only."""
        return not self.engines

    @property
    def task(self) -> str | None:
        """The dlpipe task, None for a raw ONNX file."""
        return self.predictor.info.task if self.predictor is not None else None

    @property
    def batchable(self) -> bool:
        """Whether requests can be stacked: every input and output has a dynamic first (batch) axis."""
        if self.package:
            return False
        specs = [*self.engine.inputs, *self.engine.outputs]
        return self.settings.max_batch_size > 0 and all(s.shape and not isinstance(s.shape[0], int) for s in specs)


def load_model(name: str, version: str, path: Path, settings: ModelSettings) -> ServedModel:
    """Open ``path`` with ``settings.instances`` sessions (a package: its predictor, which opens its graphs)."""
    if path.is_dir():
        return ServedModel(name=name, version=version, path=path, settings=settings, engines=[],
                           predictor=load(path, device=settings.device, threads=settings.threads))
    engines = [Engine(path, device=settings.device, threads=settings.threads, spinning=False)
               for _ in range(settings.instances)]
    info = engines[0].info
    cls = PREDICTORS.get(info.task) if info is not None else None
    return ServedModel(name=name, version=version, path=path, settings=settings, engines=engines,
                       predictor=cls(engines[0]) if cls else None)


def _settings(folder: Path, defaults: ModelSettings) -> ModelSettings:
    config = folder / CONFIG_FILE
    if not config.is_file():
        return defaults
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"'{config}' is not readable JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ModelFileError(f"'{config}' must hold a JSON object")
    try:
        return defaults.updated(doc, f"'{config}'")
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"'{config}': {exc}") from None


def _model_in(version: Path) -> Path | None:
    """The model of a version folder: its ``model.onnx``, or the folder itself when it holds a package."""
    if (version / MODEL_FILE).is_file():
        return version / MODEL_FILE
    return version if (version / MANIFEST).is_file() else None


def _versions(folder: Path) -> list[tuple[str, Path]]:
    """``(version, model file or package folder)`` of every numbered version folder holding a model, oldest
    first."""
    found = [(int(v.name), _model_in(v)) for v in folder.iterdir() if v.is_dir() and v.name.isdigit()]
    return [(str(n), p) for n, p in sorted(found) if p is not None]


def discover(sources: list[str | Path]) -> list[tuple[str, str, Path, Path | None]]:
    """``(name, version, model file, model folder or None)`` for every model under ``sources``: ONNX files, or
    repository folders of ``<name>/<version>/model.onnx``.

    Raises:
        ModelFileError: a source that is neither, a repository without models, or one name served twice.
    """
    found: list[tuple[str, str, Path, Path | None]] = []
    for source in map(Path, sources):
        if source.is_file():
            found.append((source.stem, "1", source, None))
        elif (source / MANIFEST).is_file():  # one model package
            found.append((source.name, "1", source, None))
        elif source.is_dir():
            models = [(f, _versions(f)) for f in sorted(source.iterdir())
                      if f.is_dir() and not f.name.startswith(".")]  # hidden: export-repo's staging folders
            models = [(f, versions) for f, versions in models if versions]
            if not models:
                raise ModelFileError(f"'{source}' holds no models (expected <name>/<version>/{MODEL_FILE} or a "
                                     f"package's {MANIFEST})")
            found += [(f.name, v, p, f) for f, versions in models for v, p in versions]
        else:
            raise ModelFileError(f"'{source}' is neither an ONNX file, a model package nor a model repository folder")
    seen = set()
    for name, version, path, _ in found:
        if (name, version) in seen:
            raise ModelFileError(f"model '{name}' version {version} is given twice (second: '{path}')")
        seen.add((name, version))
    return found


class Repository:
    """Every served model by name and version; the newest version answers when none is named."""

    def __init__(self, models: list[ServedModel]):
        self.models: dict[str, dict[str, ServedModel]] = {}
        for m in models:
            self.models.setdefault(m.name, {})[m.version] = m

    @classmethod
    def open(cls, sources: list[str | Path], defaults: ModelSettings | None = None) -> "Repository":
        """Load every model under ``sources`` (see :func:`discover`) with its folder's ``config.json``."""
        defaults = defaults or ModelSettings()
        return cls([load_model(name, version, path, _settings(folder, defaults) if folder else defaults)
                    for name, version, path, folder in discover(sources)])

    def versions(self, name: str) -> list[str]:
        return sorted(self.models.get(name, {}), key=int)

    def get(self, name: str, version: str | None = None) -> ServedModel | None:
        """The model, its newest version when ``version`` is None; None when there is no such model or version."""
        versions = self.models.get(name)
        if not versions:
            return None
        return versions.get(version if version is not None else self.versions(name)[-1])

    def __iter__(self):
        return (m for versions in self.models.values() for m in versions.values())
