"""The task endpoint (``POST /v1/models/{name}/predict``) of the tasks beyond the image classifiers: a captioner
and an autoencoder served from their package folders, a DQN policy (observations as JSON or .npy), a DCGAN
generator (query parameters only) and a stylizer. Each answer must equal what the CLI or the runtime gives for
the same input; packages refuse the tensor routes with a clear 400."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from dlpipe.apps.serve import ModelSettings, Repository, create_app
from dlpipe.runtime import load
from serve_helpers import ServerThread

pytestmark = pytest.mark.slow  # the fixture trains and exports five tiny models (about 40 s)
TIMEOUT = 30.0
WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_dir, mnist_checkpoint) -> dict[str, Path]:
    """Tiny models of five tasks, trained for seconds and exported: name -> ONNX file or package folder."""
    from dlpipe.export.onnx_export import export_checkpoint
    from dlpipe.training import gan
    from dlpipe.training.train import train as train_autoencoder
    from dlpipe.training.captioning import CaptionOptions, train_captioner
    from dlpipe.training.dqn import DQNConfig, train as train_dqn
    from dlpipe.training.loop import TrainConfig

    out = tmp_path_factory.mktemp("serve_tasks")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        made = {}
        run = train_captioner(TrainConfig(model="captioner", out=str(out / "cap"), epochs=1, limit=200, test_limit=20,
                                          threads=1, progress=False), CaptionOptions(embed_dim=32, hidden=64, beam=3))
        made["captioner"] = export_checkpoint(run["best"], out / "captioner") and out / "captioner"
        run = train_autoencoder(TrainConfig(model="dae", out=str(out / "dae"), data_dir=data_dir, epochs=1, limit=240,
                                            test_limit=40, batch_size=32, lr=3e-3, threads=1, progress=False))
        made["dae"] = export_checkpoint(run["best"], out / "dae_pkg") and out / "dae_pkg"
        run = train_dqn(DQNConfig(out=str(out / "dqn"), total_steps=600, learning_starts=100, hidden=(16, 16),
                                  eval_interval=300, eval_episodes=1, seed=0, progress=False))
        made["policy"] = export_checkpoint(run["best"], out / "policy.onnx") and out / "policy.onnx"
        run = gan.train(gan.GANConfig(model="cdcgan", classifier=mnist_checkpoint, data_dir=data_dir,
                                      out=str(out / "gan"), limit=200, epochs=1, batch_size=32, quality_samples=50,
                                      grid=16, model_args={"latent_size": 16, "width": 8}, progress=False, threads=1))
        made["digits"] = export_checkpoint(run["best"], out / "digits.onnx") and out / "digits.onnx"
        if WEIGHTS.is_file() or os.environ.get("DLPIPE_PERCEPTUAL_WEIGHTS"):
            from dlpipe.training.style import WEIGHTS_ENV
            from dlpipe.training.style_train import StylizerConfig, train as train_stylizer

            os.environ.setdefault(WEIGHTS_ENV, str(WEIGHTS))
            run = train_stylizer(StylizerConfig(dataset="shapes-scenes", limit=8, image_size=32, epochs=1,
                                                batch_size=4, val_images=4, model_args={"width": 0.25, "blocks": 1},
                                                out=str(out / "sty"), progress=False, threads=1))
            made["stylizer"] = export_checkpoint(run["best"], out / "stylizer.onnx") and out / "stylizer.onnx"
    finally:
        torch.set_num_threads(threads)
    return made


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """A repository in Triton's layout holding the packages as version folders, and the files."""
    root = tmp_path_factory.mktemp("repo")
    for name, source in models.items():
        target = root / name / "1"
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.mkdir(parents=True)
            shutil.copyfile(source, target / "model.onnx")
    with ServerThread(create_app(Repository.open([root], ModelSettings(device="cpu")))) as running:
        yield running


def _post(server, name: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{name}/predict", timeout=TIMEOUT, **kwargs)


def _image(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))


def _scene(tmp_path: Path, size: int = 48) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_captioner_package_answers_as_the_cli(server, models, tmp_path):
    from dlpipe.apps.caption import caption_images

    path = _scene(tmp_path)
    answer = _post(server, "captioner", files=[("file", (path.name, path.read_bytes(), "image/png"))])
    assert answer.status_code == 200, answer.text
    assert answer.json()["task"] == "captioning"
    row = answer.json()["results"][0]
    cli = caption_images(str(models["captioner"]), [str(path)], device="cpu")[0]
    assert row["caption"] == cli["caption"] and row["score"] == pytest.approx(cli["score"])
    # a package has no single tensor graph: the OIP routes say where to go instead of failing obscurely
    infer = httpx.post(f"{server.url}/v2/models/captioner/infer", json={"inputs": []}, timeout=TIMEOUT)
    assert infer.status_code == 400 and "/v1/models/captioner/predict" in infer.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/captioner", timeout=TIMEOUT).status_code == 400
    assert httpx.get(f"{server.url}/v2/models/captioner/ready", timeout=TIMEOUT).status_code == 200


def test_autoencoder_package_returns_the_reconstruction_at_the_uploads_size(server, models, tmp_path):
    path = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30), dtype=np.uint8)).save(path)
    answer = _post(server, "dae", content=path.read_bytes(), headers={"content-type": "image/png"})
    assert answer.status_code == 200, answer.text
    row = answer.json()["results"][0]
    picture = _image(row["reconstruction_png"])
    assert picture.shape[:2] == (40, 30) and (row["width"], row["height"]) == (30, 40)
    expected = np.asarray(Image.fromarray(load(models["dae"], device="cpu").predict([str(path)])[0][..., 0])
                          .resize((30, 40), Image.Resampling.BILINEAR))
    assert np.array_equal(picture, expected)


def test_policy_takes_json_and_npy_observations(server, models):
    policy = load(models["policy"], device="cpu")
    observations = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    expected = policy.predict(observations)
    answer = _post(server, "policy", json={"observations": observations.tolist()})
    assert answer.status_code == 200, answer.text
    rows = answer.json()["results"]
    assert [r["action"] for r in rows] == expected.actions.tolist()
    assert np.allclose([r["q_values"] for r in rows], expected.q_values, atol=1e-5)
    one = _post(server, "policy", json={"observation": observations[0].tolist()})
    assert one.json()["results"][0]["action"] == int(expected.actions[0])
    buffer = io.BytesIO()
    np.save(buffer, observations)
    npy = _post(server, "policy", files=[("file", ("obs.npy", buffer.getvalue(), "application/octet-stream"))])
    assert [r["action"] for r in npy.json()["results"]] == expected.actions.tolist()
    wrong = _post(server, "policy", json={"observations": [[1.0, 2.0]]})
    assert wrong.status_code == 400 and "[4]" in wrong.json()["error"]
    assert _post(server, "policy", json={"nothing": 1}).status_code == 400
    assert _post(server, "policy", content=b"not npy", headers={"content-type": "application/octet-stream"}
                 ).status_code == 400


def test_generator_draws_the_grid_the_cli_writes(server, models, tmp_path):
    from dlpipe.apps.generate import generate_images

    answer = _post(server, "digits", params={"n": 6, "seed": 3, "class": "7", "columns": 3})
    assert answer.status_code == 200, answer.text
    grid = _image(answer.json()["results"][0]["grid_png"])
    generate_images(str(models["digits"]), tmp_path / "grid.png", count=6, seed=3, label="7", device="cpu",
                    columns=3)
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "grid.png")))
    missing_class = _post(server, "digits", params={"n": 2})
    assert missing_class.status_code == 400 and "class" in missing_class.json()["error"]
    assert _post(server, "digits", params={"n": 100000, "class": "1"}).status_code == 400


def test_stylizer_answers_a_picture_of_the_uploads_size(server, models, tmp_path):
    if "stylizer" not in models:
        pytest.skip(f"MobileNetV2 weights not found at '{WEIGHTS}'")
    path = _scene(tmp_path, 36)
    answer = _post(server, "stylizer", files=[("file", (path.name, path.read_bytes(), "image/png"))])
    assert answer.status_code == 200, answer.text
    picture = _image(answer.json()["results"][0]["stylized_png"])
    expected = load(models["stylizer"], device="cpu").stylize([str(path)])[0]
    assert np.array_equal(picture, expected)


def test_a_package_folder_serves_as_it_is(models):
    repository = Repository.open([models["captioner"], models["policy"]], ModelSettings(device="cpu"))
    served = {m.name: m for m in repository}
    assert set(served) == {"captioner", "policy"}
    assert served["captioner"].package and served["captioner"].task == "captioning"
    assert not served["policy"].package and served["policy"].task == "control"
