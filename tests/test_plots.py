"""Plots (issue 18): every run's curves.png, ``evaluate --plots`` per task, ``bench --plot``; the throttle;
a plotting failure never stops a run; bad targets are one-line errors."""

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dlpipe.apps.cli import cli
from dlpipe.training import plots, report_plots


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def assert_png(path, min_size=(300, 200)):
    """A real PNG of a sensible size with something drawn on it (not one flat colour)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1], image.size
        assert image.width <= 4000 and image.height <= 4000, image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier trained through the command line (2 epochs), and its ONNX export."""
    d = tmp_path_factory.mktemp("plots")
    result = json.loads(run("train", "dmlp", "--dataset", "shapes", "--epochs", "2", "--limit", "400",
                            "--test-limit", "100", "--batch-size", "64", "--out", d / "run", "--no-progress",
                            "--json").stdout)
    run("export", result["best"], "--out", d / "m.onnx")
    return {"dir": d, "run": d / "run", "onnx": d / "m.onnx"}


def test_a_training_run_draws_its_curves_with_every_row(trained):
    run_dir = trained["run"]
    png, metrics = run_dir / "curves.png", run_dir / "metrics.jsonl"
    assert_png(png, (800, 250))
    # the second row came within the throttle's 15 s of the first: only the final forced redraw shows it
    assert png.stat().st_mtime_ns >= metrics.stat().st_mtime_ns
    x_name, figures = plots.series(plots.read_rows(metrics))
    assert x_name == "epoch" and figures["train_loss"][0] == [1.0, 2.0]
    titles = [title for title, _ in plots.panels(figures)]
    assert titles == ["loss", "acc", "learning rate"]


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_redraw_is_throttled_per_file_unless_forced(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(plots.time, "monotonic", lambda: clock[0])
    metrics = tmp_path / "metrics.jsonl"
    _rows(metrics, [{"epoch": 1, "train_loss": 2.0, "val_acc": 0.3, "lr": 0.1}])
    assert plots.curves(metrics) == tmp_path / "curves.png"
    first = (tmp_path / "curves.png").read_bytes()
    _rows(metrics, [{"epoch": 1, "train_loss": 2.0, "val_acc": 0.3, "lr": 0.1},
                    {"epoch": 2, "train_loss": 1.0, "val_acc": 0.6, "lr": 0.01}])
    clock[0] += 14.0
    assert plots.curves(metrics) is None
    assert (tmp_path / "curves.png").read_bytes() == first
    other = tmp_path / "other" / "metrics.jsonl"  # another run is not held back by this one
    other.parent.mkdir()
    _rows(other, [{"epoch": 1, "train_loss": 2.0}])
    assert plots.curves(other) is not None
    assert plots.curves(metrics, force=True) is not None
    forced = (tmp_path / "curves.png").read_bytes()
    assert forced != first
    clock[0] += 15.5
    _rows(metrics, [{"epoch": e, "train_loss": 1.0 / e, "val_acc": 0.3, "lr": 0.1} for e in range(1, 4)])
    assert plots.curves(metrics) is not None and (tmp_path / "curves.png").read_bytes() != forced


def test_a_plotting_failure_warns_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from dlpipe.training.loop import MetricsLog

    def broken(path):
        raise RuntimeError("no\nfonts")

    monkeypatch.setattr(plots, "draw_curves", broken)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"epoch": 1, "train_loss": 1.0})
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert not (tmp_path / "curves.png").exists()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("dlpipe: warning: could not draw curves.png") and "no fonts" in err[0]


def test_panels_follow_the_keys_each_loop_writes(tmp_path):
    dqn = [{"step": 500, "episode": 3, "episode_return": 20.0, "episode_length": 20, "epsilon": 0.5},
           {"step": 600, "loss": 0.4, "q_mean": 3.0}, {"step": 1000, "eval_mean_return": 40.0, "eval_std_return": 3.0,
                                                       "eval_episodes": 5}]
    x_name, figures = plots.series(dqn)
    assert x_name == "step" and figures["loss"] == ([600.0], [0.4])
    assert dict(plots.panels(figures)) == {"loss": ["loss"], "q_mean": ["q_mean"],
                                           "return": ["episode_return", "eval_mean_return"], "schedule": ["epsilon"]}
    gan = [{"epoch": e, "loss_d": 1.2, "loss_g": 0.8, "d_x": 0.7, "d_g_z": 0.3, "val_fid": 40.0 / e, "val_kid": 0.02,
            "seconds": 3.0} for e in (1, 2)]
    assert dict(plots.panels(plots.series(gan)[1])) == {"loss": ["loss_d", "loss_g"], "d_x, d_g_z, kid":
                                                        ["d_x", "d_g_z", "val_kid"], "fid": ["val_fid"]}
    rbm = [{"layer": layer, "epoch": e, "train_recon_error": 9.0 - e, "val_recon_error": 9.5 - e, "lr": 0.1}
           for layer in (1, 2) for e in (1, 2, 3)]
    x_name, figures = plots.series(rbm)
    assert x_name.startswith("epoch (counted") and figures["train_recon_error"][0] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert plots._phase_starts(rbm, figures["lr"][0]) == [(3.5, "layer 2")]
    for name, rows in (("dqn", dqn), ("gan", gan), ("rbm", rbm)):
        (tmp_path / name).mkdir()
        _rows(tmp_path / name / "metrics.jsonl", rows)
        assert_png(plots.draw_curves(tmp_path / name / "metrics.jsonl"))
    frozen = tmp_path / "frozen"  # a learning rate of 0 (a frozen stage) and negative figures: no log scale
    frozen.mkdir()
    _rows(frozen / "metrics.jsonl", [{"epoch": e, "stage": "head" if e < 3 else "full", "train_loss": 0.0,
                                      "val_pseudo_likelihood": -90.0 + e, "lr": 0.0 if e < 3 else 1e-4}
                                     for e in (1, 2, 3, 4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_png(plots.draw_curves(frozen / "metrics.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"epoch": 1, "seconds": 2.0}\n{"half": ')
    assert plots.draw_curves(empty) is None


def test_evaluate_plots_writes_the_confusion_matrix_beside_the_report(trained, tmp_path):
    out = run("evaluate", trained["onnx"], "--limit", "120", "--plots", tmp_path / "ev")
    report = json.loads((tmp_path / "ev" / "m.json").read_text())
    assert report["task"] == "classification" and report["images"] == 120
    assert np.asarray(report["confusion"]).sum() == 120
    assert_png(tmp_path / "ev" / "m_confusion.png")
    assert f"wrote {tmp_path / 'ev' / 'm.json'}, {tmp_path / 'ev' / 'm_confusion.png'}" in out.stdout


def test_evaluate_plots_draws_iou_bars_of_a_segmenter(fcn_onnx, tmp_path):
    reports = json.loads(run("evaluate", fcn_onnx, "--limit", "20", "--plots", tmp_path, "--json").stdout)
    assert reports[0]["files"] == [str(tmp_path / "fcn8s.json"), str(tmp_path / "fcn8s_iou.png")]
    saved = json.loads((tmp_path / "fcn8s.json").read_text())
    assert saved["per_class_iou"] == reports[0]["per_class_iou"]
    assert_png(tmp_path / "fcn8s_iou.png")


def test_a_file_as_the_plots_folder_is_a_one_line_error(trained, tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    result = run("evaluate", trained["onnx"], "--plots", target, ok=False)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dlpipe: error: --plots") and "is a file" in lines[0], lines
    assert target.read_text() == "x"


def test_bench_plot_draws_latency_and_writes_the_json_beside_it(trained, tmp_path):
    run("bench", trained["onnx"], "--batch", "1,8", "--iters", "6", "--warmup", "1", "--plot", tmp_path / "lat.png")
    data = json.loads((tmp_path / "lat.json").read_text())
    assert [(d["batch"], d["name"]) for d in data] == [(1, "m.onnx [fp32]"), (8, "m.onnx [fp32]")]
    assert all(d["p50_ms"] <= d["p90_ms"] <= d["p99_ms"] for d in data)
    assert_png(tmp_path / "lat.png", (600, 400))
    bad = run("bench", trained["onnx"], "--plot", tmp_path / "lat.svg", ok=False)
    assert bad.exit_code == 2 and bad.output.strip().splitlines() == [
        f"dlpipe: error: --plot '{tmp_path / 'lat.svg'}' must name a .png file"]


def test_detection_reports_carry_cocoeval_precision_recall(tmp_path):
    from dlpipe.training.detection import coco_metrics

    box = np.array([[2.0, 2.0, 20.0, 20.0], [30.0, 30.0, 50.0, 60.0]])
    targets = [{"boxes": box, "labels": np.array([1, 2])}] * 3
    found = [{"boxes": box, "labels": np.array([1, 2]), "scores": np.array([0.9, 0.8])}] * 2 + [
        {"boxes": box[:1] + 25, "labels": np.array([1]), "scores": np.array([0.95])}]  # a miss, and a false box
    report = coco_metrics(targets, found, ["bg", "a", "b", "c"], curves=True)
    curves = report["pr_curves"]
    assert len(curves["recall"]) == 101 and curves["iou"] == 0.5
    assert curves["precision"]["c"] is None  # no ground truth
    b = np.array(curves["precision"]["b"])  # 2 of 3 found, no false boxes: precision 1 up to recall 2/3, then 0
    assert (b[curves["recall"].index(0.66)] == 1.0) and (b[curves["recall"].index(0.67):] == 0).all()
    a = np.array(curves["precision"]["a"])  # the false box scored highest: interpolated precision 2/3 at most
    assert a[0] == pytest.approx(2 / 3, abs=1e-4)
    assert (np.mean(a) + np.mean(b)) / 2 == pytest.approx(report["map50"], abs=1e-3)  # mAP@0.5 from the same arrays
    assert "pr_curves" not in coco_metrics(targets, found, ["bg", "a", "b", "c"])  # training's rows stay figures
    report.update(model="det.onnx", precision="fp32", dataset="toy")
    assert report_plots.precision_recall(report, tmp_path / "det.json") == [tmp_path / "det_pr.png"]
    assert_png(tmp_path / "det_pr.png")


def test_bleu_by_caption_length_and_returns_per_episode(tmp_path):
    from dlpipe.training.captioning import bleu_by_length

    short = [["a big red circle here"], ["a small blue square there"]]
    long = [["a big red circle left of a blue square"], ["a small green star above a big red cross"]]
    buckets = bleu_by_length(["a big red circle here", "a small blue square there", "nothing like it at all", "no"],
                             short + long)
    assert [(b["words"], b["images"]) for b in buckets] == [("5", 2), ("9", 2)]
    assert buckets[0]["bleu"] == pytest.approx(1.0) and buckets[1]["bleu"] == 0.0
    report = {"model": "cap", "precision": "int8", "dataset": "shapes-captions", "bleu": 0.4, "bleu_by_length": buckets}
    assert_png(report_plots.bleu_by_length(report, tmp_path / "cap.json")[0])
    policy = {"model": "p.onnx", "precision": "fp32", "env": "CartPole-v1", "returns": [10.0, 200.0, 500.0]}
    assert report_plots.returns(policy, tmp_path / "p.json") == [tmp_path / "p_returns.png"]
    assert_png(tmp_path / "p_returns.png")
    assert report_plots.returns({"returns": []}, tmp_path / "q.json") == []


def test_sample_pictures_show_the_boxes_and_the_predictions(tmp_path):
    """The tracker's sample pictures (issue 18): a detector's boxes are drawn where they are; a classifier's
    images carry their predicted label."""
    import numpy as np
    from PIL import Image

    from dlpipe.training import plots

    images = np.zeros((2, 3, 64, 64), np.uint8)
    plain = np.asarray(Image.open(plots.annotated(images, ["a", "b"], tmp_path / "plain.png")).convert("RGB"))
    boxed = np.asarray(Image.open(plots.annotated(images, ["a", "b"], tmp_path / "boxed.png",
                                                  [[(5, 5, 30, 40, "cat 0.90")], []])).convert("RGB"))

    def yellow(a):
        return int(((a[..., 0] > 200) & (a[..., 1] > 200) & (a[..., 2] < 80)).sum())

    assert yellow(plain) == 0 and yellow(boxed) > 200
    # the box is in the left image's half of the picture, not the right one's
    assert yellow(boxed[:, : boxed.shape[1] // 2]) == yellow(boxed)
    logits = np.eye(3, dtype=np.float32)[[0, 2]] * 5
    path = plots.predictions(np.random.default_rng(0).random((2, 1, 28, 28)), np.array([0, 1]), logits,
                             ["zero", "one", "two"], tmp_path / "pred.png")
    assert Image.open(path).size[0] > Image.open(path).size[1]  # a row of images
