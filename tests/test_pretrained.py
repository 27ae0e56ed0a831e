"""torchvision classifiers by name: export with the weights' categories and preprocessing (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dlpipe.apps.cli import cli
from dlpipe.runtime import InputError, ModelFileError, load, read_metadata
from dlpipe.runtime.images import open_image, preprocess
from dlpipe.runtime.metadata import Preprocessing

PHOTO = Path(__file__).parent / "data" / "chelsea.jpg"


def crop_preprocessing(transforms) -> Preprocessing:
    return Preprocessing(color="RGB", size=(int(transforms.crop_size[0]),) * 2, resize="bilinear",
                         mean=tuple(transforms.mean), std=tuple(transforms.std), policy="center-crop",
                         resize_size=int(transforms.resize_size[0]))


@pytest.mark.parametrize("size", [None, (333, 512), (150, 100), (224, 224)])
def test_the_crop_policy_gives_torchvision_s_tensor_on_a_real_photo(size):
    import torchvision

    transforms = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    photo = open_image(PHOTO)
    if size:
        photo = photo.resize(size[::-1], Image.Resampling.BICUBIC)
    ours = preprocess([photo], crop_preprocessing(transforms))[0]
    theirs = transforms(photo).numpy()
    std = np.asarray(transforms.std).reshape(3, 1, 1)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert np.abs((ours - theirs) * std).max() <= 1 / 255  # the same pixels, within one grey level


def test_letterbox_keeps_the_aspect_ratio():
    pre = Preprocessing(color="L", size=(32, 32), resize="nearest", mean=(0.0,), std=(1.0,), policy="letterbox")
    wide = np.full((10, 40), 200, dtype=np.uint8)
    out = preprocess([wide], pre)[0, 0] * 255
    rows = np.flatnonzero(out.max(1) > 0)
    assert (rows.min(), rows.max()) == (12, 19) and np.allclose(out[12:20], 200)  # 8 rows of image, black bars


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> Path:
    """Random mobilenet_v3_small weights saved as a state dict (no download)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "mnv3s.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    return path


def test_export_a_torchvision_name_keeps_categories_and_crop_policy(tmp_path, small_weights):
    import torchvision

    out = tmp_path / "mnv3s.onnx"
    result = CliRunner().invoke(cli, ["export", "torchvision:mobilenet_v3_small", "--weights", str(small_weights),
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parity"]
    meta = read_metadata(out).raw
    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    assert meta["labels"] == list(weights.meta["categories"]) and len(meta["labels"]) == 1000
    pre = meta["preprocessing"]
    assert (pre["policy"], pre["resize_size"], pre["size"], pre["resize"]) == ("center-crop", 256, [224, 224], "bilinear")
    # the runtime on a real photo gives the logits torchvision's own pipeline gives
    module = torchvision.models.mobilenet_v3_small(weights=None)
    module.load_state_dict(torch.load(small_weights, weights_only=True))
    with torch.no_grad():
        expected = module.eval()(weights.transforms()(open_image(PHOTO))[None]).numpy()
    classifier = load(out)
    assert np.abs(classifier.logits([PHOTO]) - expected).max() < 1e-3
    assert classifier.predict(PHOTO, top_k=5)[0].top_k[0][0] == weights.meta["categories"][int(expected.argmax())]


def test_torchvision_export_errors_are_one_line(tmp_path, small_weights):
    from dlpipe.export.onnx_export import export_torchvision

    with pytest.raises(InputError, match="unknown torchvision classification architecture 'mobilenet_v9'"):
        export_torchvision("torchvision:mobilenet_v9", tmp_path / "x.onnx")
    wrong = tmp_path / "resnet.pth"
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), wrong)
    with pytest.raises(ModelFileError, match="cannot load .*resnet.pth.* into torchvision resnet18"):
        export_torchvision("torchvision:resnet18", tmp_path / "x.onnx", weights=wrong)
    with pytest.raises(InputError, match="give the weights once"):
        export_torchvision("torchvision:mobilenet_v3_small:DEFAULT", tmp_path / "x.onnx", weights=small_weights)
    assert not list(tmp_path.glob("x*"))
