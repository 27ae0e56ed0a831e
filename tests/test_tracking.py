"""Experiment tracking (issue 18): a training run's hyper-parameters, per-epoch metrics and test figures in
TensorBoard and MLflow, read back through each library's own reader; export/quantize/evaluate/bench add to
the training's MLflow run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dlpipe.apps.cli import cli

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

TINY = ["lenet5", "--epochs", "2", "--limit", "300", "--test-limit", "200", "--no-progress", "--json"]


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _invoke(args: list[str], env: dict | None = None):
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    return result


def _json(result) -> dict:
    return json.loads(result.stdout)


def test_tensorboard_holds_every_epoch_the_config_and_the_test_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    # the environment variable alone asks for it
    summary = _json(_invoke(["train", *TINY, "--out", str(out)], env={"DLPIPE_LOG": "tensorboard"}))
    assert summary["tracking"]["backend"] == "tensorboard"
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows = _rows(out)
    val_acc = events.Scalars("val/acc")
    assert [e.step for e in val_acc] == [r["epoch"] for r in rows] == [1, 2]
    assert [e.value for e in val_acc] == pytest.approx([r["val_acc"] for r in rows])
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["train_loss"] for r in rows])
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in rows])
    assert events.Scalars("train/samples_per_s")[0].value > 0
    assert events.Scalars("test/acc")[-1].value == pytest.approx(summary["test_acc"])
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| model | lenet5 |" in config and "| epochs | 2 |" in config
    assert {"curves", "predictions"} <= set(events.Tags()["images"])  # sample predictions, epoch by epoch
    assert [e.step for e in events.Images("predictions")] == [1, 2]


@pytest.mark.slow
def test_mlflow_run_holds_the_model_life_from_training_to_latency(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go to ./mlruns beside a sqlite store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    summary = _json(_invoke(["train", *TINY, "--out", str(out), "--log", "mlflow", "--tracking-uri", uri,
                             "--experiment", "tests"]))
    run_id = summary["tracking"]["run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    assert run.data.params["model"] == "lenet5" and run.data.params["epochs"] == "2"
    history = client.get_metric_history(run_id, "val_acc")
    rows = _rows(out)
    history = sorted((m.step, m.value) for m in history)
    assert [step for step, _ in history] == [r["epoch"] for r in rows] == [1, 2]
    assert [value for _, value in history] == pytest.approx([r["val_acc"] for r in rows])
    assert run.data.metrics["test_acc"] == pytest.approx(summary["test_acc"])
    assert {"metrics.jsonl", "curves.png"} <= {a.path for a in client.list_artifacts(run_id)}

    # export and evaluate join the same run: the ONNX model in MLflow's onnx flavour, the metric per precision
    model = tmp_path / "m.onnx"
    attach = ["--run-id", run_id, "--tracking-uri", uri]
    exported = _invoke(["export", str(out / "best.pt"), "--out", str(model), *attach])
    assert f"logged to mlflow run {run_id}" in exported.stderr
    evaluated = _json_list(_invoke(["evaluate", str(model), "--limit", "200", "--json", *attach]))
    timed = _json_list(_invoke(["bench", str(model), "--batch", "1", "--iters", "3", "--warmup", "1", "--json",
                                *attach]))
    run = client.get_run(run_id)
    assert run.data.metrics["eval_fp32_accuracy"] == pytest.approx(evaluated[0]["accuracy"])
    assert run.data.metrics["bench/m.onnx_fp32/b1/p50_ms"] == pytest.approx(timed[0]["p50_ms"])  # the latency table
    assert {"export.json", "evaluate", "bench"} <= {a.path for a in client.list_artifacts(run_id)}
    mlflow.set_tracking_uri(uri)
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in logged] == [run_id]
    signature = mlflow.models.get_model_info(logged[0].model_uri).signature
    assert signature.inputs.inputs[0].shape == (-1, 1, 28, 28)
    # a real client gets the right tensor back: MLflow's onnx flavour runs the logged model as exported
    from dlpipe.runtime.engine import Engine

    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    served = mlflow.pyfunc.load_model(logged[0].model_uri).predict({"image": x})
    expected = Engine(model, device="cpu").run({"image": x})
    first = next(iter(served.values())) if isinstance(served, dict) else np.asarray(served)
    np.testing.assert_allclose(np.asarray(first), expected[0], atol=1e-5)


def _json_list(result) -> list:
    return json.loads(result.stdout)


def test_tracking_refuses_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # an unknown run: one line naming it, no traceback
    result = CliRunner().invoke(cli, ["bench", "missing.onnx", "--run-id", "nope", "--tracking-uri", uri])
    assert result.exit_code != 0 and "Traceback" not in result.output
    # a tracker whose library is not installed: the extra that installs it
    monkeypatch.setitem(sys.modules, "mlflow", None)
    result = CliRunner().invoke(cli, ["train", *TINY, "--out", str(tmp_path / "run"), "--log", "mlflow"])
    assert result.exit_code != 0
    assert "pip install 'dlpipe[mlflow]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "best.pt").exists()  # refused before training
