"""deep_convnet on full MNIST: test accuracy of fp32, fp16 and int8 through the runtime.

Targets (issue 2): fp32 >= 99.38% (the textbook's figure; aim 99.5%), fp16 within 0.05 points,
int8 within 0.2 points. Trains with the dlpipe recipe unless --checkpoint reuses a trained one.

    python bench/mnist_accuracy.py --data-dir ../shared/data            # ~20 min on 2 cores
    python bench/mnist_accuracy.py --checkpoint runs/bench_mnist/train/best.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.export.onnx_export import export_checkpoint  # noqa: E402
from dlpipe.export.quantize import QuantizationConfig, quantize  # noqa: E402
from dlpipe.runtime.formats import variant_path  # noqa: E402
from dlpipe.export.evaluate import evaluate_onnx  # noqa: E402
from dlpipe.training.train import TrainConfig, train  # noqa: E402

RECIPE = dict(model="deep_convnet", dataset="mnist", epochs=20, batch_size=128, lr=1e-3, optimizer="adam",
              schedule="cosine", augment="affine", seed=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/bench_mnist")
    p.add_argument("--checkpoint", default=None, help="reuse a trained checkpoint instead of training")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--json", default=None, help="result file (default bench/results/mnist_accuracy.json)")
    args = p.parse_args()
    out = Path(args.out)

    ckpt = args.checkpoint
    training = None
    if ckpt is None:
        result = train(TrainConfig(**{**RECIPE, "epochs": args.epochs}, out=str(out / "train"), data_dir=args.data_dir))
        ckpt = result["best"]
        training = {k: result[k] for k in ("best_val_score", "test_acc")} | {"epochs": len(result["history"])}
    else:
        from dlpipe.training.checkpoint import load_checkpoint

        stored = load_checkpoint(ckpt)
        training = {"config": stored["config"], "metrics": stored["metrics"], "epoch": stored["epoch"]}
    fp32 = out / "deep_convnet.onnx"
    export_checkpoint(ckpt, fp32)
    paths = {"fp32": fp32}
    agreement = {}
    for precision in ("fp16", "int8"):
        report = quantize(fp32, variant_path(fp32, precision),
                          QuantizationConfig(precision, calibration_size=512), data_dir=args.data_dir, check_size=2000)
        paths[precision] = Path(report.path)
        agreement[precision] = report.agreement
    acc = {k: evaluate_onnx(v, "mnist", data_dir=args.data_dir, device="cpu")["accuracy"] for k, v in paths.items()}
    points = {k: 100 * (acc["fp32"] - acc[k]) for k in ("fp16", "int8")}
    targets = {"fp32 >= 99.38%": acc["fp32"] >= 0.9938, "fp16 loses <= 0.05 points": points["fp16"] <= 0.05,
               "int8 loses <= 0.2 points": points["int8"] <= 0.2}
    rows = [[k, f"{100 * acc[k]:.2f}%", f"{points.get(k, 0.0):+.2f}" if k != "fp32" else "-",
             f"{agreement[k]:.2%}" if k in agreement else "-", f"{paths[k].stat().st_size / 1024:.0f}"] for k in paths]
    print(table(rows, ["variant", "test accuracy (10k)", "points lost", "top-1 agreement", "KiB"]))
    for name, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    path = write_result("mnist_accuracy", {"recipe": RECIPE | {"epochs": args.epochs}, "checkpoint": str(ckpt),
                                           "training": training, "test_accuracy": acc, "points_lost": points,
                                           "agreement_with_fp32": agreement, "targets": targets}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
