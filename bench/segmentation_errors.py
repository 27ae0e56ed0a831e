"""Where a segmenter's errors lie on held-out shapes scenes, and what each output stride could reach.

For a checkpoint: mean IoU, the share of pixels wrong on the 1-pixel band around label edges and in
the interiors, the mean IoU with either set corrected, and the shapes whose majority kind is wrong.
Without one: only the strided upper bounds (the true mask averaged over stride x stride cells and
upsampled by FCN's bilinear transposed convolution, then argmax).

    python bench/segmentation_errors.py --checkpoint runs/bench_fcn/train/best.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from dlpipe.training.data import _SHAPES_TEST_START, SHAPES_SEED, get_dataset, load_split, normalize, to_nchw  # noqa: E402
from dlpipe.training.models.fcn import _upsample  # noqa: E402
from dlpipe.training.shapes import ShapesWorld  # noqa: E402


def mean_iou(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    return float(np.mean([((pred == c) & (truth == c)).sum() / ((pred == c) | (truth == c)).sum()
                          for c in range(classes)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a shapes-scenes segmenter (best.pt)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="result file (default bench/results/segmentation_errors.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = get_dataset("shapes-scenes")
    k = len(info.labels)
    images, masks = load_split("shapes-scenes", "test")
    truth = masks.astype(np.int64)
    onehot = F.one_hot(torch.from_numpy(truth), k).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        bounds = {s: mean_iou(_upsample(k, s)(F.avg_pool2d(onehot, s)).argmax(1).numpy(), truth, k) for s in (2, 4, 8)}
    rows = [[f"stride {s} upper bound", f"{v:.4f}"] for s, v in bounds.items()]
    result = {"test_images": len(truth), "stride_upper_bound": bounds}
    if args.checkpoint:
        model = model_from_checkpoint(load_checkpoint(args.checkpoint)).eval()
        x = normalize(to_nchw(images), info)
        with torch.inference_mode():
            pred = torch.cat([model(x[i:i + 100]).argmax(1) for i in range(0, len(x), 100)]).numpy()
        t = torch.from_numpy(truth)[:, None].float()
        edge = (F.max_pool2d(t, 3, 1, 1) != -F.max_pool2d(-t, 3, 1, 1))[:, 0].numpy()
        wrong = pred != truth
        world = ShapesWorld(seed=SHAPES_SEED + 1, image_size=64, shapes_per_scene=(1, 4), radius=(0.12, 0.25))
        shapes = wrong_kind = 0
        for i in range(len(truth)):
            scene = world.scene(_SHAPES_TEST_START + i)
            instances = world.instance_mask(scene)
            for j, shape in enumerate(scene.shapes):
                pixels = instances == j + 1
                if pixels.sum() < 12:
                    continue
                votes = np.bincount(pred[i][pixels], minlength=k)
                votes[0] = 0
                shapes += 1
                wrong_kind += int(votes.argmax() != shape.label + 1)
        result |= {"checkpoint": args.checkpoint, "miou": mean_iou(pred, truth, k),
                   "pixels_wrong": float(wrong.mean()), "edge_band_share": float(edge.mean()),
                   "wrong_on_edge_band": float((wrong & edge).mean()), "wrong_inside": float((wrong & ~edge).mean()),
                   "miou_edges_corrected": mean_iou(np.where(edge, truth, pred), truth, k),
                   "miou_interiors_corrected": mean_iou(np.where(edge, pred, truth), truth, k),
                   "shapes": shapes, "shapes_majority_kind_wrong": wrong_kind}
        rows = [["mean IoU", f"{result['miou']:.4f}"],
                ["pixels wrong", f"{result['pixels_wrong']:.2%}"],
                ["  on the 1-px band around edges", f"{result['wrong_on_edge_band']:.2%}"],
                ["  inside", f"{result['wrong_inside']:.2%}"],
                ["mean IoU, edge band corrected", f"{result['miou_edges_corrected']:.4f}"],
                ["mean IoU, interiors corrected", f"{result['miou_interiors_corrected']:.4f}"],
                ["shapes with the wrong majority kind", f"{wrong_kind} of {shapes} ({wrong_kind / shapes:.1%})"],
                *rows]
    print(table(rows, ["measure", "value"]))
    print(f"wrote {write_result('segmentation_errors', result, args.json)}")


if __name__ == "__main__":
    main()
