"""Users' own data in the formats they already have, read by torchvision's dataset classes:
Pascal VOC (segmentation masks and detection XML) and COCO detection JSON (and, through
:mod:`dlpipe.training.folder_data`, ``folder:ROOT``: labelled image folders for classification).

Named on the command line as ``--dataset voc-seg:ROOT``, ``voc-det:ROOT`` (ROOT holds
``VOCdevkit/VOC20xx``; train = ``ImageSets/*/train.txt``, test = ``val.txt``) or ``coco:ROOT`` (ROOT holds
``annotations/instances_<split>.json`` for a train and a val split, and the image folders named like
them, e.g. ``train2017/`` beside ``annotations/instances_train2017.json``). Images are resized to
``SIZE x SIZE`` (boxes scaled, masks by nearest neighbour) so that they batch; VOC's 255 "void"
border pixels count as background.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dlpipe.runtime.errors import DataNotFoundError, InputError
from dlpipe.training.dataset_info import DatasetInfo
from dlpipe.training.folder_data import folder_dataset

SIZE = 128
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
KINDS = {"voc-seg": "segmentation", "voc-det": "detection", "coco": "detection"}


def _voc_year(root: Path) -> str:
    years = sorted(p.name[3:] for p in (root / "VOCdevkit").glob("VOC20*") if p.is_dir())
    if not years:
        raise DataNotFoundError(f"no Pascal VOC data in '{root}': expected '{root / 'VOCdevkit'}/VOC2007..2012'")
    return years[-1]


def _resize(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


def _voc_split(root: Path, kind: str, split: str, download: bool, limit: int | None):
    from torchvision import datasets

    cls = datasets.VOCSegmentation if kind == "voc-seg" else datasets.VOCDetection
    image_set = "train" if split == "train" else "val"
    try:
        ds = cls(str(root), year=_voc_year(root), image_set=image_set, download=download)
    except (RuntimeError, FileNotFoundError) as exc:
        raise DataNotFoundError(f"Pascal VOC {image_set} split not readable under '{root}': {exc}") from None
    count = len(ds) if limit is None else min(limit, len(ds))
    images = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    targets: list | np.ndarray = [] if kind == "voc-det" else np.empty((count, SIZE, SIZE), dtype=np.uint8)
    for i in range(count):
        try:
            image, target = ds[i]
        except Exception as exc:  # a damaged JPEG, PNG or XML file
            raise InputError(f"Pascal VOC sample '{ds.images[i]}' is unreadable: {exc}") from None
        images[i] = _resize(image)
        if kind == "voc-seg":
            mask = np.asarray(target.resize((SIZE, SIZE), Image.Resampling.NEAREST), dtype=np.uint8).copy()
            mask[mask >= len(VOC_CLASSES)] = 0  # 255 marks object borders ("void")
            targets[i] = mask
        else:
            ann = target["annotation"]
            sx, sy = SIZE / float(ann["size"]["width"]), SIZE / float(ann["size"]["height"])
            objects = ann.get("object", [])
            boxes, labels = [], []
            for obj in objects if isinstance(objects, list) else [objects]:
                if obj["name"] not in VOC_CLASSES:
                    raise InputError(f"'{ds.targets[i]}': unknown VOC class {obj['name']!r}")
                b = obj["bndbox"]
                boxes.append((float(b["xmin"]) * sx, float(b["ymin"]) * sy, float(b["xmax"]) * sx,
                              float(b["ymax"]) * sy))
                labels.append(VOC_CLASSES.index(obj["name"]))
            targets.append({"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
                            "labels": np.array(labels, dtype=np.int64)})
    return images, targets


def _coco_files(root: Path, split: str) -> tuple[Path, Path]:
    want = "train" if split == "train" else "val"
    found = sorted((root / "annotations").glob(f"instances_{want}*.json"))
    if not found:
        raise DataNotFoundError(f"no COCO {want} annotations in '{root / 'annotations'}' "
                                f"(expected instances_{want}*.json)")
    ann = found[0]
    images = root / ann.stem.removeprefix("instances_")
    if not images.is_dir():
        raise DataNotFoundError(f"COCO images for '{ann}' not found: expected the folder '{images}'")
    return ann, images


def coco_labels(root: Path) -> tuple[str, ...]:
    """Category names of the train annotations, in id order, after ``background``."""
    ann, _ = _coco_files(root, "train")
    try:
        cats = json.loads(ann.read_text())["categories"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"'{ann}' is not COCO detection JSON ({type(exc).__name__}: {exc})") from None
    return ("background", *(c["name"] for c in sorted(cats, key=lambda c: c["id"])))


def _coco_split(root: Path, split: str, download: bool, limit: int | None):
    from torchvision import datasets

    del download  # COCO is never downloaded
    ann, folder = _coco_files(root, split)
    try:
        ds = datasets.CocoDetection(str(folder), str(ann))
    except Exception as exc:
        raise InputError(f"'{ann}' is not readable COCO detection JSON: {exc}") from None
    ids = sorted(c["id"] for c in ds.coco.dataset["categories"])
    index = {cid: k + 1 for k, cid in enumerate(ids)}
    count = len(ds) if limit is None else min(limit, len(ds))
    images = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    targets = []
    for i in range(count):
        try:
            image, anns = ds[i]
        except (OSError, ValueError) as exc:
            raise InputError(f"COCO image #{i} in '{folder}' is unreadable: {exc}") from None
        sx, sy = SIZE / image.size[0], SIZE / image.size[1]
        images[i] = _resize(image)
        boxes = [(a["bbox"][0] * sx, a["bbox"][1] * sy, (a["bbox"][0] + a["bbox"][2]) * sx,
                  (a["bbox"][1] + a["bbox"][3]) * sy) for a in anns if not a.get("iscrowd")]
        labels = [index[a["category_id"]] for a in anns if not a.get("iscrowd")]
        targets.append({"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
                        "labels": np.array(labels, dtype=np.int64)})
    return images, targets


def user_dataset(name: str):
    """The :class:`~dlpipe.training.data.DatasetInfo` for ``voc-seg:ROOT``, ``voc-det:ROOT``, ``coco:ROOT`` or
    ``folder:ROOT`` (:mod:`dlpipe.training.folder_data`)."""
    kind, _, root_text = name.partition(":")
    if kind not in (*KINDS, "folder") or not root_text:
        raise InputError(f"unknown dataset {name!r}; own data is named voc-seg:ROOT, voc-det:ROOT, coco:ROOT or "
                         "folder:ROOT (one sub-folder of images per class)")
    root = Path(root_text).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"dataset folder '{root}' does not exist")
    if kind == "folder":  # classification on an ImageFolder tree (issue 15)
        return folder_dataset(name, root)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as torchvision uses
    if kind == "coco":
        labels, loader = coco_labels(root), (lambda split, _root, download, limit:
                                             _coco_split(root, split, download, limit))
    else:
        _voc_year(root)  # fail now, not after a model was built, when the folder holds no VOC data
        labels = VOC_CLASSES
        loader = (lambda split, _root, download, limit, k=kind: _voc_split(root, k, split, download, limit))
    return DatasetInfo(name, 3, (SIZE, SIZE), mean, std, labels, loader, task=KINDS[kind])

