"""Autoencoders (issue 15): ae, dae and vae trained with one short recipe on one dataset, exported as
encoder/decoder packages, quantized to fp16 and int8 (gated on mean PSNR within 0.5 dB of fp32), and
evaluated through the runtime on the test split: reconstruction PSNR and SSIM from clean inputs, the
PSNR gain over the noisy input per noise type and level, and the VAE's ELBO.

    python bench/autoencoders.py --data-dir ../shared/data       # mnist, 10,000 images, the registered recipe
    python bench/autoencoders.py --dataset fashion-mnist --limit 20000 --epochs 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.export.evaluate import evaluate_onnx  # noqa: E402
from dlpipe.export.onnx_export import export_checkpoint  # noqa: E402
from dlpipe.export.quantize import QuantizationConfig, quantize  # noqa: E402
from dlpipe.training.registry import get_spec  # noqa: E402
from dlpipe.training.train import TrainConfig, train  # noqa: E402

MODELS = {"ae": {}, "dae": {"noise": "gaussian", "noise_level": 0.3}, "vae": {"beta": 1.0}}


def run_model(name: str, args, out: Path) -> dict:
    """Train, export, quantize and evaluate one model; its row of the result."""
    started = time.perf_counter()
    result = train(TrainConfig(model=name, dataset=args.dataset, epochs=args.epochs, limit=args.limit,
                               test_limit=args.test_limit, lr=args.lr, threads=args.threads,
                               data_dir=args.data_dir, model_args=MODELS[name], out=str(out / name), progress=False))
    package = out / f"{name}_pkg"
    export_checkpoint(result["best"], package)
    row = {"model": name, "model_args": MODELS[name], "recipe": get_spec(name).recipe_for(args.dataset),
           "epochs": args.epochs, "lr": args.lr, "train_seconds": result["train_seconds"],
           "best_val_psnr": result["best_val_score"], "precisions": {}, "quantization": {}}
    for precision in ("fp16", "int8"):
        try:
            report = quantize(package, None, QuantizationConfig(precision=precision, calibration_size=256),
                              data_dir=args.data_dir)
            row["quantization"][precision] = {"passed": True, "psnr_drop_db": report.max_abs_diff,
                                              "format": report.format, "size_bytes": report.size_bytes,
                                              "fp32_size_bytes": report.fp32_size_bytes}
        except Exception as exc:  # a refused variant is a result too
            row["quantization"][precision] = {"passed": False, "error": str(exc)}
    for precision in ("fp32", "fp16", "int8"):
        manifest = package / ("manifest.json" if precision == "fp32" else f"manifest.{precision}.json")
        if manifest.is_file():
            r = evaluate_onnx(manifest, args.dataset, limit=args.eval_limit, data_dir=args.data_dir, device="cpu")
            row["precisions"][precision] = {k: r.get(k) for k in ("psnr", "ssim", "elbo", "noisy", "images")}
    row["seconds"] = time.perf_counter() - started
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--models", default="ae,dae,vae")
    p.add_argument("--epochs", type=int, default=None, help="default: the registered recipe's (5)")
    p.add_argument("--limit", type=int, default=10000, help="training images")
    p.add_argument("--test-limit", type=int, default=1000, help="test images scored after training (PyTorch)")
    p.add_argument("--eval-limit", type=int, default=2000, help="test images scored through the runtime")
    p.add_argument("--lr", type=float, default=None, help="default: the registered recipe's (Adam 2e-3, batch 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench_autoencoders")
    p.add_argument("--json", default=None, help="result file (default bench/results/autoencoders.json)")
    args = p.parse_args()
    rows = [run_model(name, args, Path(args.out)) for name in args.models.split(",")]
    body = []
    for row in rows:
        for precision, r in row["precisions"].items():
            own = max(r["noisy"], key=lambda n: n["gain"])
            body.append([row["model"], precision, f"{r['psnr']:.2f}", f"{r['ssim']:.3f}",
                         f"{own['noise']} {own['level']:g}: {own['input_psnr']:.1f} -> {own['output_psnr']:.1f}",
                         "" if r.get("elbo") is None else f"{r['elbo']:.1f}"])
    print(table(body, ["model", "precision", "PSNR dB", "SSIM", "best denoising (dB)", "ELBO nats"]))
    path = write_result("autoencoders", {
        "dataset": args.dataset, "epochs": args.epochs, "train_images": args.limit, "eval_images": args.eval_limit,
        "lr": args.lr, "recipe": "the registered default (TrainRecipe in training/models/autoencoders.py) unless "
                                 "--epochs/--lr are given",
        "note": "short runs on a shared, busy 2-core machine (seconds are not comparable); PSNR/SSIM/ELBO are "
                "through the runtime on the first eval_images test images; noisy rows use seeded corruption",
        "models": rows}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
