"""deep_convnet on full MNIST: test accuracy of fp32, fp16 and int8 through the runtime, per seed.

Trains with the model's registered recipe (``get_spec("deep_convnet").recipe_for("mnist")``: what the plain
``dlpipe train deep_convnet`` runs, issue 19), so the figure measured here is the figure the default command
reaches. Targets: fp32 mean >= 99.38% (the textbook's figure; issue 19 aims at 99.6%), fp16 within 0.05
points and int8 within 0.1 points of fp32 (mean over seeds). The JSON is rewritten after every seed.

    python bench/mnist_accuracy.py --data-dir ../shared/data --seeds 0,1,2 --threads 1   # ~36 CPU-min a seed
    python bench/mnist_accuracy.py --checkpoint runs/bench_mnist/s0/train/best.pt
    python bench/mnist_accuracy.py --seeds 1 --threads 1 --json s1.json ...   # seeds side by side, then:
    python bench/mnist_accuracy.py --merge s0.json s1.json s2.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.export.evaluate import evaluate_onnx  # noqa: E402
from dlpipe.export.onnx_export import export_checkpoint  # noqa: E402
from dlpipe.export.quantize import QuantizationConfig, quantize  # noqa: E402
from dlpipe.runtime.formats import variant_path  # noqa: E402
from dlpipe.training.registry import get_spec  # noqa: E402
from dlpipe.training.train import TrainConfig, train  # noqa: E402

MODEL, DATASET = "deep_convnet", "mnist"
README_CLAIM = 0.9963  # the fp32 figure README.md quotes (mean of seeds 0, 1, 2 of the registered recipe)
PUBLISHED = 0.9938  # the textbook's figure
AIM = 0.996  # issue 19's aim for the default recipe
VARIANTS = ("fp32", "fp16", "int8")


def train_seed(seed: int, out: Path, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Train one seed as ``dlpipe train deep_convnet --seed SEED`` does (every option from the recipe)."""
    result = train(TrainConfig(model=MODEL, dataset=DATASET, recipe=args.recipe, epochs=args.epochs, seed=seed,
                               out=str(out / "train"), data_dir=args.data_dir, threads=args.threads,
                               progress=False))
    return result["best"], {"best_val_acc": result["best_val_score"], "test_acc": result["test_acc"],
                            "epochs": len(result["history"]), "train_seconds": round(result["train_seconds"], 1),
                            "train_cpu_seconds": round(result["train_cpu_seconds"], 1)}


def deploy(ckpt: str, out: Path, data_dir: str | None) -> dict[str, Any]:
    """Export, quantize to fp16 and int8, and score every variant on the 10k test images."""
    fp32 = out / "deep_convnet.onnx"
    export_checkpoint(ckpt, fp32)
    paths, agreement = {"fp32": fp32}, {}
    for precision in ("fp16", "int8"):
        report = quantize(fp32, variant_path(fp32, precision),
                          QuantizationConfig(precision, calibration_size=512), data_dir=data_dir, check_size=2000)
        paths[precision] = Path(report.path)
        agreement[precision] = report.agreement
    acc = {k: evaluate_onnx(v, DATASET, data_dir=data_dir, device="cpu")["accuracy"] for k, v in paths.items()}
    return {"checkpoint": str(ckpt), "test_accuracy": acc,
            "points_lost": {k: round(100 * (acc["fp32"] - acc[k]), 4) for k in ("fp16", "int8")},
            "agreement_with_fp32": agreement, "kib": {k: round(v.stat().st_size / 1024) for k, v in paths.items()}}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for one seed) of each variant's test accuracy and loss."""
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    summary = {k: stats([r["test_accuracy"][k] for r in runs]) for k in VARIANTS}
    summary["points_lost"] = {k: stats([r["points_lost"][k] for r in runs]) for k in ("fp16", "int8")}
    summary["seeds"] = len(runs)
    return summary


def targets(summary: dict[str, Any]) -> dict[str, bool]:
    lost = summary["points_lost"]
    return {f"fp32 mean >= {100 * PUBLISHED:.2f}% (published)": summary["fp32"]["mean"] >= PUBLISHED,
            f"fp32 mean >= {100 * AIM:.1f}% (issue 19's aim)": summary["fp32"]["mean"] >= AIM,
            f"fp32 mean >= {100 * README_CLAIM:.2f}% (README's claim)": summary["fp32"]["mean"] >= README_CLAIM,
            "fp16 loses <= 0.05 points": lost["fp16"]["mean"] <= 0.05,
            "int8 loses <= 0.1 points": lost["int8"]["mean"] <= 0.1}


def report(runs: list[dict[str, Any]], args: argparse.Namespace, recipe: dict[str, Any]) -> None:
    """Print the per-seed table and the targets; (re)write the JSON."""
    rows = [[r.get("seed", "-"), *(f"{100 * r['test_accuracy'][k]:.2f}%" for k in VARIANTS),
             f"{r['training'].get('train_seconds', 0) / 60:.1f}"] for r in runs]
    summary = summarize(runs)
    rows.append(["mean ± std", *(f"{100 * summary[k]['mean']:.2f} ± {100 * summary[k]['std']:.2f}" for k in VARIANTS),
                 "-"])
    print(table(rows, ["seed", "fp32", "fp16", "int8", "train min"]))
    checks = targets(summary)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    command = f"dlpipe train {MODEL}" + (f" --recipe {args.recipe}" if args.recipe != "default" else "")
    path = write_result("mnist_accuracy", {
        "model": MODEL, "dataset": DATASET, "recipe_name": args.recipe, "recipe": recipe,
        "default_command": command + " --seed SEED", "threads": args.threads, "readme_claim": README_CLAIM,
        "published": PUBLISHED, "runs": runs, "summary": summary, "targets": checks}, args.json)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/bench_mnist")
    p.add_argument("--checkpoint", default=None, help="reuse a trained checkpoint instead of training")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    p.add_argument("--recipe", default="default", help="the registered recipe to train with (default: default)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (not the default command)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training")
    p.add_argument("--json", default=None, help="result file (default bench/results/mnist_accuracy.json)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="combine the runs of these result files (one seed each, run side by side) into --json")
    args = p.parse_args()
    recipe = get_spec(MODEL).recipe_for(DATASET, args.recipe) | ({"epochs": args.epochs} if args.epochs else {})
    runs: list[dict[str, Any]] = []
    if args.merge:
        import json

        docs = [json.loads(Path(f).read_text()) for f in args.merge]
        if any(d["recipe"] != recipe or d["recipe_name"] != args.recipe for d in docs):
            sys.exit(f"mnist_accuracy: the files do not all hold the {args.recipe!r} recipe: {args.merge}")
        args.threads = docs[0]["threads"]
        runs = sorted((r | {"command": d["command"]} for d in docs for r in d["runs"]), key=lambda r: r["seed"])
        report(runs, args, recipe)
        return
    if args.checkpoint:
        from dlpipe.training.checkpoint import load_checkpoint

        stored = load_checkpoint(args.checkpoint)
        training = {"config": stored["config"], "metrics": stored["metrics"], "epoch": stored["epoch"]}
        runs.append({"seed": stored["config"].get("seed"), "training": training,
                     **deploy(args.checkpoint, Path(args.out), args.data_dir)})
        report(runs, args, recipe)
        return
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = Path(args.out) / f"s{seed}"
        started = time.perf_counter()
        ckpt, training = train_seed(seed, out, args)
        runs.append({"seed": seed, "training": training, **deploy(ckpt, out, args.data_dir),
                     "wall_seconds": round(time.perf_counter() - started, 1)})
        report(runs, args, recipe)


if __name__ == "__main__":
    main()
