"""Transfer learning (issue 6): head replacement for every registered classifier and a torchvision
architecture (weights from a state dict saved here, never downloaded), real freezing, separate learning
rates, ImageFolder data made in the test, clear errors for bad folders, and the whole
finetune -> export -> classify chain through the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dlpipe.apps.cli import cli
from dlpipe.runtime.errors import DataNotFoundError, InputError, ModelFileError
from dlpipe.training.pretrained import cached_weights_file
from dlpipe.training import finetune as ft
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint
from dlpipe.training.registry import get_spec, list_models
from dlpipe.training.shapes import KINDS, ShapesWorld

CLASSES = KINDS[:3]  # circle, square, triangle


def _write_folder(root, per_class: int, seed: int = 7) -> None:
    """``per_class`` PNGs of each of three shape kinds: 40x40 RGB and grayscale, so the backbone's input
    (3 channels, 32x32) has to be adapted."""
    images, labels = ShapesWorld(seed=seed, image_size=40).classification_set(40 * per_class)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(labels == k)[:per_class]):
            img = Image.fromarray(images[idx])
            (img.convert("L") if i % 3 == 0 else img).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("my_images") / "shapes"
    _write_folder(root, per_class=10)
    return root


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty local torch cache; any attempt to download fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(*args, **kwargs):
        raise AssertionError("fine-tuning tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch_home"


def _cache_resnet18() -> dict[str, torch.Tensor]:
    """Random resnet18 weights saved where torch.hub keeps the published ones."""
    import torchvision

    weights = torchvision.models.ResNet18_Weights.DEFAULT
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = cached_weights_file(weights.url)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("model", list_models(task="classification"))
def test_head_replacement_keeps_the_backbone_and_rebuilds_through_the_registry(model):
    spec = get_spec(model)
    args = {"in_channels": 3, "image_size": [32, 32], "num_classes": 6}
    torch.manual_seed(0)
    net = spec.build(**args).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    auxiliary = ft.auxiliary_heads(net, x)  # GoogLeNet's auxiliary classifiers predict the classes too
    head = ft.replace_head(net, 4, auxiliary)
    assert net(x).shape == (2, 4)
    after = net.state_dict()
    changed = {k for k in after if k.startswith(tuple(h + "." for h in (head, *auxiliary)))}
    assert changed and all(torch.equal(after[k], before[k]) for k in after if k not in changed)
    # the checkpoint rebuilds: the registry's builder with the new class count takes the state dict
    rebuilt = spec.build(**{**args, "num_classes": 4}).eval()
    rebuilt.load_state_dict(after)
    torch.testing.assert_close(rebuilt(x), net(x))


def test_torchvision_weights_come_from_the_local_cache_only(torch_home):
    with pytest.raises(DataNotFoundError, match="not in the local torch cache"):
        ft.load_source("torchvision:resnet18:DEFAULT", image_size=32)
    state = _cache_resnet18()
    source = ft.load_source("torchvision:resnet18:DEFAULT", image_size=32)
    assert source.model == "torchvision" and source.model_args["arch"] == "resnet18"
    torch.testing.assert_close(source.module.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert source.preprocessing["size"] == [32, 32] and source.preprocessing["color"] == "RGB"
    assert ft.replace_head(source.module, 3) == "fc"
    with pytest.raises(InputError, match="no weights 'NOPE'"):
        ft.load_source("torchvision:resnet18:NOPE")
    with pytest.raises(InputError, match="unknown torchvision"):
        ft.load_source("torchvision:resnet_huge")


def test_freezing_really_freezes():
    torch.manual_seed(0)
    net = get_spec("resnet_small").build(in_channels=3, image_size=[32, 32], num_classes=6)
    head = ft.replace_head(net, 3)
    layers = ft.backbone_layers(net, head)
    assert len(layers) > 4 and all(isinstance(layer[0], torch.nn.Conv2d) for layer in layers)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    loader = [(x, y)]

    def step(how):
        frozen = ft.freeze(net, head, how)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        groups = ft._param_groups(net, head, 1e-2, 1e-3)
        ft.train_epoch(net, loader, torch.optim.SGD(groups, lr=1e-2), None, frozen)
        return before, groups

    # backbone: every backbone weight and batch-norm statistic is unchanged, the head moved
    before, groups = step("backbone")
    assert [g["name"] for g in groups] == ["head"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]) != k.startswith(head + "."), k
    # N: the first two layers (conv + its batch norm) stay, the third trains; separate learning rates
    before, groups = step("2")
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 1e-2), ("backbone", 1e-3)]
    assert torch.equal(net.stem[0].weight, before["stem.0.weight"])
    assert torch.equal(net.stem[1].running_mean, before["stem.1.running_mean"])
    assert torch.equal(net.stages[0].conv1.weight, before["stages.0.conv1.weight"])
    assert not torch.equal(net.stages[0].conv2.weight, before["stages.0.conv2.weight"])
    with pytest.raises(InputError, match="has only"):
        ft.freeze(net, head, 999)
    with pytest.raises(InputError, match="--freeze"):
        ft.parse_freeze("half")


def test_image_folder_is_adapted_to_the_backbone_and_split_per_class(folder):
    pre = {"color": "L", "size": [28, 28], "mean": [0.5], "std": [0.25]}
    data = ft.load_data(str(folder), pre, per_class=5, val_fraction=0.2, seed=3)
    assert data.labels == list(CLASSES)
    assert data.train[0].shape == (12, 1, 28, 28) and data.train[0].dtype == torch.uint8
    assert data.val[1].tolist() == [0, 1, 2] and data.test is None
    assert torch.bincount(data.train[1]).tolist() == [4, 4, 4]


def _empty_classes(root):
    (root / "cats").mkdir()
    (root / "dogs").mkdir()


def _one_class(root):
    _write_folder(root, 3)
    for name in CLASSES[1:]:
        shutil.rmtree(root / name)


def _broken_image(root):
    _write_folder(root, 3)
    (root / "square" / "broken.png").write_bytes(b"not a png")


@pytest.mark.parametrize("make, error, message", [
    (lambda root: None, DataNotFoundError, "no class sub-folders"),
    (_empty_classes, InputError, "'.*cats' holds no images"),
    (_one_class, InputError, "only one class"),
    (_broken_image, InputError, "broken.png' is not an image"),
])
def test_bad_folders_give_clear_errors(tmp_path, make, error, message):
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    with pytest.raises(error, match=message):
        ft.load_data(str(root), {"color": "RGB", "size": [32, 32]})


def test_bad_data_through_the_cli_is_one_line(tmp_path, shapes_checkpoint):
    (tmp_path / "empty").mkdir()
    for data in (str(tmp_path / "empty"), str(tmp_path / "missing"), "no-such-dataset"):
        result = CliRunner().invoke(cli, ["finetune", "--from", shapes_checkpoint, "--data", data,
                                          "--out", str(tmp_path / "out"), "--no-progress"])
        assert result.exit_code != 0
        assert result.output.startswith("dlpipe: error: ") and result.output.count("\n") == 1, result.output
        assert not (tmp_path / "out" / "best.pt").exists()


def test_finetune_export_classify_chain(tmp_path, folder, shapes_checkpoint):
    runner = CliRunner()
    out = tmp_path / "ft"
    result = runner.invoke(cli, ["finetune", "--from", shapes_checkpoint, "--data", str(folder), "--out", str(out),
                                 "--head-epochs", "2", "--epochs", "4", "--freeze", "2", "--head-lr", "3e-3",
                                 "--lr", "1e-3", "--batch-size", "8", "--threads", "1", "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["labels"] == list(CLASSES) and summary["frozen_layers"] == 2
    assert summary["images"] == {"train": 24, "val": 6, "test": None}
    finetune_rows = [r for r in summary["history"] if r["stage"] == "finetune"]
    assert finetune_rows[-1]["train_loss"] < summary["history"][0]["train_loss"]
    assert set(summary["per_class_accuracy"]) == set(CLASSES) and 0 <= summary["head_only"]["val_acc"] <= 1

    # the same checkpoint format as 'dlpipe train' (every key it writes), with the new classes
    ckpt = load_checkpoint(out / "best.pt")
    assert set(load_checkpoint(shapes_checkpoint)) <= set(ckpt)
    assert ckpt["dataset"]["labels"] == list(CLASSES) and ckpt["model_args"]["num_classes"] == 3
    assert model_from_checkpoint(ckpt)(ckpt["examples"]).shape == (len(ckpt["examples"]), 3)

    onnx_path = tmp_path / "ft.onnx"
    result = runner.invoke(cli, ["export", str(out / "best.pt"), "--out", str(onnx_path), "--json"])
    assert result.exit_code == 0, result.output
    assert all(p["max_abs"] <= p["atol"] for p in json.loads(result.stdout)["parity"])
    image = next((folder / "square").glob("*.png"))
    result = runner.invoke(cli, ["classify", str(onnx_path), str(image), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    top = json.loads(result.stdout)[0]
    assert top["label"] in CLASSES and len(top["top_k"]) == 3
    # the runtime and PyTorch agree on the label for every image of the folder
    from dlpipe.runtime import load

    files = sorted(folder.rglob("*.png"))
    runtime = np.array([r.index for r in load(onnx_path, device="cpu").predict(files)])
    x = ft.to_input(files, "RGB", (32, 32)).float() / 255
    x = (x - torch.tensor(ckpt["dataset"]["preprocessing"]["mean"]).view(1, -1, 1, 1)) / \
        torch.tensor(ckpt["dataset"]["preprocessing"]["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        assert (model_from_checkpoint(ckpt)(x).argmax(1).numpy() == runtime).all()

    # evaluate and quantize default to the model's own image folder (its dataset in the metadata)
    result = runner.invoke(cli, ["evaluate", str(onnx_path), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)[0]
    truth = np.array([CLASSES.index(f.parent.name) for f in files])
    assert report["images"] == len(files) and report["accuracy"] == pytest.approx((runtime == truth).mean())
    result = runner.invoke(cli, ["quantize", str(onnx_path), "--to", "int8", "--min-agreement", "0.9", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["agreement"] >= 0.9


def _two_class_folder(root, per_class: int = 8) -> None:
    """``per_class`` 32x32 colour PNGs of circles and of squares."""
    images, labels = ShapesWorld(seed=7, image_size=32).classification_set(20 * per_class)
    for k, name in enumerate(CLASSES[:2]):
        (root / name).mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(labels == k)[:per_class]):
            Image.fromarray(images[idx]).save(root / name / f"{i}.png")


def test_summary_reports_the_saved_model_when_fine_tuning_hurts(tmp_path, shapes_checkpoint):
    """Issue 12 item 5: a fine-tuning stage that only makes things worse (backbone learning rate 50) must not
    be reported as the result. best.pt comes from the head-only stage; the summary says so, and its headline
    figure is best.pt loaded back and scored, not a figure from the history."""
    folder = tmp_path / "two"
    _two_class_folder(folder)
    args = ["finetune", "--from", shapes_checkpoint, "--data", str(folder), "--head-epochs", "4", "--epochs", "3",
            "--head-lr", "0.1", "--lr", "50", "--val-fraction", "0.25", "--batch-size", "8", "--threads", "1",
            "--no-progress"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "json"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    head, tuned = summary["stages"]["head"], summary["stages"]["finetune"]
    assert (head["epochs"], head["epochs_run"], tuned["epochs"], tuned["epochs_run"]) == (4, 4, 3, 3)
    assert tuned["best_val_loss"] > 1e3 * head["best_val_loss"]  # the second stage really was ruined
    assert summary["best_stage"] == "head" and summary["best_epoch"] == head["best_epoch"] <= 4
    head_rows = [r for r in summary["history"] if r["stage"] == "head"]
    assert head["best_val_acc"] == max(r["val_acc"] for r in head_rows) == summary["head_only"]["val_acc"]
    assert summary["head_only"]["epoch"] == head["best_epoch"]

    # score best.pt independently: a fresh model from the file on the same validation images
    ckpt = load_checkpoint(summary["best"])
    assert ckpt["stage"] == "head" and ckpt["epoch"] == head["best_epoch"]
    pre = ckpt["dataset"]["preprocessing"]
    val_x, val_y = ft.load_data(str(folder), pre, val_fraction=0.25, seed=0).val
    assert len(val_y) == summary["images"]["val"] == 4
    x = (val_x.float() / 255 - torch.tensor(pre["mean"]).view(1, -1, 1, 1)) / torch.tensor(pre["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        saved_acc = float((model_from_checkpoint(ckpt)(x).argmax(1) == val_y).float().mean())
    assert summary["after"]["val_acc"] == pytest.approx(saved_acc) == pytest.approx(head["best_val_acc"])

    # the printed text names the head-only stage and shows the saved model's figure
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "text")])
    assert result.exit_code == 0, result.output
    assert f"best.pt: from the head-only stage (epoch {head['best_epoch']}), val {100 * saved_acc:.1f}%" \
        in result.output
    assert "the fine-tuning stage never beat the head-only stage" in result.output
    assert "fine-tuned" not in result.output


def test_stage_results_pick_each_stage_best_as_best_pt_does():
    history = [{"epoch": 1, "stage": "head", "val_acc": 0.5, "val_loss": 0.7},
               {"epoch": 2, "stage": "head", "val_acc": 1.0, "val_loss": 0.6},
               {"epoch": 3, "stage": "head", "val_acc": 0.5, "val_loss": 0.6},
               {"epoch": 4, "stage": "finetune", "val_acc": 0.5, "val_loss": 0.9},
               {"epoch": 5, "stage": "finetune", "val_acc": 0.5, "val_loss": 0.4},
               {"epoch": 6, "stage": "finetune", "val_acc": 0.5, "val_loss": 0.4}]
    stages = ft.stage_results(history, [("head", 3), ("finetune", 5)])
    assert stages["head"] == {"epochs": 3, "epochs_run": 3, "best_epoch": 2, "best_val_acc": 1.0, "best_val_loss": 0.6}
    # equal accuracy: the lower loss, then the earlier epoch (as fit() keeps best.pt)
    assert (stages["finetune"]["best_epoch"], stages["finetune"]["epochs_run"]) == (5, 3)
    skipped = ft.stage_results(history[3:], [("head", 0), ("finetune", 3)])["head"]
    assert skipped == {"epochs": 0, "epochs_run": 0, "best_epoch": None, "best_val_acc": None, "best_val_loss": None}


@pytest.mark.slow
def test_torchvision_finetune_exports_and_classifies(tmp_path, folder, torch_home):
    _cache_resnet18()
    runner = CliRunner()
    out = tmp_path / "tv"
    result = runner.invoke(cli, ["finetune", "--from", "torchvision:resnet18:DEFAULT", "--data", str(folder),
                                 "--out", str(out), "--image-size", "32", "--head-epochs", "1", "--epochs", "1",
                                 "--freeze", "backbone", "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "head-only" in result.output and "best.pt: from the " in result.output and "dlpipe export" in result.output
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["model"] == "torchvision" and ckpt["model_args"]["arch"] == "resnet18"
    # the frozen backbone is exactly the cached weights
    cached = torch.load(next(torch_home.rglob("*.pth")), weights_only=True)
    assert torch.equal(ckpt["state_dict"]["layer4.1.conv2.weight"], cached["layer4.1.conv2.weight"])
    assert ckpt["dataset"]["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    result = runner.invoke(cli, ["export", str(out / "best.pt"), "--out", str(tmp_path / "tv.onnx")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["classify", str(tmp_path / "tv.onnx"), str(next(folder.rglob("*.png"))), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["label"] in CLASSES


def test_registered_dataset_few_shot_with_test_accuracy(tmp_path, data_dir, shapes_checkpoint):
    """Fashion-MNIST (grayscale 28x28) into the RGB 32x32 shapes backbone: 5 images per class."""
    result = ft.finetune(ft.FinetuneConfig(source=shapes_checkpoint, data="fashion-mnist", per_class=5, data_dir=data_dir,
                                       out=str(tmp_path / "fm"), head_epochs=1, epochs=1, test_limit=200,
                                       threads=1, progress=False))
    assert result["images"] == {"train": 40, "val": 10, "test": 200}
    assert result["per_class_split"] == "test" and len(result["per_class_accuracy"]) == 10
    assert {"val_acc", "test_acc"} <= set(result["head_only"]) and "test_acc" in result["after"]
    ckpt = load_checkpoint(result["best"])
    assert ckpt["dataset"]["name"] == "fashion-mnist" and ckpt["metrics"]["test_acc"] == result["after"]["test_acc"]


def test_finetune_runs_on_the_shared_loop_with_resume_and_early_stopping(tmp_path, folder, shapes_checkpoint,
                                                                        monkeypatch):
    """Fine-tuning uses the one fit(): best.pt/last.pt/metrics.jsonl per epoch, --resume continues the stage
    where last.pt stopped, and --patience ends a stage that stopped improving."""
    base = dict(source=shapes_checkpoint, data=str(folder), head_epochs=1, batch_size=16, threads=1,
                progress=False, lr=1e-3, head_lr=1e-3)
    first = ft.finetune(ft.FinetuneConfig(out=str(tmp_path / "a"), epochs=1, **base))
    last = load_checkpoint(first["last"])
    assert last["epoch"] == 2 and last["stage"] == "finetune" and "optimizer" in last
    resumed = ft.finetune(ft.FinetuneConfig(out=str(tmp_path / "a"), epochs=3, resume=first["last"], **base))
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]
    assert [r["stage"] for r in resumed["history"]] == ["head", "finetune", "finetune", "finetune"]
    assert [(s["epochs"], s["epochs_run"]) for s in resumed["stages"].values()] == [(1, 1), (3, 3)]
    assert resumed["best_stage"] == resumed["history"][resumed["best_epoch"] - 1]["stage"]
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["epoch"] == 4  # appended, not restarted
    with pytest.raises(ModelFileError, match="cannot resume"):  # best.pt holds no training state
        ft.finetune(ft.FinetuneConfig(out=str(tmp_path / "b"), epochs=1, resume=first["best"], **base))
    # validation that never improves after the first epoch: each stage stops after `patience` epochs
    monkeypatch.setattr(ft, "score", lambda *args, **kwargs: {"loss": 1.0, "acc": 0.5, "per_class": {}})
    stopped = ft.finetune(ft.FinetuneConfig(out=str(tmp_path / "c"), patience=1, **{**base, "head_epochs": 5,
                                                                                     "epochs": 5}))
    assert [(r["epoch"], r["stage"]) for r in stopped["history"]] == [(1, "head"), (2, "head"), (6, "finetune")]
