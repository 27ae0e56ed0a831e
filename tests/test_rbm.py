"""RBMs and the DBN (issue 15): contrastive divergence (CD-k and persistent) lowers the reconstruction error and
raises the pseudo-likelihood, the feature graph exports with parity, the RBM stack unrolls into the ``dbn``
classifier through ``--init-from``, whose int8/fp16 variants pass the agreement gate, and the sample and filter
grids are written at their sizes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dlpipe.apps.cli import cli
from dlpipe.export.onnx_export import export_checkpoint
from dlpipe.export.quantize import QuantizationConfig, quantize
from dlpipe.runtime import load
from dlpipe.runtime.features import FeatureExtractor
from dlpipe.training import data as datasets
from dlpipe.training import rbm
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from dlpipe.training.loop import init_weights, load_matching
from dlpipe.training.registry import get_spec

HIDDEN = [48, 24]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these models are tiny, and on a busy machine a second thread only waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits(data_dir) -> torch.Tensor:
    """600 real MNIST digits, normalised as the models take them."""
    images, _ = datasets.load_split("mnist", "train", data_dir, limit=600)
    return datasets.normalize(datasets.to_nchw(images), datasets.get_dataset("mnist"))


def _stack(hidden=(64,)) -> rbm.RBMStack:
    torch.manual_seed(0)
    info = datasets.get_dataset("mnist")
    return get_spec("rbm").build(hidden=list(hidden), image_mean=list(info.mean), image_std=list(info.std))


def _cd_steps(model, v, steps: int, k: int = 1, persistent: bool = False) -> list[float]:
    cfg = rbm.RBMConfig(lr=0.1, batch_size=100)
    optimizer = rbm._optimizer(model, 0, cfg)
    g = torch.Generator().manual_seed(0)
    chain = torch.bernoulli(v[:100], generator=g) if persistent else None
    errors = []
    for step in range(steps):
        batch = v[(step * 100) % len(v):][:100]
        error, sampled = rbm.contrastive_divergence(model, 0, batch, k, chain, g)
        if persistent:
            assert not torch.equal(sampled, chain) and set(sampled.unique().tolist()) <= {0.0, 1.0}
            chain = sampled
        optimizer.step()
        errors.append(error)
    return errors


def test_cd_steps_lower_the_reconstruction_error_and_raise_the_pseudo_likelihood(digits):
    model = _stack()
    v = model.visible(digits)
    before_error, before_pl = rbm.reconstruction_error(model, 0, v), rbm.pseudo_likelihood(model, 0, v)
    _cd_steps(model, v, steps=30, k=2)
    after_error, after_pl = rbm.reconstruction_error(model, 0, v), rbm.pseudo_likelihood(model, 0, v)
    assert math.isfinite(before_pl) and math.isfinite(after_pl)
    assert after_error < 0.7 * before_error, (before_error, after_error)
    assert after_pl > before_pl + 20, (before_pl, after_pl)  # nats per image over 784 units


def test_persistent_cd_runs_and_learns(digits):
    model = _stack()
    v = model.visible(digits)
    before = rbm.reconstruction_error(model, 0, v)
    _cd_steps(model, v, steps=20, persistent=True)
    assert rbm.reconstruction_error(model, 0, v) < 0.8 * before


def test_pseudo_likelihood_is_the_free_energy_difference_of_one_flip():
    model = _stack(hidden=(5,))
    v = (torch.rand(3, 784, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    flip = torch.randint(784, (3,), generator=torch.Generator().manual_seed(7))
    flipped = v.clone()
    flipped[torch.arange(3), flip] = 1 - flipped[torch.arange(3), flip]
    expected = 784 * torch.nn.functional.logsigmoid(rbm.free_energy(flipped, model, 0) - rbm.free_energy(v, model, 0))
    assert rbm.pseudo_likelihood(model, 0, v, seed=7) == pytest.approx(float(expected.detach().mean()), rel=1e-5)


@pytest.fixture(scope="module")
def rbm_run(tmp_path_factory, data_dir) -> dict:
    """A two-layer stack trained through the command line (a few seconds)."""
    out = tmp_path_factory.mktemp("rbm")
    result = CliRunner().invoke(cli, ["train", "rbm", "--limit", "1000", "--test-limit", "200", "--epochs", "3",
                                      "--lr", "0.1", "--model-arg", f"hidden={json.dumps(HIDDEN)}", "--threads", "1",
                                      "--cd-k", "1",
                                      "--data-dir", data_dir, "--out", str(out), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout)


def test_training_reports_every_epoch_of_every_layer(rbm_run):
    rows = [json.loads(line) for line in open(rbm_run["log"])]
    assert [(r["layer"], r["epoch"]) for r in rows] == [(layer, e) for layer in (1, 2) for e in (1, 2, 3)]
    first = [r for r in rows if r["layer"] == 1]
    assert first[-1]["val_recon_error"] < first[0]["val_recon_error"]
    assert first[-1]["val_pseudo_likelihood"] > first[0]["val_pseudo_likelihood"]
    assert all(math.isfinite(r["val_pseudo_likelihood"]) for r in rows)


def test_sample_and_filter_grids(rbm_run):
    # make_grid: nrow images a row, 2 pixels of padding around each
    samples, filters = Image.open(rbm_run["samples"]), Image.open(rbm_run["filters"])
    assert samples.size == (8 * 30 + 2, 8 * 30 + 2)  # 64 chains, 8 x 8
    per_row = math.isqrt(HIDDEN[0])  # all 48 first-layer filters, 6 a row, 8 rows
    assert filters.size == (per_row * 30 + 2, math.ceil(HIDDEN[0] / per_row) * 30 + 2)
    for image in (samples, filters):
        assert np.asarray(image.convert("L"))[2:30, 2:30].std() > 5  # the first cell is a picture, not a flat tile


@pytest.fixture(scope="module")
def rbm_export(rbm_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("rbm_onnx") / "rbm.onnx"
    return path, export_checkpoint(rbm_run["best"], path)


def test_feature_graph_export_parity_at_two_batch_sizes(rbm_run, rbm_export, data_dir, tmp_path):
    path, report = rbm_export
    assert {(p.output, p.batch) for p in report.parity} == {(o, b) for o in ("features", "reconstruction")
                                                          for b in (1, 16)}
    assert all(p.max_abs <= p.atol for p in report.parity)
    extractor = load(path)
    assert isinstance(extractor, FeatureExtractor)
    images, _ = datasets.load_split("mnist", "test", data_dir, limit=5)
    features = extractor.encode(images)
    model = model_from_checkpoint(load_checkpoint(rbm_run["best"]))
    x = datasets.normalize(datasets.to_nchw(images), datasets.get_dataset("mnist"))
    with torch.no_grad():
        expected = model(x)[0].numpy()
    assert features.shape == (5, HIDDEN[-1]) and np.abs(features - expected).max() < 1e-4
    files = [str(tmp_path / f"digit{i}.png") for i in range(2)]
    for image, file in zip(images, files):
        Image.fromarray(image).save(file)
    result = CliRunner().invoke(cli, ["encode", str(path), *files, "--out", str(tmp_path / "f.npy")])
    assert result.exit_code == 0, result.output
    assert np.abs(np.load(tmp_path / "f.npy") - expected[:2]).max() < 1e-4


def test_feature_variants_pass_the_cosine_gate(rbm_export, data_dir):
    path, _ = rbm_export
    for precision, fmt in (("fp16", "auto"), ("int8", "qdq-u8s8")):
        config = QuantizationConfig(precision, format=fmt, calibration_size=64, min_agreement=0.98)
        report = quantize(path, None, config, check_size=128, data_dir=data_dir)
        assert report.agreement >= 0.98 and "cosine" in report.agreement_name
    result = CliRunner().invoke(cli, ["evaluate", str(path), str(path.with_name("rbm.int8.onnx")), "--limit", "200",
                                      "--json"])
    assert result.exit_code == 0, result.output
    fp32, int8 = json.loads(result.stdout)
    assert int8["recon_error"] == pytest.approx(fp32["recon_error"], rel=0.05)


def test_init_from_unrolls_the_rbm_into_the_dbn(rbm_run):
    state = load_checkpoint(rbm_run["best"])["state_dict"]
    dbn = get_spec("dbn").build(in_channels=1, image_size=[28, 28], num_classes=10, hidden=HIDDEN)
    init_weights(dbn, "xavier")
    copied = load_matching(dbn, rbm_run["best"])
    assert sorted(copied) == sorted(["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
                                     "input_mean", "input_std"])
    assert not any(name.startswith("visible_biases") for name in copied)
    assert torch.equal(dbn.layers[0].weight, state["layers.0.weight"])
    # the unrolled layers compute the RBM's features exactly
    stack = model_from_checkpoint(load_checkpoint(rbm_run["best"]))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        h = dbn.layers[1](torch.sigmoid(dbn.layers[0]((x * dbn.input_std + dbn.input_mean).flatten(1)))).sigmoid()
        assert torch.allclose(h, stack(x)[0], atol=1e-6)


@pytest.mark.slow
def test_pretrained_dbn_fine_tunes_exports_quantizes_and_classifies(rbm_run, tmp_path, data_dir):
    out = tmp_path / "dbn"
    result = CliRunner().invoke(cli, [
        "train", "dbn", "--init-from", rbm_run["best"], "--model-arg", f"hidden={json.dumps(HIDDEN)}",
        "--limit", "3000", "--test-limit", "500", "--epochs", "8", "--optimizer", "adam", "--lr", "1e-2",
        "--threads", "1", "--data-dir", data_dir, "--out", str(out), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "init-from: 6 of 8 tensors" in result.stderr
    assert json.loads(result.stdout)["test_acc"] > 0.8
    model = out / "dbn.onnx"
    assert CliRunner().invoke(cli, ["export", str(out / "best.pt"), "--out", str(model)]).exit_code == 0
    for precision in ("int8", "fp16"):
        q = CliRunner().invoke(cli, ["quantize", str(model), "--to", precision, "--min-agreement", "0.98", "--json"])
        assert q.exit_code == 0, q.output
        assert json.loads(q.stdout)["agreement"] >= 0.98
    images, labels = datasets.load_split("mnist", "test", data_dir, limit=3)
    files = []
    for i, (image, label) in enumerate(zip(images, labels)):
        files.append(str(tmp_path / f"digit{i}_{label}.png"))
        Image.fromarray(image).save(files[-1])
    c = CliRunner().invoke(cli, ["classify", str(out / "dbn.int8.onnx"), *files, "--top-k", "1", "--json"])
    assert c.exit_code == 0, c.output
    assert sum(r["label"] == f.split("_")[-1][0] for r, f in zip(json.loads(c.stdout), files)) >= 2


def _one_error_line(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("dlpipe: error: "), result.output
    return lines[0]


def test_bad_inputs_are_one_line(tmp_path, data_dir):
    assert "takes no model argument 'depth'" in _one_error_line(
        ["train", "rbm", "--model-arg", "depth=3", "--limit", "100", "--out", str(tmp_path / "a")])
    assert "hidden must be a list" in _one_error_line(
        ["train", "rbm", "--model-arg", "hidden=-5", "--limit", "100", "--out", str(tmp_path / "b")])
    assert "--optimizer does not apply" in _one_error_line(
        ["train", "rbm", "--optimizer", "adam", "--limit", "100", "--out", str(tmp_path / "c")])
    assert "--cd-k" in _one_error_line(
        ["train", "lenet5", "--cd-k", "2", "--limit", "100", "--out", str(tmp_path / "d")])
    assert "is for segmentation" in _one_error_line(
        ["train", "rbm", "--dataset", "shapes-scenes", "--limit", "10", "--out", str(tmp_path / "e")])
    assert "no batch normalisation" in _one_error_line(
        ["train", "dbn", "--batch-norm", "--limit", "100", "--out", str(tmp_path / "f")])
    # a checkpoint of an unrelated model: nothing of the same name and shape to start from
    lenet = get_spec("lenet5").build(in_channels=1, image_size=[28, 28], num_classes=10)
    unrelated = save_checkpoint({"model": "lenet5", "task": "classification", "state_dict": lenet.state_dict()},
                                tmp_path / "lenet.pt")
    line = _one_error_line(["train", "dbn", "--init-from", str(unrelated), "--limit", "100", "--epochs", "1",
                            "--data-dir", data_dir, "--out", str(tmp_path / "g")])
    assert "holds no weights of the same names and shapes" in line and "lenet.pt" in line
