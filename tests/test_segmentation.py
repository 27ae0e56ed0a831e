"""FCN segmentation: the model, training on shapes scenes, the runtime Segmenter, quantization and the app."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dlpipe.apps.cli import cli
from dlpipe.export.quantize import QuantizationConfig, quantize
from dlpipe.runtime import Segmenter, load
from dlpipe.runtime.errors import InputError
from dlpipe.training import data as datasets
from dlpipe.training.models.fcn import _upsample
from dlpipe.training.registry import get_spec, list_models
from dlpipe.training.train import TrainConfig, build_optimizer, init_weights, train, train_one_epoch


@pytest.mark.parametrize("name", list_models("segmentation"))
@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("fusion", ["sum", "conv"])
def test_fcn_is_fully_convolutional(name, size, batch_norm, fusion):
    model = get_spec(name).build(in_channels=3, num_classes=7, batch_norm=batch_norm, fusion=fusion).eval()
    assert model(torch.randn(2, 3, *size)).shape == (2, 7, *size)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == batch_norm


def test_transposed_convolution_starts_as_bilinear_interpolation():
    up = _upsample(3, 4)
    x = torch.randn(1, 3, 6, 6)
    expected = torch.nn.functional.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    # identical away from the border (the transposed conv pads with zeros where interpolate clamps)
    torch.testing.assert_close(up(x)[..., 4:-4, 4:-4], expected[..., 4:-4, 4:-4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,skips", [("fcn8s", ("score_pool4", "score_pool3")),
                                        ("fcn2s", ("score_pool4", "score_pool3", "score_pool2", "score_pool1"))])
def test_fcn_skips_start_silent_and_learn(name, skips):
    torch.manual_seed(0)
    model = get_spec(name).build(in_channels=3, num_classes=7)
    assert sorted(n for n, _ in model.named_children() if n.startswith("score_pool")) == sorted(skips)
    assert all(getattr(model, s).weight.abs().sum() == 0 for s in skips)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.randint(0, 7, (2, 64, 64)))
    loss.backward()
    assert all(getattr(model, s).weight.grad.abs().sum() > 0 for s in skips)


def test_conv_fusion_joins_every_skip_through_a_convolution():
    torch.manual_seed(0)
    model = get_spec("fcn2s").build(in_channels=3, num_classes=7, fusion="conv", decoder_width=8)
    assert len(model.fuse) == 4 and [f[0].in_channels for f in model.fuse] == [8 + 96, 8 + 64, 8 + 32, 8 + 16]
    assert not any(n.startswith("score_pool") for n, _ in model.named_children())
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.randint(0, 7, (2, 64, 64)))
    loss.backward()
    assert all(f[0].weight.grad.abs().sum() > 0 for f in model.fuse)
    with pytest.raises(ValueError, match="fusion must be one of sum, conv"):
        get_spec("fcn8s").build(in_channels=3, num_classes=7, fusion="concat")


def test_scenes_masks_match_the_images():
    images, masks = datasets.load_split("shapes-scenes", "train", limit=20)
    assert images.shape == (20, 64, 64, 3) and masks.shape == (20, 64, 64) and masks.dtype == np.uint8
    assert masks.max() <= 6 and (masks > 0).mean() > 0.05
    again, _ = datasets.load_split("shapes-scenes", "train", limit=20)
    assert np.array_equal(images, again)


def test_a_few_steps_lower_the_segmentation_loss():
    info = datasets.get_dataset("shapes-scenes")
    images, masks = datasets.load_split("shapes-scenes", "train", limit=256)
    ds = datasets.ImageTensorDataset(datasets.to_nchw(images), torch.from_numpy(masks), info)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, collate_fn=datasets.batch_collate,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = get_spec("fcn8s").build(in_channels=3, num_classes=7)
    init_weights(model, "he")
    opt = build_optimizer("adam", model.parameters(), 2e-3, 0.9, 0.0)
    first = train_one_epoch(model, loader, opt)["train_loss"]
    for _ in range(2):
        last = train_one_epoch(model, loader, opt)["train_loss"]
    assert last < 0.7 * first, (first, last)


def test_model_and_dataset_tasks_must_match():
    with pytest.raises(InputError, match="is a classification model but dataset 'shapes-scenes'"):
        train(TrainConfig(model="lenet5", dataset="shapes-scenes"))


@pytest.mark.parametrize("augment", ["flip", "affine"])
def test_augmentation_moves_the_mask_with_its_image(augment):
    info = datasets.get_dataset("shapes-scenes")
    images, masks = datasets.load_split("shapes-scenes", "train", limit=16)
    ds = datasets.ImageTensorDataset(datasets.to_nchw(images), torch.from_numpy(masks), info,
                                     datasets.augmentation(augment, info.image_size), masks=True)
    torch.manual_seed(1)
    x, y = ds.__getitems__(list(range(16)))
    assert x.shape == (16, 3, 64, 64) and y.shape == (16, 64, 64) and y.dtype == torch.int64
    assert not torch.equal(y, torch.from_numpy(masks).long())  # something moved
    assert set(y.unique().tolist()) <= set(range(len(info.labels)))  # nearest-neighbour: still class ids
    plain = datasets.ImageTensorDataset(datasets.to_nchw(images), torch.from_numpy(masks), info)
    agree = []
    for i in range(16):
        ref_x, ref_y = plain[i]
        for cand_x, cand_y in ((ref_x, ref_y), (ref_x.flip(-1), ref_y.flip(-1))):
            if torch.equal(x[i], cand_x):
                agree.append(torch.equal(y[i], cand_y))
    if augment == "flip":
        assert len(agree) == 16 and all(agree)  # every image is either itself or mirrored, with its mask


def test_segmenter_keeps_each_images_size(fcn_onnx, tmp_path):
    seg = load(fcn_onnx)
    assert isinstance(seg, Segmenter) and seg.info.preprocessing.size_multiple == 32
    path = tmp_path / "a.jpg"
    Image.new("RGB", (101, 37), (10, 200, 30)).save(path)
    gray = np.full((50, 70), 128, np.uint8)
    results = seg.predict([path, gray, np.zeros((64, 64, 3), np.uint8)])
    assert [r.mask.shape for r in results] == [(37, 101), (50, 70), (64, 64)]
    for r in results:
        assert abs(sum(r.shares.values()) - 1) < 1e-9 and set(r.shares) >= {"background", "circle"}
    overlay = results[0].overlay(path)
    assert overlay.shape == (37, 101, 3) and overlay.dtype == np.uint8
    with pytest.raises(InputError, match="differs from the mask"):
        results[0].overlay(gray)


def test_segmenter_matches_the_batched_path(fcn_onnx):
    images, _ = datasets.load_split("shapes-scenes", "test", limit=6)
    seg = load(fcn_onnx)
    batched = seg.masks(images, batch_size=4)
    one_by_one = np.stack([r.mask for r in seg.predict(list(images))])
    assert np.array_equal(batched, one_by_one)


def test_quantized_segmenters_agree_per_pixel(fcn_onnx, tmp_path):
    images, _ = datasets.load_split("shapes-scenes", "test", limit=32)
    fp32 = load(fcn_onnx).masks(images)
    for cfg in (QuantizationConfig("fp16"), QuantizationConfig("int8", calibration_size=64)):
        report = quantize(fcn_onnx, tmp_path / f"{cfg.precision}.onnx", cfg, check_size=64)
        got = load(report.path).masks(images)
        assert (got == fp32).mean() > 0.98, cfg.precision


def test_segment_and_evaluate_commands(fcn_onnx, tmp_path):
    images, _ = datasets.load_split("shapes-scenes", "test", limit=2)
    files = []
    for i, img in enumerate(images):
        f = tmp_path / f"scene{i}.png"
        Image.fromarray(img).resize((96, 80)).save(f)
        files.append(f)
    runner = CliRunner()
    result = runner.invoke(cli, ["segment", fcn_onnx, *map(str, files), "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    for row in rows:
        mask = np.asarray(Image.open(row["mask"]))
        assert mask.shape == (80, 96) and mask.max() <= 6
        assert Image.open(row["overlay"]).size == (96, 80)
    ev = json.loads(runner.invoke(cli, ["evaluate", fcn_onnx, "--limit", "20", "--json"]).stdout)[0]
    assert 0 <= ev["miou"] <= 1 and ev["images"] == 20 and "background" in ev["per_class_iou"]
    bad = runner.invoke(cli, ["segment", fcn_onnx, str(tmp_path / "missing.png"), "--out", str(tmp_path / "o2")])
    assert bad.exit_code != 0 and "missing.png' does not exist" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "o2").exists()


def test_digit_scenes_from_real_mnist(data_dir):
    images, masks = datasets.load_split("mnist-scenes", "test", data_dir, limit=30)
    assert images.shape == masks.shape == (30, 64, 64)
    assert masks.max() <= 10 and (masks > 0).any(axis=(1, 2)).all()  # every scene has a digit
    assert images[masks > 0].min() > 96  # mask pixels are strokes
    assert (images[masks == 0] > 96).mean() < 0.01
    again, _ = datasets.load_split("mnist-scenes", "test", data_dir, limit=30)
    assert np.array_equal(images, again)
    assert datasets.get_dataset("mnist-scenes").labels[1] == "0"


def test_quantizing_leaves_no_stray_files_in_the_working_directory(fcn_onnx, tmp_path, monkeypatch):
    # onnxruntime's symbolic shape inference gives up on FCN's dynamic spatial axes and used to leave
    # its temporary model and external data in the current directory.
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    import shutil
    shutil.copy(fcn_onnx, "fcn.onnx")
    quantize("fcn.onnx", "fcn.int8.onnx", QuantizationConfig("int8", calibration_size=16, min_agreement=0.5),
             check_size=16)
    assert sorted(p.name for p in work.iterdir()) == ["fcn.int8.onnx", "fcn.onnx"]
