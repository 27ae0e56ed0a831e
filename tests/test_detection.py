"""The R-CNN-style detector end to end: box data, training, COCO metrics, export parity, fp16/int8,
the runtime Detector, ``dlpipe detect`` and users' VOC/COCO files."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dlpipe.apps.cli import cli
from dlpipe.export.onnx_export import export_checkpoint
from dlpipe.export.quantize import QuantizationConfig, quantize
from dlpipe.runtime import Detector, load
from dlpipe.runtime.errors import InputError
from dlpipe.training import data as datasets
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint
from dlpipe.training.detection import DetectionDataset, coco_metrics, model_args_for, train_one_epoch
from dlpipe.export.evaluate import evaluate_onnx
from dlpipe.training.registry import get_spec
from dlpipe.training.shapes import ShapesWorld
from dlpipe.training.train import TrainConfig, train


# Seconds of training: every test that uses it is marked slow.
@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A detector trained briefly on shapes scenes, and its fp32 export."""
    out = tmp_path_factory.mktemp("rcnn")
    result = train(TrainConfig(model="rcnn", dataset="shapes-boxes", epochs=3, limit=480, test_limit=64, lr=2e-3,
                              schedule="onecycle", out=str(out), progress=False, seed=0))
    report = export_checkpoint(result["best"], out / "rcnn.onnx")
    return {"result": result, "checkpoint": Path(result["best"]), "onnx": out / "rcnn.onnx", "report": report}


def test_train_command_reports_map(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "rcnn", "--limit", "40", "--epochs", "1", "--test-limit", "8",
                                      "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "test mAP@0.5" in result.stdout and (out / "best.pt").is_file()
    result = CliRunner().invoke(cli, ["train", "rcnn", "--augment", "affine", "--out", str(out)])
    assert result.exit_code != 0 and "none or flip" in result.stderr


def test_detection_scenes_are_deterministic_and_boxes_match_masks():
    world = ShapesWorld(seed=3, image_size=64, shapes_per_scene=(1, 5), radius=(0.12, 0.25))
    images, targets = world.detection_set(20)
    again, targets2 = world.detection_set(20)
    assert np.array_equal(images, again)
    assert all(np.array_equal(a["boxes"], b["boxes"]) for a, b in zip(targets, targets2))
    for i, target in enumerate(targets):
        scene = world.scene(i)
        instances = world.instance_mask(scene)
        assert len(target["boxes"]) >= 1 and len(target["boxes"]) <= len(scene.shapes)
        assert set(target["labels"]) <= set(range(1, 7))
        for (x0, y0, x1, y1), label in zip(target["boxes"].astype(int), target["labels"]):
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # the box is tight around visible pixels of a shape of that kind
            inside = instances[y0:y1, x0:x1]
            kinds = {scene.shapes[k - 1].label + 1 for k in np.unique(inside) if k}
            assert label in kinds
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_digit_boxes_hold_their_digit(data_dir):
    images, targets = datasets.load_split("mnist-boxes", "train", data_dir, limit=12)
    assert images.shape == (12, 64, 64)
    for image, target in zip(images, targets):
        assert 1 <= len(target["labels"]) <= 3 and set(target["labels"]) <= set(range(1, 11))
        for x0, y0, x1, y1 in target["boxes"].astype(int):
            assert image[y0:y1, x0:x1].max() > 96  # strokes inside the box


def test_coco_metrics_are_pycocotools_map():
    targets = [{"boxes": np.array([[10, 10, 30, 30], [40, 40, 60, 60]], np.float32), "labels": np.array([1, 2])},
               {"boxes": np.array([[5, 5, 25, 20]], np.float32), "labels": np.array([1])}]
    perfect = [{**t, "scores": np.ones(len(t["labels"]))} for t in targets]
    assert coco_metrics(targets, perfect, ["bg", "a", "b"])["map50"] == pytest.approx(1.0)
    shifted = [{**p, "boxes": p["boxes"] + 8} for p in perfect]  # IoU drops below 0.5
    assert coco_metrics(targets, shifted, ["bg", "a", "b"])["map50"] < 0.5
    wrong = [{**p, "labels": 3 - p["labels"]} for p in perfect]
    assert coco_metrics(targets, wrong, ["bg", "a", "b"])["map50"] < 1.0
    assert coco_metrics(targets, [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0), "scores": np.zeros(0)}] * 2,
                        ["bg", "a", "b"])["map"] == 0.0


def test_a_few_steps_lower_the_detection_loss():
    torch.manual_seed(0)
    info = datasets.get_dataset("shapes-boxes")
    model = get_spec("rcnn").build(**model_args_for(info))
    images, targets = datasets.load_split("shapes-boxes", "train", limit=32)
    ds = DetectionDataset(datasets.to_nchw(images), targets)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False, collate_fn=lambda b: b)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = train_one_epoch(model, loader, optimizer)["train_loss"]
    for _ in range(3):
        last = train_one_epoch(model, loader, optimizer)["train_loss"]
    assert last < 0.8 * first


def test_flip_augmentation_moves_boxes_with_the_image():
    images, targets = datasets.load_split("shapes-boxes", "train", limit=1)
    ds = DetectionDataset(datasets.to_nchw(images), targets, flip=True, seed=1)
    flipped = [ds[0] for _ in range(8)]
    plain = DetectionDataset(datasets.to_nchw(images), targets)[0]
    for image, target in flipped:
        if not torch.equal(image, plain[0]):
            assert torch.equal(image, plain[0].flip(-1))
            x0 = 64 - plain[1]["boxes"][:, 2]
            assert torch.allclose(target["boxes"][:, 0], x0)
            break
    else:
        pytest.fail("no image was flipped in 8 draws")


@pytest.mark.slow
def test_training_learns_and_reports_coco_map(detector):
    result = detector["result"]
    history = result["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert 0 < result["test_map50"] <= 1 and result["test_map"] <= result["test_map50"]
    ckpt = load_checkpoint(detector["checkpoint"])
    assert ckpt["task"] == "detection" and ckpt["dataset"]["labels"][0] == "background"
    assert ckpt["examples"].shape[1:] == (3, 64, 64)


@pytest.mark.slow
def test_detector_export_matches_pytorch_at_two_sizes(detector):
    parity = detector["report"].parity
    assert {p.output for p in parity} == {"boxes", "labels", "scores"}
    assert all(p.max_abs <= 1e-3 for p in parity)
    # the same image through onnxruntime and PyTorch, at a size the export never saw
    module = model_from_checkpoint(load_checkpoint(detector["checkpoint"]))
    images, _ = datasets.load_split("shapes-boxes", "test", limit=3)
    image = np.array(Image.fromarray(images[2]).resize((90, 70)))
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        ref = module(x)
    got = load(detector["onnx"]).engine.run({"image": x.numpy()})
    assert got[0].shape == tuple(ref[0].shape) and len(got[0]) > 0
    np.testing.assert_allclose(got[0], ref[0].numpy(), atol=1e-3)
    np.testing.assert_array_equal(got[1], ref[1].numpy())
    np.testing.assert_allclose(got[2], ref[2].numpy(), atol=1e-4)


@pytest.mark.slow
def test_runtime_detector_on_any_image(detector, tmp_path):
    det = load(detector["onnx"])
    assert isinstance(det, Detector)
    images, targets = datasets.load_split("shapes-boxes", "test", limit=4)
    path = tmp_path / "scene.png"
    Image.fromarray(images[0]).save(path)
    from_file, from_array = det.predict([path, images[0]], threshold=0.3)
    assert [d.box for d in from_file] == [d.box for d in from_array]
    assert all(d.score >= 0.3 for d in from_file)
    assert [d.score for d in from_file] == sorted((d.score for d in from_file), reverse=True)
    big = Image.fromarray(images[1]).resize((256, 192))  # boxes come back in the image's own pixels
    for d in det.predict(big, threshold=0.3)[0]:
        assert 0 <= d.box[0] < d.box[2] <= 256 and 0 <= d.box[1] < d.box[3] <= 192
    gray = Image.fromarray(images[2]).convert("L")  # another mode is converted, not refused
    assert isinstance(det.predict(gray, threshold=0.0)[0], list)
    with pytest.raises(InputError, match="threshold"):
        det.predict(images[0], threshold=1.5)


@pytest.mark.slow
def test_evaluate_and_quantized_variants_keep_map(detector, tmp_path):
    fp32 = evaluate_onnx(detector["onnx"], limit=32)
    assert fp32["images"] == 32 and 0 < fp32["map50"] <= 1
    for precision in ("fp16", "int8"):
        out = tmp_path / f"rcnn.{precision}.onnx"
        report = quantize(detector["onnx"], out, QuantizationConfig(precision=precision, calibration_size=16,
                                                                    min_agreement=0.8), check_size=16)
        assert report.agreement >= 0.8
        assert any(k.startswith("RoiAlign:") for k in report.kept_fp32)
        metrics = evaluate_onnx(out, limit=32)
        assert metrics["precision"] == precision
        assert abs(metrics["map50"] - fp32["map50"]) < 0.05


@pytest.mark.slow
def test_detect_app_writes_drawn_images_and_json(detector, tmp_path):
    images, _ = datasets.load_split("shapes-boxes", "test", limit=2)
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    Image.fromarray(images[0]).save(paths[0])
    Image.fromarray(images[1]).resize((160, 120)).save(paths[1])
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["detect", str(detector["onnx"]), *map(str, paths), "--out", str(out),
                                      "--threshold", "0.3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    for stem, row in zip(("a", "b"), rows):
        drawn = Image.open(out / f"{stem}_boxes.png")
        assert drawn.size == (row["width"], row["height"])
        saved = json.loads((out / f"{stem}_boxes.json").read_text())
        assert saved["detections"] == row["detections"]
        assert all(d["score"] >= 0.3 for d in saved["detections"])


@pytest.mark.slow
def test_detect_app_bad_inputs(detector, shapes_onnx, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(cli, ["detect", str(detector["onnx"]), str(bad), "--out", str(out)])
    assert result.exit_code != 0 and "not an image file" in result.stderr and not out.exists()
    result = runner.invoke(cli, ["detect", str(shapes_onnx), str(bad), "--out", str(out)])
    assert result.exit_code != 0 and "not a detection model" in result.stderr
    result = runner.invoke(cli, ["detect", str(detector["onnx"]), str(bad), "--out", str(out), "--threshold", "2"])
    assert result.exit_code != 0 and "threshold" in result.stderr.lower()


# --- users' own data: small files made here in the Pascal VOC and COCO layouts ---------------------

def _voc_tree(root: Path, names: list[str]) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)
    for i, name in enumerate(names):
        Image.new("RGB", (200, 100), (20 * i, 90, 160)).save(base / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((100, 200), np.uint8)
        mask[20:60, 40:120] = 15  # person
        mask[19, 40:120] = 255  # VOC's void border
        png = Image.fromarray(mask, "P")
        png.putpalette(palette)
        png.save(base / "SegmentationClass" / f"{name}.png")
        ann = ET.Element("annotation")
        size = ET.SubElement(ann, "size")
        for key, value in (("width", "200"), ("height", "100"), ("depth", "3")):
            ET.SubElement(size, key).text = value
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = "person"
        box = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", "40"), ("ymin", "20"), ("xmax", "120"), ("ymax", "60")):
            ET.SubElement(box, key).text = value
        ET.ElementTree(ann).write(base / "Annotations" / f"{name}.xml")
    for sets in ("Main", "Segmentation"):
        (base / "ImageSets" / sets / "train.txt").write_text("\n".join(names[:-1]) + "\n")
        (base / "ImageSets" / sets / "val.txt").write_text(names[-1] + "\n")
    return root


def test_pascal_voc_segmentation_and_detection_files(tmp_path):
    root = _voc_tree(tmp_path / "voc", ["a", "b", "c"])
    info = datasets.get_dataset(f"voc-seg:{root}")
    assert info.task == "segmentation" and info.labels[15] == "person"
    images, masks = datasets.load_split(f"voc-seg:{root}", "train")
    assert images.shape == (2, 128, 128, 3) and masks.shape == (2, 128, 128)
    assert set(np.unique(masks)) == {0, 15}  # the 255 border became background
    images, targets = datasets.load_split(f"voc-det:{root}", "test")
    assert len(images) == 1 and targets[0]["labels"].tolist() == [15]
    np.testing.assert_allclose(targets[0]["boxes"][0], [40 * 0.64, 20 * 1.28, 120 * 0.64, 60 * 1.28], rtol=1e-5)


def test_coco_detection_json(tmp_path):
    root = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        Image.new("RGB", (64, 32), (200, 10, 10)).save(root / split / "0001.jpg")
    (root / "annotations").mkdir()
    doc = {"images": [{"id": 7, "file_name": "0001.jpg", "width": 64, "height": 32}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [8, 4, 16, 8], "area": 128,
                            "iscrowd": 0}],
           "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]}
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    info = datasets.get_dataset(f"coco:{root}")
    assert info.task == "detection" and info.labels == ("background", "person", "dog")
    images, targets = datasets.load_split(f"coco:{root}", "train")
    assert images.shape == (1, 128, 128, 3)
    assert targets[0]["labels"].tolist() == [2]
    np.testing.assert_allclose(targets[0]["boxes"][0], [16, 16, 48, 48])


def test_missing_or_wrong_user_data_is_a_clear_error(tmp_path):
    from dlpipe.runtime.errors import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="does not exist"):
        datasets.get_dataset(f"voc-det:{tmp_path / 'nowhere'}")
    with pytest.raises(DataNotFoundError, match="VOCdevkit"):
        datasets.get_dataset(f"voc-det:{tmp_path}")
    with pytest.raises(DataNotFoundError, match="instances_train"):
        datasets.get_dataset(f"coco:{tmp_path}")
    with pytest.raises(InputError, match="voc-seg:ROOT"):
        datasets.get_dataset(f"kitti:{tmp_path}")
