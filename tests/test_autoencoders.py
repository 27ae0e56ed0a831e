"""The autoencoders (issue 15): ae, dae and vae train (the loss falls), export as two-graph packages whose
graphs match PyTorch at two batch sizes, quantize under the PSNR gate, denoise better than the noisy input,
encode and denoise through the command line (bad inputs included), generate deterministically (VAE), and
hand their encoder to a classifier (--init-from)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dlpipe.apps.cli import cli
from dlpipe.export.onnx_export import export_checkpoint
from dlpipe.runtime import load
from dlpipe.runtime.autoencoder import Autoencoder
from dlpipe.runtime.errors import UsageError
from dlpipe.training import data as datasets
from dlpipe.training.autoencoders import corrupt, mean_ssim, psnr, psnr_agreement, reconstruction_loss
from dlpipe.training.loop import load_matching
from dlpipe.training.registry import get_spec
from dlpipe.training.train import TrainConfig, train

TINY = dict(epochs=1, limit=240, test_limit=40, batch_size=32, lr=3e-3, threads=1, progress=False)


@pytest.fixture(scope="module")
def mnist(data_dir):
    images, labels = datasets.load_split("mnist", "train", data_dir, limit=256)
    return datasets.to_nchw(images).float() / 255, labels


@pytest.fixture
def one_thread():
    """torch on one thread, as the training runs are (many threads on a busy machine crawl)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def packages(tmp_path_factory, data_dir):
    """ae, dae and vae trained for one short epoch (seconds) and exported; the export reports."""
    out = tmp_path_factory.mktemp("autoencoders")
    made = {}
    for name in ("ae", "dae", "vae"):
        result = train(TrainConfig(model=name, out=str(out / name), data_dir=data_dir, **TINY))
        made[name] = {"ckpt": result["best"], "package": out / f"{name}_pkg",
                      "report": export_checkpoint(result["best"], out / f"{name}_pkg")}
    return made


@pytest.mark.parametrize("name", ["ae", "dae", "vae"])
def test_a_few_steps_lower_each_models_loss(name, mnist, one_thread):
    torch.manual_seed(0)
    clean = mnist[0][:128]
    model = get_spec(name).build(in_channels=1, image_size=[28, 28])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs = (corrupt(clean, model.noise, model.noise_level, torch.Generator().manual_seed(0)) - 0.1307) / 0.3081
    losses = []
    for _ in range(15):
        loss = reconstruction_loss(model.train(), inputs, clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_noises_corrupt_the_share_and_scale_they_name():
    clean = torch.full((4, 1, 64, 64), 0.5)
    g = torch.Generator().manual_seed(0)
    masked = corrupt(clean, "masking", 0.3, g)
    assert abs((masked == 0).float().mean().item() - 0.3) < 0.02 and set(masked.unique().tolist()) == {0.0, 0.5}
    salted = corrupt(clean, "salt-pepper", 0.2, g)
    assert abs((salted != 0.5).float().mean().item() - 0.2) < 0.02
    assert abs((salted == 1).float().mean().item() - 0.1) < 0.02  # half salt, half pepper
    noisy = corrupt(clean, "gaussian", 0.1, g)
    assert abs((noisy - clean).std().item() - 0.1) < 0.01 and noisy.min() >= 0 and noisy.max() <= 1
    assert torch.equal(corrupt(clean, "none", 0.5), clean)


def test_psnr_and_ssim_known_values():
    rng = np.random.default_rng(0)
    a = rng.random((3, 1, 28, 28))
    assert np.allclose(psnr(a + 0.1, a), 20.0)  # MSE 0.01 -> 20 dB
    assert mean_ssim(a, a) == pytest.approx(1.0)
    light, heavy = (np.clip(a + s * rng.standard_normal(a.shape), 0, 1) for s in (0.05, 0.3))
    assert 1.0 > mean_ssim(light, a) > mean_ssim(heavy, a) > 0.0
    assert mean_ssim(np.clip(a * 0.5, 0, 1), a) < 0.95


def test_both_graphs_match_pytorch_at_two_batch_sizes(packages):
    for name, made in packages.items():
        rows = [(p.output, p.batch) for p in made["report"].parity]
        outputs = ["code", "logvar", "image"] if name == "vae" else ["code", "image"]
        assert sorted(rows) == sorted((o, b) for o in outputs for b in (1, 16)), (name, rows)
        assert all(p.max_abs <= p.atol for p in made["report"].parity)
        doc = json.loads((made["package"] / "manifest.json").read_text())
        assert doc["task"] == "reconstruction" and set(doc["graphs"]) == {"encoder", "decoder"}


def test_runtime_matches_pytorch_reconstruction(packages, mnist):
    from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(packages["dae"]["ckpt"])).eval()
    images = (mnist[0][:5] * 255).round().byte()
    predictor = load(packages["dae"]["package"], device="cpu")
    assert isinstance(predictor, Autoencoder)
    with torch.no_grad():
        expected = model.decode(model.encode((images.float() / 255 - 0.1307) / 0.3081)).numpy()
    got = predictor.reconstruct(images[:, 0].numpy())
    assert got.shape == (5, 28, 28, 1) and got.dtype == np.uint8
    assert np.abs(got[..., 0].astype(int) - np.round(expected[:, 0] * 255)).max() <= 1
    assert predictor.encode(images[:, 0].numpy()).shape == (5, 64)


def test_vae_generates_the_right_shape_deterministically(packages):
    vae = load(packages["vae"]["package"], device="cpu")
    a, b = vae.generate(6, seed=3), vae.generate(6, seed=3)
    assert a.shape == (6, 28, 28, 1) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, vae.generate(6, seed=4))
    walk = vae.interpolate(1, 2, 5)
    assert walk.shape == (5, 28, 28, 1)
    assert np.array_equal(walk[0], vae.generate(1, seed=1)[0]) and np.array_equal(walk[-1], vae.generate(1, seed=2)[0])
    assert vae.encode(a).shape == (6, 16)
    with pytest.raises(UsageError, match="not class-conditional"):
        vae.generate(2, label=3)
    with pytest.raises(UsageError, match="not a VAE"):
        load(packages["dae"]["package"], device="cpu").generate(2)


def test_dlpipe_generate_draws_a_vae_grid(packages, tmp_path):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(cli, ["generate", str(packages["vae"]["package"]), "--n", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] >= 4 * 28


def test_psnr_gate_refuses_a_variant_that_reconstructs_worse(packages, data_dir):
    fp32 = load(packages["dae"]["package"], device="cpu")
    images, _ = datasets.load_split("mnist", "test", data_dir, limit=32)
    checks = fp32.normalise(datasets.to_nchw(images).numpy().astype(np.float32) / 255)
    assert psnr_agreement(fp32, fp32, checks) == (1.0, 0.0)

    class Blurred:  # a "variant" whose reconstructions are fp32's with noise added
        def reconstruct_batch(self, batch):
            out = fp32.reconstruct_batch(batch)
            return np.clip(out + np.random.default_rng(0).normal(0, 0.2, out.shape), 0, 1)

    share, drop = psnr_agreement(fp32, Blurred(), checks)
    assert share == 0.0 and drop > 0.5


def _write_images(tmp_path):
    good = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30), dtype=np.uint8)).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    return good, bad, tmp_path / "missing.png"


def test_encode_cli_writes_features_and_reports_bad_files(packages, tmp_path):
    good, bad, missing = _write_images(tmp_path)
    out = tmp_path / "features.npy"
    runner = CliRunner()
    result = runner.invoke(cli, ["encode", str(packages["dae"]["package"]), str(good), str(bad), str(missing),
                                 str(good), "--out", str(out), "--json"])
    assert result.exit_code == 1
    assert "broken.png" in result.stderr and "missing.png" in result.stderr and "Traceback" not in result.output
    features = np.load(out)
    assert features.shape == (2, 64) and np.array_equal(features[0], features[1])
    rows = json.loads(result.stdout)
    assert [r.get("row") for r in rows] == [0, None, None, 1]
    again = runner.invoke(cli, ["encode", str(packages["dae"]["package"]), str(good), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert np.load(out).shape == (2, 64)  # not replaced
    wrong = runner.invoke(cli, ["encode", str(packages["dae"]["package"]), str(good), "--out", str(tmp_path / "f.txt")])
    assert wrong.exit_code == 2 and ".npy" in wrong.stderr


def test_denoise_cli_writes_beside_each_name_and_refuses_to_overwrite(packages, tmp_path):
    good, bad, missing = _write_images(tmp_path)
    out = tmp_path / "clean"
    runner = CliRunner()
    result = runner.invoke(cli, ["denoise", str(packages["dae"]["package"]), str(good), str(bad), str(missing),
                                 "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["digit.png"]
    assert Image.open(out / "digit.png").size == (30, 40)  # the input's own size
    before = (out / "digit.png").read_bytes()
    again = runner.invoke(cli, ["denoise", str(packages["dae"]["package"]), str(good), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr and (out / "digit.png").read_bytes() == before
    assert runner.invoke(cli, ["denoise", str(packages["dae"]["package"]), str(good), "--out", str(out),
                               "--overwrite"]).exit_code == 0


def test_classifier_starts_from_the_autoencoders_encoder(packages, tmp_path):
    model = get_spec("ae_classifier").build(in_channels=1, image_size=[28, 28], num_classes=10)
    names = load_matching(model, packages["dae"]["ckpt"])
    assert sorted(names) == sorted(k for k in model.state_dict() if k.startswith("encoder."))
    dae = torch.load(packages["dae"]["ckpt"], weights_only=False)["state_dict"]
    assert torch.equal(model.state_dict()["encoder.0.weight"], dae["encoder.0.weight"])
    fc = get_spec("ae_classifier").build(in_channels=1, image_size=[28, 28], num_classes=10, arch="fc")
    assert len(load_matching(fc, packages["ae"]["ckpt"])) == sum(k.startswith("encoder.") for k in fc.state_dict())


@pytest.fixture(scope="module")
def trained_dae(tmp_path_factory, data_dir):
    """A denoising autoencoder trained for a few epochs on 3,000 MNIST digits (about 20 s), exported."""
    out = tmp_path_factory.mktemp("dae")
    result = train(TrainConfig(model="dae", out=str(out / "train"), data_dir=data_dir, epochs=3, limit=3000,
                               test_limit=200, batch_size=64, lr=3e-3, threads=1, progress=False,
                               model_args={"noise": "salt-pepper", "noise_level": 0.2}))
    export_checkpoint(result["best"], out / "pkg")
    return out / "pkg"


@pytest.mark.slow
def test_trained_dae_denoises_and_its_variants_pass_the_psnr_gate(trained_dae, data_dir):
    runner = CliRunner()
    for precision in ("fp16", "int8"):
        result = runner.invoke(cli, ["quantize", str(trained_dae), "--to", precision, "--calibration-size", "64",
                                     "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["max_abs_diff"] <= 0.5  # the PSNR drop in dB
    result = runner.invoke(cli, ["evaluate", str(trained_dae), str(trained_dae / "manifest.int8.json"), "--limit",
                                 "200", "--json", "--data-dir", data_dir])
    assert result.exit_code == 0, result.output
    fp32, int8 = json.loads(result.stdout)
    assert fp32["psnr"] > 15 and 0.5 < fp32["ssim"] <= 1
    own = next(r for r in fp32["noisy"] if (r["noise"], r["level"]) == ("salt-pepper", 0.2))
    assert own["output_psnr"] > own["input_psnr"] + 3, own  # the trained noise: several dB cleaner
    assert abs(int8["psnr"] - fp32["psnr"]) <= 0.5


def test_noise_is_chosen_at_training_time_and_checked(tmp_path, data_dir):
    runner = CliRunner()
    bad = runner.invoke(cli, ["train", "dae", "--model-arg", "noise=speckle", "--limit", "64", "--epochs", "1",
                              "--data-dir", data_dir, "--out", str(tmp_path / "bad"), "--no-progress"])
    assert bad.exit_code != 0 and "unknown noise 'speckle'" in bad.stderr and "Traceback" not in bad.output
    wrong = runner.invoke(cli, ["train", "ae", "--dataset", "shapes-scenes", "--limit", "8", "--out",
                                str(tmp_path / "seg"), "--no-progress"])
    assert wrong.exit_code != 0 and "segmentation dataset" in wrong.stderr
    model = get_spec("dae").build(in_channels=1, image_size=[28, 28], noise="masking", noise_level=0.5)
    assert (model.noise, model.noise_level) == ("masking", 0.5)
