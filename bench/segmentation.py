"""FCN on held-out shapes scenes: mean IoU of fp32, fp16 and int8 through the runtime, and batch-1
latency of the runtime beside PyTorch eager.

Targets (issue 3, FCN part): mean IoU >= 0.90 on shapes scenes; fp16 within 0.5 points and int8
within 2 points of fp32; runtime fp32 latency at batch 1 below PyTorch eager.

    python bench/segmentation.py                       # trains FCN-8s first (~10 min on 2 cores)
    python bench/segmentation.py --checkpoint runs/bench_fcn/train/best.pt
"""

from __future__ import annotations

import argparse
import sys
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
from dlpipe.training.evaluate import evaluate_onnx  # noqa: E402
from dlpipe.training.train import TrainConfig, main as train  # noqa: E402

RECIPE = dict(model="fcn8s", dataset="shapes-scenes", epochs=20, batch_size=32, lr=3e-3, optimizer="adam",
              schedule="onecycle", batch_norm=True, seed=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_fcn")
    p.add_argument("--checkpoint", default=None, help="reuse a trained checkpoint instead of training")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--json", default=None, help="result file (default bench/results/segmentation.json)")
    args = p.parse_args()
    out = Path(args.out)
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = train(TrainConfig(**{**RECIPE, "epochs": args.epochs}, out=str(out / "train")))["best"]
    stored = load_checkpoint(ckpt)
    fp32 = out / f"{stored['model']}.onnx"
    export_checkpoint(ckpt, fp32)
    paths, agreement = {"fp32": fp32}, {}
    for precision in ("fp16", "int8"):
        report = quantize(fp32, variant_path(fp32, precision), QuantizationConfig(precision, calibration_size=256,
                                                                                  min_agreement=0.9))
        paths[precision], agreement[precision] = Path(report.path), report.agreement
    evals = {k: evaluate_onnx(v, device="cpu") for k, v in paths.items()}
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
    targets = {"mIoU >= 0.90": miou["fp32"] >= 0.90, "fp16 within 0.5 points": points["fp16"] <= 0.5,
               "int8 within 2 points": points["int8"] <= 2.0, "runtime faster than eager at batch 1": speedup > 1}
    rows = [[k, f"{100 * evals[k]['accuracy']:.2f}%", f"{miou[k]:.4f}",
             f"{points[k]:+.2f}" if k in points else "-", f"{agreement[k]:.2%}" if k in agreement else "-"]
            for k in paths]
    print(table(rows, ["variant", "pixel accuracy", "mean IoU", "points lost", "pixel agreement"]))
    print(f"batch-1 latency (64x64): eager {lat['pytorch eager'].p50_ms:.3f} ms, runtime {lat['runtime fp32'].p50_ms:.3f} ms "
          f"-> {speedup:.2f}x")
    for name, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    path = write_result("segmentation", {
        "recipe": RECIPE | {"epochs": args.epochs}, "checkpoint": str(ckpt),
        "training": {"epoch": stored.get("epoch"), "metrics": stored.get("metrics")},
        "test_images": evals["fp32"]["images"], "miou": miou, "pixel_accuracy": {k: e["accuracy"] for k, e in evals.items()},
        "per_class_iou_fp32": evals["fp32"]["per_class_iou"], "points_lost": points, "agreement_with_fp32": agreement,
        "latency_b1": {k: v.as_dict() for k, v in lat.items()}, "runtime_speedup_b1": speedup, "targets": targets},
        args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
