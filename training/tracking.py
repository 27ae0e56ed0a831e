"""Experiment tracking of training runs in the trackers teams already use: TensorBoard event files under the
run folder, or an MLflow run (issue 18).

A training command opens one tracker for its run (:func:`tracked`); the shared pieces every task's loop
already goes through feed it: the run's resolved configuration (:func:`log_params`, from the checkpoint
payload), each ``metrics.jsonl`` row (:func:`log_row`) and, as the run ends, the test figures, the
pictures written beside the metrics and the checkpoints' location. Only the process that writes the run
folder (rank 0) tracks. ``export``, ``quantize``, ``evaluate`` and ``bench`` attach their files and figures
to the training's MLflow run afterwards (:func:`attach`), so one run holds the model's whole life.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from dlpipe.runtime.errors import UsageError

BACKENDS = ("none", "tensorboard", "mlflow")
MAX_PARAM = 6000  # MLflow's limit on a parameter's value, in characters


@dataclass(frozen=True)
class Tracking:
    """Where a run is tracked: ``backend`` (none, tensorboard or mlflow); for MLflow the tracking ``uri``
    (MLflow's own default when None: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working
    folder), the ``experiment`` and, to add to an existing run, its ``run_id``."""

    backend: str = "none"
    uri: str | None = None
    experiment: str = "dlpipe"
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(f"--log must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


def _require(backend: str) -> None:
    """Refuse a tracker whose library is not installed, naming the extra that installs it."""
    module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[backend]
    try:
        __import__(module)
    except ImportError:
        raise UsageError(f"--log {backend} needs the {module} package: pip install 'dlpipe[{backend}]'") from None


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric values of ``row`` (booleans and strings such as a fine-tuning stage left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _flat(config: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """A configuration as flat parameters: scalars as they are, anything else as compact JSON."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        if value is None or isinstance(value, (str, int, float, bool)):
            out[key] = "None" if value is None else value
        else:
            out[key] = json.dumps(value, default=str, separators=(",", ":"))[:MAX_PARAM]
    return out


def _final(summary: dict[str, Any] | None) -> dict[str, float]:
    """A run's final figures from its summary: the ``test_*`` ones and the best validation score."""
    return {k: v for k, v in _numbers(summary or {}).items() if k.startswith("test_") or k == "best_val_score"}


def scalar_tag(key: str) -> str:
    """A ``metrics.jsonl`` key as a TensorBoard tag, grouped by split: ``val_acc`` -> ``val/acc``,
    ``test_loss`` -> ``test/loss``, ``train_loss`` -> ``train/loss``, ``lr`` -> ``train/lr``."""
    if key == "best_val_score":
        return "val/best_score"
    for split in ("train", "val", "test"):
        if key.startswith(split + "_"):
            return f"{split}/{key[len(split) + 1:]}"
    return f"train/{key}"


class Tracker:
    """One run in a tracker: what the training run sends it."""

    backend = "none"
    run_id: str | None = None
    where = ""

    def params(self, config: dict[str, Any]) -> None:
        """The run's resolved configuration (sent once; later calls are ignored)."""

    def row(self, row: dict[str, Any]) -> None:
        """One epoch's row of ``metrics.jsonl`` (step: its ``epoch``)."""

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG picture of the run (samples, predictions, curves)."""

    def close(self, summary: dict[str, Any] | None, out: Path | None, status: str) -> None:
        """The run's end: its final figures (``test_*`` and the best validation score), its pictures, and
        whether it ``FINISHED``, ``FAILED`` or was ``KILLED``."""


class TensorBoardTracker(Tracker):
    """Event files under ``<run>/tensorboard`` (``tensorboard --logdir <run>``): scalars per epoch grouped
    by split, the configuration as text and as hyper-parameters, pictures as images."""

    backend = "tensorboard"

    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = out / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.folder))
        self.where = str(self.folder)
        self.config: dict[str, Any] | None = None
        self.step = 0

    def params(self, config: dict[str, Any]) -> None:
        if self.config is None:
            self.config = _flat(config)
            table = "\n".join(f"| {k} | {v} |" for k, v in sorted(self.config.items()))
            self.writer.add_text("config", "| option | value |\n|---|---|\n" + table, 0)

    def row(self, row: dict[str, Any]) -> None:
        self.step = int(row.get("epoch", self.step + 1))
        for key, value in _numbers(row).items():
            if key != "epoch":
                self.writer.add_scalar(scalar_tag(key), value, self.step)
        self.writer.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self, summary: dict[str, Any] | None, out: Path | None, status: str) -> None:
        final = _final(summary)
        for key, value in final.items():
            self.writer.add_scalar(scalar_tag(key), value, self.step)
        if out is not None and (out / "curves.png").is_file():
            self.image("curves", out / "curves.png", self.step)
        if self.config is not None and status == "FINISHED":
            # hyper-parameters beside the figures they gave (TensorBoard's HPARAMS tab), in this folder
            self.writer.add_hparams(self.config, {f"hparam/{k}": v for k, v in final.items()}, run_name=".")
        self.writer.close()


class MlflowTracker(Tracker):
    """An MLflow run: the configuration as parameters, each epoch's figures as metrics (step: the epoch),
    the final test figures, ``metrics.jsonl`` and the run's pictures as artifacts; tagged with the run
    folder so ``export --log mlflow --run-id`` can attach the model to it."""

    backend = "mlflow"

    def __init__(self, out: Path, tracking: Tracking):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking.uri)
        self.where = self.client.tracking_uri if hasattr(self.client, "tracking_uri") else str(tracking.uri)
        if tracking.run_id:  # a resumed run continues its MLflow run
            self.run_id = self.client.get_run(tracking.run_id).info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(tracking.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(tracking.experiment))
            run = self.client.create_run(experiment_id, run_name=out.name or None,
                                         tags={"dlpipe.run_folder": str(out.resolve())})
            self.run_id = run.info.run_id
        self.logged_params = False

    def params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if not self.logged_params:
            self.logged_params = True
            params = [Param(k, str(v)[:MAX_PARAM]) for k, v in sorted(_flat(config).items())]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def row(self, row: dict[str, Any]) -> None:
        step = int(row.get("epoch", 0))
        self._metrics({k: v for k, v in _numbers(row).items() if k != "epoch"}, step)

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def image(self, tag: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=f"images/{tag}")

    def close(self, summary: dict[str, Any] | None, out: Path | None, status: str) -> None:
        final = _final(summary)
        if final:
            self._metrics(final, 0)
        if out is not None:
            for name in ("metrics.jsonl", *sorted(p.name for p in out.glob("*.png"))):
                if (out / name).is_file():
                    self.client.log_artifact(self.run_id, str(out / name))
        if summary and summary.get("best"):
            self.client.set_tag(self.run_id, "dlpipe.checkpoint", str(Path(summary["best"]).resolve()))
        self.client.set_terminated(self.run_id, status=status)


_ACTIVE: Tracker | None = None


def _main_process() -> bool:
    """Rank 0 of a distributed run (its ``RANK``: the process group may not be up yet), or a single process."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def tracked(tracking: Tracking, out: str | Path | None) -> Iterator[Tracker | None]:
    """The active tracker of the training run writing ``out``, for a ``with`` block (None when not tracked
    or not rank 0). The block's result goes to :meth:`Tracker.close` through the yielded tracker's
    ``summary`` attribute when the caller sets it.

    Raises:
        UsageError: an unknown backend, or its library is not installed.
    """
    global _ACTIVE
    if tracking.backend == "none" or not _main_process():
        yield None
        return
    _require(tracking.backend)
    folder = Path(out or ".")
    folder.mkdir(parents=True, exist_ok=True)
    tracker = TensorBoardTracker(folder) if tracking.backend == "tensorboard" else MlflowTracker(folder, tracking)
    tracker.summary = None  # type: ignore[attr-defined]
    _ACTIVE, status = tracker, "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _ACTIVE = None
        tracker.close(getattr(tracker, "summary", None), folder, status)


def active() -> bool:
    """Whether a tracker is taking this run's figures (pictures are drawn only then)."""
    return _ACTIVE is not None


def log_params(config: dict[str, Any]) -> None:
    """Send the run's resolved configuration to the active tracker, if any (the first call counts)."""
    if _ACTIVE is not None:
        _ACTIVE.params(config)


def log_row(row: dict[str, Any]) -> None:
    """Send one ``metrics.jsonl`` row (one epoch) to the active tracker, if any."""
    if _ACTIVE is not None:
        _ACTIVE.row(row)


def log_image(tag: str, path: str | Path, step: int) -> None:
    """Send a PNG written during the run (a sample grid, predictions) to the active tracker, if any."""
    if _ACTIVE is not None and Path(path).is_file():
        _ACTIVE.image(tag, Path(path), step)


def described(tracker: Tracker | None) -> dict[str, Any] | None:
    """What a run's summary says about its tracking: the backend, the MLflow run id, where it was written."""
    if tracker is None:
        return None
    return {"backend": tracker.backend, "run_id": tracker.run_id, "where": tracker.where}


def attach(tracking: Tracking, *, models: Sequence[str | Path] = (), metrics: dict[str, float] | None = None,
           documents: dict[str, Any] | None = None, files: Sequence[str | Path] = ()) -> dict[str, Any] | None:
    """Add what ``export``, ``quantize``, ``evaluate`` or ``bench`` made to an MLflow run (``tracking.run_id``;
    a new run in ``tracking.experiment`` when None): each ONNX model in MLflow's ``onnx`` flavour with its
    input/output signature, ``metrics``, ``documents`` (reports, as JSON artifacts under their names) and
    ``files`` (pictures) as artifacts. None when not tracked.

    Raises:
        UsageError: ``--log tensorboard`` (these commands log to MLflow only), mlflow missing, or an
            unknown run id.
    """
    if tracking.backend == "none":
        return None
    if tracking.backend != "mlflow":
        raise UsageError("export, quantize, evaluate and bench log to MLflow only (--log mlflow --run-id RUN); "
                         "TensorBoard holds training curves")
    _require("mlflow")
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking.uri:
        mlflow.set_tracking_uri(tracking.uri)
    try:
        if tracking.run_id:
            run = mlflow.start_run(run_id=tracking.run_id)
        else:
            mlflow.set_experiment(tracking.experiment)
            run = mlflow.start_run()
    except MlflowException as exc:
        raise UsageError(f"MLflow run {tracking.run_id!r} at {mlflow.get_tracking_uri()}: "
                         f"{str(exc).splitlines()[0]}") from None
    logged = []
    with run:
        try:
            for path in map(Path, models):
                logged.append(_log_onnx(path))
            if metrics:
                mlflow.log_metrics({metric_name(k): float(v) for k, v in metrics.items() if math.isfinite(float(v))})
            for name, document in (documents or {}).items():
                mlflow.log_dict(json.loads(json.dumps(document, default=str)), name)
            for path in map(Path, files):
                mlflow.log_artifact(str(path))
        except MlflowException as exc:
            raise UsageError(f"MLflow run {run.info.run_id} at {mlflow.get_tracking_uri()}: "
                             f"{str(exc).splitlines()[0]}") from None
        run_id = run.info.run_id
    return {"backend": "mlflow", "run_id": run_id, "where": mlflow.get_tracking_uri(), "models": logged}


def metric_name(name: str) -> str:
    """``name`` in the characters MLflow allows in a metric's name (a variant such as ``torch eager``)."""
    kept = "".join(c if c.isalnum() or c in "-_./" else "_" for c in name)
    while "__" in kept:
        kept = kept.replace("__", "_")
    return "/".join(part.strip("_") for part in kept.split("/"))


def artifact_name(path: Path) -> str:
    """The name an ONNX file is logged under: its stem in the characters MLflow allows (``m.int8`` -> ``m_int8``)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem) or "model"


def _log_onnx(path: Path) -> str:
    """Log one ONNX model (a package folder: each of its graphs) in MLflow's onnx flavour with a signature."""
    import mlflow.onnx
    import onnx

    graphs = sorted(path.glob("*.onnx")) if path.is_dir() else [path]
    for graph in graphs:
        model = onnx.load(str(graph))
        name = artifact_name(graph) if not path.is_dir() else f"{artifact_name(path)}-{artifact_name(graph)}"
        mlflow.onnx.log_model(model, name=name, signature=_signature(model), save_as_external_data=False)
    if path.is_dir() and (path / "manifest.json").is_file():
        mlflow.log_artifact(str(path / "manifest.json"), artifact_path=artifact_name(path))
    return artifact_name(path)


def _signature(model):
    """An MLflow signature of an ONNX graph's inputs and outputs (-1 for a dynamic axis)."""
    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    initializers = {i.name for i in model.graph.initializer}

    def spec(value) -> TensorSpec:
        kind = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim)
        return TensorSpec(dtype, shape, value.name)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([spec(v) for v in model.graph.output]))
