"""The classic CNNs (issue 15): AlexNet, VGG-11/16 and GoogLeNet train, keep their defining layers, run on
64x64 RGB images, export without GoogLeNet's auxiliary heads, and pass the fp16/int8 agreement gates.
(Export parity at two batch sizes for each is in tests/test_export.py, parametrized over the registry.)"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from dlpipe.apps.cli import cli
from dlpipe.export.onnx_export import export_checkpoint
from dlpipe.export.quantize import QuantizationConfig, quantize
from dlpipe.runtime import Engine
from dlpipe.training import data as datasets
from dlpipe.training.checkpoint import checkpoint_payload, save_checkpoint
from dlpipe.training.models.classic import GoogLeNet, Inception
from dlpipe.training.registry import get_spec, list_models
from dlpipe.training.shapes import KINDS, ShapesWorld
from dlpipe.training.tasks.classification import classification_loss
from dlpipe.training.train import init_weights

CLASSIC = ["alexnet", "vgg11", "vgg16", "googlenet"]
DATASET = "fashion-mnist"
STEPS, BATCH, BATCHES = 8, 32, 2  # Adam steps cycling over BATCHES batches


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these deep little graphs run no faster on more, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str, channels: int = 1, size: int = 28, classes: int = 10, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = get_spec(name).build(in_channels=channels, image_size=[size, size], num_classes=classes, **kwargs)
    init_weights(model, get_spec(name).recipe.init)
    return model


@pytest.fixture(scope="module")
def fashion(data_dir):
    """Normalised Fashion-MNIST training images (``BATCHES`` batches) and 24 test images for the checkpoint."""
    info = datasets.get_dataset(DATASET)
    images, labels = datasets.load_split(DATASET, "train", data_dir, limit=BATCHES * BATCH)
    test, _ = datasets.load_split(DATASET, "test", data_dir, limit=24)
    return (datasets.normalize(datasets.to_nchw(images), info), torch.from_numpy(labels),
            datasets.normalize(datasets.to_nchw(test), info), info)


_TRAINED: dict[str, tuple[list[float], dict]] = {}


def _adam_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batches: int) -> list[float]:
    """``steps`` Adam steps cycling over the first ``batches`` batches of ``x``; the losses."""
    optimizer = torch.optim.Adam(model.train().parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        i = slice((step % batches) * BATCH, (step % batches + 1) * BATCH)
        loss, _ = classification_loss(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def trained(name: str, fashion) -> tuple[list[float], dict]:
    """``STEPS`` Adam steps of ``name`` on ``BATCHES`` batches of Fashion-MNIST (the task's loss, auxiliary
    heads included): the losses and a checkpoint payload. Cached: the quantization tests reuse the weights."""
    if name not in _TRAINED:
        x, y, examples, info = fashion
        model = _build(name)
        losses = _adam_steps(model, x, y, STEPS, BATCHES)
        args = {"in_channels": 1, "image_size": [28, 28], "num_classes": 10}
        payload = checkpoint_payload(model=name, task="classification", model_args=args, config={},
                                     dataset={"name": DATASET, "labels": list(info.labels),
                                              "preprocessing": info.preprocessing()}, examples=examples)
        _TRAINED[name] = (losses, {**payload, "state_dict": model.state_dict(), "metrics": {}})
    return _TRAINED[name]


def test_the_classic_models_are_registered_classifiers():
    assert set(CLASSIC) <= set(list_models("classification"))
    for name in CLASSIC:
        assert get_spec(name).recipe.benchmark == "bench/classic_cnns.py"
        # the Fashion-MNIST recipe is the one the benchmark compares the four with
        assert get_spec(name).recipe_for(DATASET) == {**get_spec("alexnet").recipe_for(DATASET), "model": name}


@pytest.mark.parametrize("name", CLASSIC)
def test_a_few_training_steps_lower_the_loss(name, fashion):
    losses, _ = trained(name, fashion)
    assert all(np.isfinite(losses)), losses
    # the last pass over the batches against the first (the same images, so the losses compare)
    assert np.mean(losses[-BATCHES:]) < 0.75 * np.mean(losses[:BATCHES]), losses


@pytest.mark.parametrize("name", CLASSIC)
def test_trains_and_classifies_64x64_rgb_images(name):
    """The shapes world rendered at 64x64 (what an image folder of a user's photos gives): a training step
    moves the weights and eval mode returns one row of logits per image."""
    images, labels = ShapesWorld(seed=3, image_size=64).classification_set(8)
    x = (datasets.to_nchw(images).float() / 255 - 0.5) / 0.25
    model = _build(name, channels=3, size=64, classes=len(KINDS)).train()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    before = first.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss, logits = classification_loss(model(x), torch.from_numpy(labels))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and logits.shape == (8, len(KINDS))
    assert not torch.equal(before, first.weight)
    with torch.no_grad():
        assert model.eval()(x).shape == (8, len(KINDS))


def test_alexnet_keeps_its_large_kernel_stem_lrn_and_dropout():
    model = _build("alexnet")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].kernel_size[0] >= 7 and [c.kernel_size[0] for c in convs[1:]] == [5, 3, 3, 3]
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in _build("alexnet", lrn=False).modules())
    # the width multiplier scales every convolution
    half = [m.out_channels for m in _build("alexnet", width=0.25).modules() if isinstance(m, nn.Conv2d)]
    assert half == [c.out_channels // 2 for c in convs]


@pytest.mark.parametrize("name", [n for n in list_models() if get_spec(n).channels_last])
def test_models_trained_channels_last_compute_what_they_compute_in_nchw(name):
    """A model the loop trains in the channels-last layout (its spec says so) gives the same outputs and
    gradients as in the default layout: the layout is a speed choice, not a different model. In float64, since
    in float32 the sums' other order, through train-mode batch norm over a few images, moves GoogLeNet's
    gradients by up to a few percent (float64: 1e-13)."""
    x, y = torch.randn(6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (6,))
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = _build(name).double().train().to(memory_format=layout)
        torch.manual_seed(1)  # the same dropout masks
        out = model(x)
        loss, _ = classification_loss(out, y)
        loss.backward()
        logits = out[0] if isinstance(out, tuple) else out
        results.append((logits.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (nchw, nchw_grads), (nhwc, nhwc_grads) = results
    assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in model.parameters())  # the second model really was in the other layout
    torch.testing.assert_close(nhwc, nchw, rtol=1e-9, atol=1e-10)
    for k, grad in nchw_grads.items():
        assert (nhwc_grads[k] - grad).norm() <= 1e-9 * grad.norm() + 1e-12, k


@pytest.mark.parametrize("size", [5, 4])
def test_alexnet_lrn_matches_pytorchs_in_value_and_gradient(size):
    """The LRN's banded-convolution window sum is PyTorch's formula, zero padding at the ends included."""
    from dlpipe.training.models.classic import LocalResponseNorm

    torch.manual_seed(0)
    x = (torch.randn(3, 7, 5, 6) * 4).requires_grad_()
    ours, theirs = LocalResponseNorm(size, alpha=0.5, beta=0.75, k=2.0), nn.LocalResponseNorm(size, 0.5, 0.75, 2.0)
    weights = torch.randn(3, 7, 5, 6)
    got, = torch.autograd.grad((ours(x) * weights).sum(), x)
    want, = torch.autograd.grad((theirs(x) * weights).sum(), x)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, convs", [("vgg11", 8), ("vgg16", 13)])
def test_vgg_is_stacks_of_3x3_convolutions(name, convs):
    model = _build(name)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(layers) == convs and all(c.kernel_size == (3, 3) for c in layers)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == convs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in _build(name, batch_norm=False).modules())
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3


def test_googlenet_has_nine_inception_modules_with_four_branches():
    model = _build("googlenet")
    modules = [m for m in model.modules() if isinstance(m, Inception)]
    assert len(modules) == 9
    x = torch.randn(2, modules[0].branch1[0].in_channels, 7, 7)
    for block in modules[:1]:
        kernels = [[c.kernel_size[0] for c in branch.modules() if isinstance(c, nn.Conv2d)]
                   for branch in (block.branch1, block.branch3, block.branch5, block.branch_pool)]
        assert kernels == [[1], [1, 3], [1, 5], [1]]  # 1x1 reductions before the 3x3 and 5x5
        assert isinstance(block.branch_pool[0], nn.MaxPool2d)
        assert block.eval()(x).shape[1] == block.out_channels  # the branches concatenated


def test_googlenet_auxiliary_heads_only_in_training(fashion):
    model = _build("googlenet")
    x = fashion[0][:4]
    outputs = model.train()(x)
    assert isinstance(outputs, tuple) and len(outputs) == 3 and all(o.shape == (4, 10) for o in outputs)
    with torch.no_grad():
        logits = model.eval()(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, 10)
    # the training loss adds 0.3 x each auxiliary loss
    y = fashion[1][:4]
    loss, main = classification_loss(outputs, y)
    expected = sum(w * nn.functional.cross_entropy(o, y) for w, o in zip((1, 0.3, 0.3), outputs))
    assert torch.allclose(loss, expected) and main is outputs[0]


def test_googlenet_onnx_has_no_auxiliary_heads(fashion, tmp_path):
    _, payload = trained("googlenet", fashion)
    ckpt = save_checkpoint(payload, tmp_path / "g.pt")
    report = export_checkpoint(ckpt, tmp_path / "g.onnx")
    assert sorted(p.batch for p in report.parity) == [1, 16]
    graph = onnx.load(str(tmp_path / "g.onnx")).graph
    assert [o.name for o in graph.output] == ["logits"]
    # one fully connected layer (the classifier); each auxiliary head would add two
    assert sum(n.op_type in ("Gemm", "MatMul") for n in graph.node) == 1
    assert sum(isinstance(m, nn.Linear) for m in _build("googlenet").modules()) == 5
    got = Engine(tmp_path / "g.onnx", device="cpu").run(fashion[2][:3].numpy())[0]
    assert got.shape == (3, 10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11", "vgg16", "googlenet"])
def test_fp16_and_int8_pass_their_gates(name, fashion, tmp_path, data_dir):
    """A few more steps on more images first. The gate is 90% top-1 agreement: these models are minutes from
    their initialisation (GoogLeNet about 55% accurate), so many decisions are near ties; the trained models'
    own gate (98%, int8 within 0.3 points of fp32) is bench/classic_cnns.py's."""
    _, payload = trained(name, fashion)
    model = get_spec(name).build(**payload["model_args"])
    model.load_state_dict(payload["state_dict"])
    images, labels = datasets.load_split(DATASET, "train", data_dir, limit=8 * BATCH)
    _adam_steps(model, datasets.normalize(datasets.to_nchw(images), fashion[3]), torch.from_numpy(labels), 16, 8)
    payload = {**payload, "state_dict": model.state_dict()}
    export_checkpoint(save_checkpoint(payload, tmp_path / "m.pt"), tmp_path / "m.onnx")
    for precision, fmt in (("fp16", "auto"), ("int8", "qdq-u8s8")):
        report = quantize(tmp_path / "m.onnx", tmp_path / f"m.{precision}.onnx",
                          QuantizationConfig(precision, format=fmt, calibration_size=64, min_agreement=0.9),
                          data_dir=data_dir, check_size=200)
        assert report.agreement >= 0.9 and report.check_images == 200
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.int8.onnx")).graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("Conv") >= 8


@pytest.mark.slow
def test_cli_trains_alexnet_on_shapes_then_exports_and_quantizes(tmp_path):
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result

    out = tmp_path / "run"
    run("train", "alexnet", "--dataset", "shapes", "--limit", 1000, "--test-limit", 100, "--epochs", 1,
        "--batch-size", 32, "--schedule", "none", "--lr", "1e-3", "--threads", 1, "--out", out,
        "--model-arg", "width=0.25", "--model-arg", "hidden=256")  # a narrower AlexNet: the test's time
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["val_acc"] > 1 / len(KINDS), summary  # better than chance after one short epoch
    stem = torch.load(out / "last.pt", weights_only=False)["state_dict"]["features.0.weight"]
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()  # trained NHWC
    run("export", out / "best.pt", "--out", tmp_path / "a.onnx")
    for precision in ("fp16", "int8"):
        result = run("quantize", tmp_path / "a.onnx", "--to", precision, "--calibration-size", 64,
                     "--format", "qdq-u8s8", "--min-agreement", 0.9, "--json")
        assert json.loads(result.stdout)["agreement"] >= 0.9
    assert Engine(tmp_path / "a.int8.onnx", device="cpu").info.precision == "int8"


def test_finetuning_googlenet_replaces_its_auxiliary_heads_too(fashion, tmp_path):
    """Fine-tuning swaps the head for the new classes; GoogLeNet's auxiliary heads predict the classes too,
    so they are swapped with it, and the fine-tuned checkpoint rebuilds (and trains with them)."""
    from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint
    from dlpipe.training.finetune import FinetuneConfig, auxiliary_heads, finetune

    _, payload = trained("googlenet", fashion)
    model = get_spec("googlenet").build(**payload["model_args"])
    assert auxiliary_heads(model, fashion[2][:2]) == ["aux1.fc2", "aux2.fc2"]
    assert auxiliary_heads(_build("vgg11"), fashion[2][:2]) == []
    source = save_checkpoint(payload, tmp_path / "g.pt")
    # an image folder of three classes of 64x64 RGB shapes (converted to the source's 28x28 grayscale input)
    images, labels = ShapesWorld(seed=5, image_size=64).classification_set(60)
    for k in range(3):
        (tmp_path / "data" / KINDS[k]).mkdir(parents=True)
        for i in np.flatnonzero(labels == k)[:5]:
            Image.fromarray(images[i]).save(tmp_path / "data" / KINDS[k] / f"{i}.png")
    result = finetune(FinetuneConfig(source=str(source), data=str(tmp_path / "data"), out=str(tmp_path / "ft"),
                                     head_epochs=1, epochs=1, progress=False, examples=4))
    tuned = model_from_checkpoint(load_checkpoint(result["best"]))
    assert tuned.fc.out_features == tuned.aux1.fc2.out_features == tuned.aux2.fc2.out_features == 3


def _shapes_folder(root, count: int = 72, classes: int = 3):
    """An ImageFolder tree of 64x64 RGB shapes, ``classes`` class folders."""
    images, labels = ShapesWorld(seed=9, image_size=64).classification_set(count)
    for i in np.flatnonzero(labels < classes):
        (root / KINDS[labels[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(root / KINDS[labels[i]] / f"{i}.png")
    return root


def test_cli_trains_on_a_64x64_image_folder(tmp_path):
    """``--dataset folder:ROOT``: a user's own images, 64x64 RGB, through train and export."""
    root = _shapes_folder(tmp_path / "images")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "vgg11", "--dataset", f"folder:{root}", "--epochs", "1", "--batch-size",
                                 "16", "--val-fraction", "0.2", "--threads", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    result = runner.invoke(cli, ["export", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "v.onnx")])
    assert result.exit_code == 0, result.output
    engine = Engine(tmp_path / "v.onnx", device="cpu")
    assert engine.info.preprocessing.size == (64, 64) and engine.info.labels == tuple(KINDS[:3])
    # a folder with one class cannot train a classifier: one line, no traceback
    (tmp_path / "one" / "circle").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "one" / "circle" / "a.png")
    result = runner.invoke(cli, ["train", "vgg11", "--dataset", f"folder:{tmp_path / 'one'}", "--out",
                                 str(tmp_path / "bad")])
    assert result.exit_code != 0 and "only one class" in result.output and "Traceback" not in result.output
