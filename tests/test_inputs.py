"""Hostile and unusual image files, batches with bad files in them, output names and exit codes (issue 12)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dlpipe.apps.cli import cli
from dlpipe.apps.images import unique_stems
from dlpipe.runtime import Failure, InputError, UsageError, load
from dlpipe.runtime.images import open_image, preprocess, set_max_pixels
from dlpipe.training.data import load_split


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(result, *fragments, code=1):
    """The command failed with ``code`` and said so in exactly one ``dlpipe: error:`` line with ``fragments``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dlpipe: error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header declares a ``width`` x ``height`` greyscale image (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
                     + chunk(b"IEND", b""))
    return path


def scene(index: int = 0) -> np.ndarray:
    """A 64x64 RGB test scene of shapes (what the test FCN was trained on)."""
    return load_split("shapes-scenes", "test", limit=index + 1)[0][index]


@pytest.fixture()
def good_png(tmp_path) -> Path:
    path = tmp_path / "good.png"
    Image.fromarray(scene(0)).save(path)
    return path


# --- 1. decompression bombs --------------------------------------------------------------------------

def test_a_decompression_bomb_is_an_input_error_naming_the_file(tmp_path):
    bomb = png_declaring(tmp_path / "bomb.png", 20_000, 20_000)
    assert bomb.stat().st_size < 200
    with pytest.raises(InputError, match="bomb.png.*decompression bomb"):
        open_image(bomb)
    medium = png_declaring(tmp_path / "medium.png", 10_000, 10_000)  # between Pillow's limit and twice it
    with pytest.raises(InputError, match="10000x10000"):
        open_image(medium)
    small = tmp_path / "small.png"
    Image.new("L", (40, 30)).save(small)
    with pytest.raises(InputError, match="40x30 = 1,200 pixels, more than the limit of 1,000"):
        open_image(small, max_pixels=1000)
    assert open_image(small, max_pixels=1200).size == (40, 30)
    for bad in (0, -1, None, 1.5, True):
        with pytest.raises(UsageError):
            set_max_pixels(bad)  # the check can be moved, never switched off


def test_classify_and_segment_refuse_a_bomb_in_one_line_and_write_nothing(tmp_path, shapes_onnx, fcn_onnx, good_png):
    bomb = png_declaring(tmp_path / "bomb.png", 20_000, 20_000)
    one_error_line(run("classify", shapes_onnx, bomb), "bomb.png", "decompression bomb")
    out = tmp_path / "out"
    one_error_line(run("segment", fcn_onnx, bomb, "--out", out), "bomb.png", "--max-pixels")
    assert not out.exists() or not any(out.iterdir())
    one_error_line(run("classify", shapes_onnx, good_png, "--max-pixels", 100), "good.png", "limit of 100")
    assert run("classify", shapes_onnx, good_png, "--max-pixels", 64 * 64).exit_code == 0
    assert run("classify", shapes_onnx, good_png, "--max-pixels", 0).exit_code == 2  # never disabled


# --- 2. 16-bit and float images ----------------------------------------------------------------------

def test_16_bit_png_is_scaled_to_8_bits_by_its_range(tmp_path):
    ramp = (np.arange(32 * 64, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)  # 0 .. 65504
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode == "I;16"
    got = np.asarray(open_image(tmp_path / "ramp16.png"))
    assert got.dtype == np.uint8 and np.array_equal(got, np.round(ramp / 257.0).astype(np.uint8))
    assert 120 < got.mean() < 135  # Pillow's own conversion gives ~255 (white) here
    floats = np.linspace(0, 1, 64 * 8, dtype=np.float32).reshape(8, 64)
    assert np.array_equal(np.asarray(open_image(_save(Image.fromarray(floats), tmp_path / "f.tiff"))),
                          np.round(floats * 255).astype(np.uint8))
    wide = (np.arange(64, dtype=np.int32).reshape(8, 8) * 1000 - 5000)  # 32-bit values outside 0-65535
    stretched = np.asarray(open_image(_save(Image.fromarray(wide), tmp_path / "i.tiff")))
    assert stretched.min() == 0 and stretched.max() == 255
    arr16 = preprocess([ramp], load_pre("L", (32, 64)))  # uint16 arrays are read like 16-bit files
    assert np.allclose(arr16[0, 0], np.round(ramp / 257.0) / 255, atol=1e-6)


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def load_pre(color: str, size: tuple[int, int]):
    from dlpipe.runtime.metadata import Preprocessing

    return Preprocessing(color=color, size=size, resize="none")


def test_a_model_sees_a_16_bit_greyscale_file_as_its_8_bit_rendering(tmp_path, mnist_onnx, data_dir):
    digits, labels = load_split("mnist", "test", data_dir, limit=8)
    classifier = load(mnist_onnx)
    for i, digit in enumerate(digits):
        Image.fromarray(digit).save(tmp_path / f"d{i}_8.png")
        Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / f"d{i}_16.png")
    eight = classifier.logits([tmp_path / f"d{i}_8.png" for i in range(8)])
    sixteen = classifier.logits([tmp_path / f"d{i}_16.png" for i in range(8)])
    assert np.allclose(eight, sixteen, atol=1e-5)
    assert (sixteen.argmax(1) == labels).mean() >= 0.75
    white = classifier.logits(np.full((8, 28, 28), 255, dtype=np.uint8))  # what the old reading gave
    assert not np.allclose(sixteen, white, atol=1e-2)


# --- 3. EXIF orientation -----------------------------------------------------------------------------

def upright_and_rotated_jpeg(tmp_path: Path) -> tuple[np.ndarray, Path]:
    """A 48x32 (w x h) picture, stored sideways in a JPEG whose EXIF orientation (6) turns it upright."""
    upright = np.zeros((32, 48, 3), dtype=np.uint8)
    upright[:, :24] = (230, 30, 30)  # left half red, right half blue
    upright[:, 24:] = (30, 30, 230)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # orientation 6 rotates it back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif, quality=95)
    return upright, path


def test_exif_orientation_is_applied_everywhere_images_are_read(tmp_path):
    upright, path = upright_and_rotated_jpeg(tmp_path)
    img = open_image(path)
    assert img.size == (48, 32)
    assert np.abs(np.asarray(img, dtype=int) - upright).mean() < 6
    pre = load_pre("RGB", (32, 48))
    # the runtime, and calibration folders (which preprocess files the same way)
    assert np.abs(preprocess([path], pre)[0].transpose(1, 2, 0) * 255 - upright).mean() < 6
    from dlpipe.training.finetune import to_input

    batch = to_input([path], "RGB", (32, 48)).numpy()[0].transpose(1, 2, 0)  # training folders (uint8)
    assert np.abs(batch.astype(int) - upright).mean() < 6


def test_segment_writes_the_overlay_upright(tmp_path, fcn_onnx):
    _, path = upright_and_rotated_jpeg(tmp_path)
    result = run("segment", fcn_onnx, path, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out" / "sideways_overlay.png").size == (48, 32)
    assert Image.open(tmp_path / "out" / "sideways_mask.png").size == (48, 32)


# --- 4. output names and --overwrite -----------------------------------------------------------------

def test_unique_stems():
    assert unique_stems(["a/horse.png", "b/horse.png", "c/cow.jpg"]) == ["a_horse", "b_horse", "cow"]
    assert unique_stems(["x/a/horse.png", "y/a/horse.png"]) == ["x_a_horse", "y_a_horse"]
    assert unique_stems(["horse.png", "horse.jpg", "horse.png"]) == ["horse", "horse-2", "horse-3"]


def test_same_named_images_get_their_own_outputs_and_nothing_is_overwritten(tmp_path, fcn_onnx):
    for folder, index in (("a", 0), ("b", 2)):
        (tmp_path / folder).mkdir()
        Image.fromarray(scene(index)).save(tmp_path / folder / "horse.png")
    out = tmp_path / "out"
    first = run("segment", fcn_onnx, tmp_path / "a" / "horse.png", tmp_path / "b" / "horse.png", "--out", out)
    assert first.exit_code == 0, first.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a_horse_mask.png", "a_horse_overlay.png", "b_horse_mask.png", "b_horse_overlay.png"]
    overlays = [np.asarray(Image.open(out / f"{k}_horse_overlay.png")) for k in "ab"]
    assert not np.array_equal(*overlays)  # two different scenes, two different results
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run("segment", fcn_onnx, tmp_path / "b" / "horse.png", tmp_path / "a" / "horse.png", "--out", out)
    one_error_line(again, "already exists", "--overwrite", code=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run("segment", fcn_onnx, tmp_path / "a" / "horse.png", "--out", out, "--overwrite").exit_code == 0


# --- batches with bad files ---------------------------------------------------------------------------

def test_a_bad_file_in_a_batch_is_reported_and_the_others_processed(tmp_path, shapes_onnx, fcn_onnx, good_png):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    second = tmp_path / "second.png"
    Image.fromarray(scene(3)).save(second)
    result = run("classify", shapes_onnx, good_png, bad, second)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "good.png" in result.stdout and "second.png" in result.stdout and "bad.png" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("dlpipe: error:")]
    assert len(errors) == 1 and "bad.png" in errors[0] and "1 of 3 images failed" in result.stderr
    fast = run("classify", shapes_onnx, good_png, bad, second, "--fail-fast")
    assert fast.exit_code == 1 and fast.stdout == "" and "bad.png" in fast.stderr
    out = tmp_path / "seg"
    seg = run("segment", fcn_onnx, good_png, bad, "--out", out)
    assert seg.exit_code == 1 and "bad.png" in seg.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good_mask.png", "good_overlay.png"]
    out2 = tmp_path / "seg2"
    assert run("segment", fcn_onnx, good_png, bad, "--out", out2, "--fail-fast").exit_code == 1
    assert not out2.exists() or not any(out2.iterdir())  # the first error stops it before anything is written


def test_predict_can_skip_bad_images_with_typed_failures(tmp_path, shapes_onnx, good_png):
    classifier = load(shapes_onnx)
    items = [good_png, tmp_path / "missing.png", np.zeros((5, 5, 7), dtype=np.uint8), scene(2)]
    with pytest.raises(InputError, match="missing.png"):
        classifier.predict(items)
    results = classifier.predict(items, errors="skip", batch_size=4)
    assert [type(r).__name__ for r in results] == ["Classification", "Failure", "Failure", "Classification"]
    assert results[1].image.endswith("missing.png") and "does not exist" in results[1].message
    assert results[2].image == "image #2" and isinstance(results[2].error, InputError)
    alone = classifier.predict([good_png, scene(2)])
    assert (results[0].label, results[3].label) == (alone[0].label, alone[1].label)
    assert isinstance(results[1], Failure)
    with pytest.raises(UsageError):
        classifier.predict(items, errors="ignore")
    with pytest.raises(UsageError):
        classifier.predict(good_png, top_k=0)


# --- exit codes and messages --------------------------------------------------------------------------

def test_exit_codes_usage_2_data_1(tmp_path, shapes_onnx, fcn_onnx, good_png):
    wrong = run("classify", fcn_onnx, good_png)
    one_error_line(wrong, "segmentation model, not a classifier", code=2)  # dlpipe's format, not click's Usage:
    assert run("classify", shapes_onnx, good_png, "--top-k", 0).exit_code == 2
    for iters in ("0", "-5"):
        assert run("bench", shapes_onnx, "--iters", iters).exit_code == 2
    one_error_line(run("classify", shapes_onnx, tmp_path / "nope.png"), "nope.png", "does not exist", code=1)
    one_error_line(run("segment", shapes_onnx, good_png, "--out", tmp_path / "o"), "not a segmentation", code=2)


def test_a_model_whose_labels_do_not_fit_its_output_is_refused_at_load(tmp_path, shapes_onnx):
    import json

    import onnx

    from dlpipe.runtime import ModelFileError

    model = onnx.load(shapes_onnx)
    prop = next(p for p in model.metadata_props if p.key == "dlpipe")
    doc = json.loads(prop.value)
    doc["labels"] = doc["labels"] + ["extra"]
    prop.value = json.dumps(doc)
    onnx.save(model, tmp_path / "wrong.onnx")
    with pytest.raises(ModelFileError, match=f"names {len(doc['labels'])} labels .* has {len(doc['labels']) - 1} classes"):
        load(tmp_path / "wrong.onnx")
