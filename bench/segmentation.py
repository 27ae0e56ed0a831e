"""FCN on held-out shapes scenes: mean IoU of fp32, fp16 and int8 through the runtime, and batch-1
latency of the runtime beside PyTorch eager.

Targets (issue 3, FCN part): mean IoU >= 0.90 on shapes scenes, >= 0.80 on digit scenes; fp16 within
0.5 points and int8 within 2 points of fp32; runtime fp32 latency at batch 1 below PyTorch eager;
training under 20 minutes on 2 CPU cores.

    python bench/segmentation.py                       # trains FCN-2s (conv fusion) first
    python bench/segmentation.py --dataset mnist-scenes --data-dir ../shared/data
    python bench/segmentation.py --checkpoint runs/bench_fcn/train/best.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.export.onnx_export import export_checkpoint  # noqa: E402
from dlpipe.export.quantize import QuantizationConfig, quantize  # noqa: E402
from dlpipe.runtime import Engine  # noqa: E402
from dlpipe.runtime.benchmark import measure_interleaved  # noqa: E402
from dlpipe.runtime.formats import variant_path  # noqa: E402
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from dlpipe.training.registry import get_spec  # noqa: E402
from dlpipe.export.evaluate import evaluate_onnx  # noqa: E402
from dlpipe.training.train import TrainConfig, train  # noqa: E402

# the recipe (optimizer, schedule, batch norm, fusion, epochs per dataset: shapes-scenes has 27,000 generated
# scenes, mnist-scenes 6,000) is the registry's, what `dlpipe train fcn2s` runs (issue 19)
MODEL = "fcn2s"
FUSION = get_spec(MODEL).recipe.model_args["fusion"]
TARGET_MIOU = {"shapes-scenes": 0.90, "mnist-scenes": 0.80}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="shapes-scenes", choices=sorted(TARGET_MIOU))
    p.add_argument("--model", default=MODEL, help="fcn32s, fcn16s, fcn8s, fcn4s or fcn2s")
    p.add_argument("--fusion", default=FUSION, choices=["sum", "conv"],
                   help="skip fusion: sum (the FCN paper's) or conv (decoder features, 3x3 conv)")
    p.add_argument("--decoder-width", type=int, default=None, help="conv fusion: decoder channels (model default 32)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--augment", default=None,
                   help="none, flip, shift, affine or crop (image and mask together; default: the recipe's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default: all cores)")
    p.add_argument("--out", default=None, help="work folder (default runs/bench_fcn[_digits])")
    p.add_argument("--checkpoint", default=None, help="reuse a trained checkpoint instead of training")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's (6 on shapes-scenes, 20 on "
                                                            "mnist-scenes)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--json", default=None, help="result file (default bench/results/segmentation.json)")
    args = p.parse_args()
    recipe = get_spec(args.model).recipe_for(args.dataset)
    args.epochs = args.epochs or recipe["epochs"]
    model_args = {"fusion": args.fusion} | ({"decoder_width": args.decoder_width} if args.decoder_width else {})
    suffix = "" if (args.model, args.fusion) == (MODEL, FUSION) else f"_{args.model}_{args.fusion}"
    out = Path(args.out or ("runs/bench_fcn" if args.dataset == "shapes-scenes" else "runs/bench_fcn_digits") + suffix)
    ckpt, train_seconds = args.checkpoint, None
    if ckpt is None:
        start = time.perf_counter()
        ckpt = train(TrainConfig(model=args.model, dataset=args.dataset, epochs=args.epochs, model_args=model_args,
                                 data_dir=args.data_dir, augment=args.augment, threads=args.threads,
                                 out=str(out / "train")))["best"]
        train_seconds = time.perf_counter() - start
    stored = load_checkpoint(ckpt)
    fp32 = out / f"{stored['model']}.onnx"
    export_checkpoint(ckpt, fp32)
    paths, agreement = {"fp32": fp32}, {}
    for precision in ("fp16", "int8"):
        report = quantize(fp32, variant_path(fp32, precision), QuantizationConfig(precision, calibration_size=256,
                                                                                  min_agreement=0.9),
                          data_dir=args.data_dir)
        paths[precision], agreement[precision] = Path(report.path), report.agreement
    evals = {k: evaluate_onnx(v, device="cpu", data_dir=args.data_dir) for k, v in paths.items()}
    miou = {k: e["miou"] for k, e in evals.items()}
    points = {k: 100 * (miou["fp32"] - miou[k]) for k in ("fp16", "int8")}

    engine = Engine(fp32, device="cpu")
    module = model_from_checkpoint(stored)
    x = stored["examples"][:1]
    feeds = {engine.input_names[0]: x.numpy()}

    def eager():
        with torch.inference_mode():
            return module(x)

    lat = measure_interleaved({"pytorch eager": eager, "runtime fp32": lambda: engine.run(feeds)}, batch=1,
                              warmup=20, iters=args.iters, rounds=10)
    speedup = lat["pytorch eager"].p50_ms / lat["runtime fp32"].p50_ms
    target = TARGET_MIOU[stored["dataset"]["name"]]
    targets = {f"mIoU >= {target}": miou["fp32"] >= target, "fp16 within 0.5 points": points["fp16"] <= 0.5,
               "int8 within 2 points": points["int8"] <= 2.0, "runtime faster than eager at batch 1": speedup > 1}
    if train_seconds is not None:
        targets["training under 20 minutes"] = train_seconds < 20 * 60
    rows = [[k, f"{100 * evals[k]['accuracy']:.2f}%", f"{miou[k]:.4f}",
             f"{points[k]:+.2f}" if k in points else "-", f"{agreement[k]:.2%}" if k in agreement else "-"]
            for k in paths]
    print(table(rows, ["variant", "pixel accuracy", "mean IoU", "points lost", "pixel agreement"]))
    print(f"batch-1 latency (64x64): eager {lat['pytorch eager'].p50_ms:.3f} ms, runtime {lat['runtime fp32'].p50_ms:.3f} ms "
          f"-> {speedup:.2f}x")
    if train_seconds is not None:
        print(f"training: {train_seconds / 60:.1f} min")
    for name, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    fusion = stored["model_args"].get("fusion", "sum")
    name = ("segmentation" if stored["dataset"]["name"] == "shapes-scenes" else "segmentation_digits") + (
        "" if (stored["model"], fusion) == (MODEL, FUSION) else f"_{stored['model']}_{fusion}")
    config = stored.get("config", {})
    path = write_result(name, {
        "recipe": recipe | {k: config[k] for k in ("epochs", "batch_size", "lr", "augment", "recipe") if k in config}
                  | {"dataset": stored["dataset"]["name"], "model": stored["model"], "fusion": fusion,
                     "model_args": stored["model_args"]},
        "checkpoint": str(ckpt),
        "training": {"seconds": train_seconds, "epoch": stored.get("epoch"), "metrics": stored.get("metrics")},
        "test_images": evals["fp32"]["images"], "miou": miou, "pixel_accuracy": {k: e["accuracy"] for k, e in evals.items()},
        "per_class_iou_fp32": evals["fp32"]["per_class_iou"], "points_lost": points, "agreement_with_fp32": agreement,
        "latency_b1": {k: v.as_dict() for k, v in lat.items()}, "runtime_speedup_b1": speedup, "targets": targets},
        args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
