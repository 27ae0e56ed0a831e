"""ONNX export: parity with PyTorch for every registered model at two batch sizes, typed errors,
self-describing metadata, users' own modules, atomic output."""

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dlpipe.export.onnx_export import ExportError, export_checkpoint, export_user_module
from dlpipe.export.validate import OutputNamesMismatch, ShapeMismatch, ToleranceExceeded, validate_parity
from dlpipe.runtime import Engine, load
from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.training import data as datasets
from dlpipe.training.checkpoint import save_checkpoint
from dlpipe.training.registry import get_spec, list_models
from dlpipe.training.train import init_weights

# Every registered model needs an export case (see test_every_registered_model_has_an_export_case);
# the dataset decides the input the model is built for and the real images it is checked on.
EXPORT_CASES = {
    "dmlp": "shapes",
    "lenet5": "mnist",
    "deep_convnet": "mnist",
    "resnet_small": "shapes",
    "fcn32s": "shapes-scenes",
    "fcn16s": "shapes-scenes",
    "fcn8s": "shapes-scenes",
    "fcn4s": "shapes-scenes",
    "fcn2s": "mnist-scenes",
    "torchvision": "shapes",  # resnet18 (training/models/transfer.py)
    "dqn-cartpole": "CartPole-v1",  # DQN Q-networks: an environment, observations recorded in it (issue 5)
    "dqn-atari": "ALE/Pong-v5",
    "dbn": "mnist",  # the RBM stack unrolled into a classifier (issue 15)
    "alexnet": "fashion-mnist",  # the classic CNNs (issue 15, training/models/classic.py)
    "vgg11": "shapes",
    "vgg16": "fashion-mnist",
    "googlenet": "shapes",
    "ae_classifier": "mnist",  # an autoencoder's encoder and a head (issue 15)
}

# Builder options that change the graph, exported too (passed as `dlpipe train --model-arg`).
EXPORT_VARIANTS = [("fcn2s", {"fusion": "conv", "decoder_width": 16, "batch_norm": True})]


# Models whose outputs are not one batched tensor have their export parity proven in their own tests.
EXPORT_TESTED_ELSEWHERE = {
    "rcnn": "tests/test_detection.py::test_detector_export_matches_pytorch_at_two_sizes",
    "captioner": "tests/test_captioner.py::test_package_graphs_match_pytorch",  # two graphs (issue 4)
    "rbm": "tests/test_rbm.py::test_feature_graph_export_parity_at_two_batch_sizes",  # features + reconstruction
    "stylizer": "tests/test_style.py::test_stylizer_onnx_matches_pytorch_at_two_image_sizes",  # sizes (issue 16)
    **{name: "tests/test_autoencoders.py::test_both_graphs_match_pytorch_at_two_batch_sizes"  # two graphs (issue 15)
       for name in ("ae", "dae", "vae")},
    **{name: "tests/test_dcgan.py::test_generator_export_matches_pytorch_at_two_batch_sizes"  # trained (issue 16)
       for name in ("dcgan", "cdcgan")},
}


def test_every_registered_model_has_an_export_case():
    missing = set(list_models()) - set(EXPORT_CASES) - set(EXPORT_TESTED_ELSEWHERE)
    assert not missing, f"registered models without an export test: {sorted(missing)}"


def make_checkpoint(path: Path, model: str, dataset: str, data_dir: str | None, model_args: dict | None = None) -> Path:
    """A checkpoint of a freshly initialised model, with real example images from ``dataset``."""
    if get_spec(model).task == "control":  # DQN: ``dataset`` is an environment id
        from dlpipe.training.dqn import untrained_checkpoint

        return untrained_checkpoint(path, model, dataset)
    info = datasets.get_dataset(dataset)
    args = {"in_channels": info.channels, "image_size": list(info.image_size), "num_classes": len(info.labels),
            **(model_args or {})}
    torch.manual_seed(0)
    module = get_spec(model).build(**args)
    init_weights(module, "he")
    images, _ = datasets.load_split(dataset, "test", data_dir, limit=24)
    examples = datasets.normalize(datasets.to_nchw(images), info)
    return save_checkpoint({"model": model, "task": info.task, "model_args": args,
                            "state_dict": module.state_dict(), "examples": examples, "metrics": {},
                            "dataset": {"name": dataset, "labels": list(info.labels),
                                        "preprocessing": info.preprocessing()}}, path)


@pytest.fixture
def mnist_root(request):
    return request.getfixturevalue("data_dir")


@pytest.mark.parametrize("model, model_args", [(m, {}) for m in sorted(EXPORT_CASES)] + EXPORT_VARIANTS,
                         ids=[*sorted(EXPORT_CASES), *(f"{m}-" + "-".join(f"{k}={v}" for k, v in a.items())
                                                       for m, a in EXPORT_VARIANTS)])
def test_export_parity_at_two_batch_sizes(model, model_args, tmp_path, request):
    dataset = EXPORT_CASES[model]
    data_dir = request.getfixturevalue("data_dir") if dataset != "shapes" else None
    ckpt = make_checkpoint(tmp_path / "m.pt", model, dataset, data_dir, model_args)
    report = export_checkpoint(ckpt, tmp_path / "m.onnx")
    # exported on a batch of 2, checked on 1 and 16 real images (at a second resolution when the
    # height and width are dynamic)
    assert sorted(p.batch for p in report.parity) == [1, 16]
    if get_spec(model).contract.dynamic_size:
        assert {p.shape[-2:] for p in report.parity} == {(64, 64), (128, 192)}
    atol = get_spec(model).contract.atol
    assert all(p.max_abs <= atol for p in report.parity)
    # the symbolic batch axis really is dynamic: a third batch size runs and matches PyTorch
    x = torch.randn(5, *torch.load(ckpt, weights_only=True)["examples"].shape[1:])
    from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint
    ref = model_from_checkpoint(load_checkpoint(ckpt))(x).detach().numpy()
    got = Engine(tmp_path / "m.onnx", device="cpu").run(x.numpy())[0]
    np.testing.assert_allclose(got, ref, atol=atol, rtol=1e-3)


def test_metadata_is_self_describing_json(shapes_onnx):
    model = onnx.load(shapes_onnx)
    props = {p.key: p.value for p in model.metadata_props}
    doc = json.loads(props["dlpipe"])
    assert doc["task"] == "classification" and doc["model"] == "deep_convnet"
    assert doc["labels"] == ["circle", "square", "triangle", "diamond", "star", "cross"]
    assert doc["preprocessing"]["size"] == [32, 32] and doc["preprocessing"]["color"] == "RGB"
    assert doc["precision"] == "fp32" and doc["dataset"] == "shapes"
    assert {"torch", "onnx", "dlpipe"} <= set(doc["versions"])
    graph_input = model.graph.input[0]
    assert graph_input.name == "image"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    onnx.checker.check_model(model)


def test_static_batch_export(mnist_checkpoint, tmp_path):
    report = export_checkpoint(mnist_checkpoint, tmp_path / "static.onnx", dynamic_batch=False)
    engine = Engine(tmp_path / "static.onnx", device="cpu")
    assert engine.inputs[0].shape == [1, 1, 28, 28]
    assert report.dynamic_axes == {}


def test_torchscript_exporter_also_works(mnist_checkpoint, tmp_path):
    report = export_checkpoint(mnist_checkpoint, tmp_path / "ts.onnx", exporter="torchscript")
    assert report.exporter == "torchscript" and len(report.parity) == 2


def _model(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", "dmlp", "shapes", None)
    export_checkpoint(ckpt, tmp_path / "m.onnx")
    from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint
    c = load_checkpoint(ckpt)
    return tmp_path / "m.onnx", model_from_checkpoint(c), c["examples"]


def test_parity_errors_are_typed(tmp_path):
    path, module, examples = _model(tmp_path)
    inputs = [(examples[:1],), (examples[1:4],)]
    with pytest.raises(OutputNamesMismatch):
        validate_parity(path, module, inputs, ["scores"], 1e-4, 1e-3)
    perturbed = type(module)(3 * 32 * 32, (512, 256, 128), 6, 0.2, False)
    perturbed.load_state_dict({k: v + 0.01 for k, v in module.state_dict().items()})
    with pytest.raises(ToleranceExceeded, match="differs from PyTorch"):
        validate_parity(path, perturbed.eval(), inputs, ["logits"], 1e-4, 1e-3)

    class Wider(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 7)

    with pytest.raises(ShapeMismatch):
        validate_parity(path, Wider(), inputs, ["logits"], 1e-4, 1e-3)


def test_users_own_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def tiny():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(4, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    import my_models

    torch.manual_seed(1)
    torch.save(my_models.tiny().state_dict(), tmp_path / "w.pt")
    report = export_user_module("my_models:tiny", tmp_path / "user.onnx", input_shape=[3, 20, 24],
                                labels=["cat", "dog"], weights=tmp_path / "w.pt")
    assert len(report.parity) == 2
    clf = load(tmp_path / "user.onnx")
    assert clf.info.labels == ("cat", "dog")
    assert clf.predict(np.zeros((50, 60, 3), np.uint8))[0].label in ("cat", "dog")
    with pytest.raises(InputError, match="cannot import module"):
        export_user_module("no_such_module:fn", tmp_path / "x.onnx", input_shape=[3, 8, 8], labels=["a"])
    with pytest.raises(ModelFileError, match="cannot load weights"):
        torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pt")
        export_user_module("my_models:tiny", tmp_path / "x.onnx", input_shape=[3, 8, 8], labels=["a", "b"],
                           weights=tmp_path / "bad.pt")
    assert not (tmp_path / "x.onnx").exists()


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    import dlpipe.export.onnx_export as ox
    from dlpipe.training.registry import OnnxContract

    contract = OnnxContract(inputs={"image": {0: "batch"}}, outputs={"logits": {0: "batch"}})
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ExportError, match="exporting Broken to .*out.onnx' failed"):
        ox.export_module(Broken(), (x,), tmp_path / "out.onnx", contract=contract, metadata={}, check_inputs=[(x,)])
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="not a readable PyTorch checkpoint"):
        export_checkpoint(bad, tmp_path / "out.onnx")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ModelFileError, match="not a dlpipe checkpoint"):
        export_checkpoint(tmp_path / "plain.pt", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_exported_files_get_ordinary_permissions(tmp_path):
    # temporary files are private to their owner; the published model must be readable like any file
    old = os.umask(0o022)
    try:
        model, _, _ = _model(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(model.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "m.pt").stat().st_mode) == 0o644
