"""Neural style transfer (issue 16): the perceptual losses, the optimisation, the stylizer's training, export,
runtime and the ``stylize`` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"
PHOTO = REPO / "tests" / "data" / "chelsea.jpg"


@pytest.fixture(scope="module", autouse=True)
def perceptual_weights():
    """MobileNetV2's ImageNet weights for the perceptual network (skipped where they are not installed)."""
    from dlpipe.training.style import WEIGHTS_ENV

    if not os.environ.get(WEIGHTS_ENV) and not WEIGHTS.is_file():
        pytest.skip(f"MobileNetV2 weights not found at '{WEIGHTS}' (set {WEIGHTS_ENV})")
    os.environ.setdefault(WEIGHTS_ENV, str(WEIGHTS))
    yield


@pytest.fixture(scope="module")
def net():
    import torch

    from dlpipe.training.style import load_perceptual

    torch.set_num_threads(1)
    return load_perceptual()


def _tensor(array):
    from dlpipe.training.style import to_tensor

    return to_tensor(array)


def test_style_loss_zero_for_identical_images_and_grows_with_another_style(net):
    from dlpipe.training.style import StyleTarget, procedural_style, style_loss

    texture = procedural_style(96, seed=0)
    target = StyleTarget.of(net, _tensor(texture))
    same = float(style_loss(net(_tensor(texture)), target))
    similar = float(style_loss(net(_tensor(procedural_style(96, seed=1))), target))  # the same kind of strokes
    photo = np.asarray(Image.open(PHOTO).convert("RGB").resize((96, 96)))
    other = float(style_loss(net(_tensor(photo)), target))
    assert same < 1e-8
    assert 0.0 < similar < other
    assert other > 0.1


def test_a_few_optimisation_steps_lower_the_total_loss(net):
    from dlpipe.training.style import OptimizeConfig, StyleTarget, measure, optimize_image, procedural_style

    content = _tensor(np.asarray(Image.open(PHOTO).convert("RGB").resize((64, 48))))
    target = StyleTarget.of(net, _tensor(procedural_style(64)))
    before = measure(net, content, content, target)
    image, after = optimize_image(net, content, target, OptimizeConfig(steps=6))
    assert image.shape == content.shape and float(image.min()) >= 0 and float(image.max()) <= 1
    assert after["total"] < 0.8 * before["total"], (before, after)
    assert after["style"] < before["style"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny stylizer trained for 3 epochs on 16 shapes scenes at 32x32 (a few seconds)."""
    from dlpipe.training.style_train import StylizerConfig, train

    out = tmp_path_factory.mktemp("stylizer")
    return train(StylizerConfig(dataset="shapes-scenes", limit=16, image_size=32, epochs=3, batch_size=4, lr=5e-3,
                                val_images=4, model_args={"width": 0.25, "blocks": 1}, out=str(out), progress=False,
                                threads=1))


def test_a_few_stylizer_training_steps_lower_the_loss(trained):
    history = trained["history"]
    assert history[-1]["train_total"] < history[0]["train_total"]
    assert history[-1]["val_total"] < history[0]["val_total"]
    assert Path(trained["best"]).is_file()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from dlpipe.export.onnx_export import export_checkpoint

    path = tmp_path_factory.mktemp("stylizer_onnx") / "stylizer.onnx"
    report = export_checkpoint(trained["best"], path)
    return path, report


@pytest.mark.slow  # the exported fixture: a dynamo export (~5 s alone, ~25 s on a busy machine)
def test_stylizer_onnx_matches_pytorch_at_two_image_sizes(trained, exported):
    import onnxruntime as ort
    import torch

    from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint

    path, report = exported
    assert len({tuple(p.shape[2:]) for p in report.parity}) == 2  # export's own check: two sizes
    model = model_from_checkpoint(load_checkpoint(trained["best"]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 64), (2, 3, 96, 80)]:
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.slow  # the exported fixture: a dynamo export (~5 s alone, ~25 s on a busy machine)
def test_runtime_stylizer_keeps_a_non_square_image_size(exported):
    from dlpipe.runtime import load
    from dlpipe.runtime.stylizer import Stylizer

    stylizer = load(exported[0], device="cpu")
    assert isinstance(stylizer, Stylizer) and stylizer.style == "procedural"
    image = np.asarray(Image.open(PHOTO).convert("RGB").resize((50, 37)))  # neither side a multiple of 4
    out = stylizer.stylize(image)[0]
    assert out.shape == (37, 50, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).mean() > 5  # it changed the picture
    assert stylizer.stylize(image, size=24)[0].shape == (18, 24, 3)


def _cli(*args):
    from dlpipe.apps.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.slow  # the exported fixture: a dynamo export (~5 s alone, ~25 s on a busy machine)
def test_stylize_command_with_a_model_and_its_bad_inputs(exported, tmp_path):
    model = exported[0]
    content = tmp_path / "cat.png"
    Image.open(PHOTO).convert("RGB").resize((45, 30)).save(content)
    out = tmp_path / "out"
    result = _cli("stylize", content, "--model", model, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)[0]
    assert Image.open(row["output"]).size == (45, 30)
    again = _cli("stylize", content, "--model", model, "--out", out)
    assert again.exit_code != 0 and "already exists" in again.output and len(again.output.strip().splitlines()) == 1
    missing = _cli("stylize", tmp_path / "nope.jpg", content, "--model", model, "--out", out, "--overwrite")
    assert missing.exit_code == 1 and "nope.jpg" in missing.output and "Traceback" not in missing.output
    assert (out / "cat_styled.png").is_file()  # the readable image is still done
    baked = _cli("stylize", content, "--model", model, "--style", PHOTO, "--out", tmp_path / "o2")
    assert baked.exit_code != 0 and "baked in" in baked.output


def test_stylize_command_optimize_and_its_bad_inputs(tmp_path):
    content, style, junk = tmp_path / "c.png", tmp_path / "s.png", tmp_path / "junk.jpg"
    Image.open(PHOTO).convert("RGB").save(content)
    from dlpipe.training.style import procedural_style

    Image.fromarray(procedural_style(64)).save(style)
    junk.write_text("not an image")
    out = tmp_path / "out"
    result = _cli("stylize", content, "--optimize", "--style", style, "--steps", "2", "--size", "32", "--out", out,
                  "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)[0]
    assert max(Image.open(row["output"]).size) == 32 and row["losses"]["style"] > 0
    for args, words in [(("--optimize",), "needs --style"), (("--optimize", "--style", junk), "junk.jpg"),
                        (("--optimize", "--style", tmp_path / "gone.png"), "does not exist"), ((), "--model")]:
        bad = _cli("stylize", content, *args, "--out", tmp_path / "o3")
        assert bad.exit_code != 0 and words in bad.output, (args, bad.output)
        assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "o3").exists()


@pytest.mark.slow
def test_fp16_and_int8_stylizers_pass_the_psnr_gate(exported, tmp_path):
    from dlpipe.export.quantize import QuantizationConfig, quantize

    reports = {p: quantize(exported[0], tmp_path / f"s.{p}.onnx", QuantizationConfig(p, calibration_size=16,
                                                                                      min_agreement=0.75),
                           check_size=16) for p in ("fp16", "int8")}
    assert reports["fp16"].agreement == 1.0 and reports["fp16"].max_abs_diff < 0.01
    assert reports["int8"].agreement >= 0.75 and reports["int8"].integer_convs > 0
    assert "PSNR" in reports["int8"].agreement_name
