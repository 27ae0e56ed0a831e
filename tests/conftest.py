"""Shared fixtures: the MNIST data root, and small models trained once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("DLPIPE_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The MNIST / Fashion-MNIST root. Missing data fails in CI and skips elsewhere."""
    root = _data_root()
    if not (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        message = f"MNIST not found under '{root}' (set DLPIPE_DATA_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(root)


@pytest.fixture(autouse=True, scope="session")
def _point_data_dir_env():
    """Stages that read $DLPIPE_DATA_DIR see the same root as the fixture."""
    os.environ.setdefault("DLPIPE_DATA_DIR", str(_data_root()))
    yield


def _train(out: Path, **overrides):
    from dlpipe.training.train import TrainConfig, train

    return train(TrainConfig(out=str(out), progress=False, **overrides))


def _export(checkpoint: str, folder: Path, name: str) -> str:
    from dlpipe.export.onnx_export import export_checkpoint

    export_checkpoint(checkpoint, folder / name)
    return str(folder / name)


@pytest.fixture(scope="session")
def mnist_checkpoint(tmp_path_factory, data_dir) -> str:
    """LeNet-5 trained for one epoch on 6,000 real MNIST digits (a few seconds)."""
    out = tmp_path_factory.mktemp("mnist_lenet5")
    # recipe plain: a constant learning rate and no augmentation, so one short epoch learns enough
    result = _train(out, model="lenet5", dataset="mnist", recipe="plain", data_dir=data_dir, epochs=1, limit=6000,
                    test_limit=1000,
                    batch_size=64, lr=2e-3)
    assert result["test_acc"] > 0.85, result
    return result["best"]


@pytest.fixture(scope="session")
def mnist_onnx(mnist_checkpoint, tmp_path_factory) -> str:
    """The MNIST LeNet-5 exported to ONNX."""
    return _export(mnist_checkpoint, tmp_path_factory.mktemp("mnist_onnx"), "lenet5.onnx")


@pytest.fixture(scope="session")
def shapes_checkpoint(tmp_path_factory) -> str:
    """deep_convnet trained briefly on the embedded RGB shapes world (no files needed)."""
    out = tmp_path_factory.mktemp("shapes_dc")
    return _train(out, model="deep_convnet", dataset="shapes", epochs=1, limit=1500, test_limit=200)["best"]


@pytest.fixture(scope="session")
def shapes_onnx(shapes_checkpoint, tmp_path_factory) -> str:
    """The shapes deep_convnet exported to ONNX (3-channel 32x32 input)."""
    return _export(shapes_checkpoint, tmp_path_factory.mktemp("shapes_onnx"), "shapes.onnx")


@pytest.fixture(scope="session")
def fcn_onnx(tmp_path_factory) -> str:
    """FCN-8s trained for one epoch on 400 shapes scenes, exported to ONNX (dynamic height and width)."""
    out = tmp_path_factory.mktemp("fcn8s")
    result = _train(out, model="fcn8s", dataset="shapes-scenes", epochs=1, limit=400, test_limit=50)
    return _export(result["best"], out, "fcn8s.onnx")
