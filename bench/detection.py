"""The R-CNN-style detector on held-out scenes: COCO mAP@0.5 and mAP@[.5:.95] (pycocotools) of fp32,
fp16 and int8 through the runtime, the training time, and batch-1 latency of the runtime beside
PyTorch eager on real scenes.

Targets (issue 3, detector part): mAP@0.5 >= 0.90 on shapes scenes, >= 0.85 on digit scenes; fp16
within 0.5 points and int8 within 2 points of fp32; runtime fp32 faster than eager at batch 1;
training under 20 minutes on 2 CPU cores.

    python bench/detection.py                                   # trains on shapes-boxes first
    python bench/detection.py --dataset mnist-boxes --data-dir ../shared/data --json bench/results/detection_digits.json
    python bench/detection.py --checkpoint runs/bench_rcnn/train/best.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import RESULTS, write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.export.onnx_export import export_checkpoint  # noqa: E402
from dlpipe.export.quantize import QuantizationConfig, quantize  # noqa: E402
from dlpipe.runtime import Engine  # noqa: E402
from dlpipe.runtime.benchmark import measure_interleaved  # noqa: E402
from dlpipe.runtime.formats import variant_path  # noqa: E402
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from dlpipe.training.data import load_split, to_nchw  # noqa: E402
from dlpipe.training.registry import get_spec  # noqa: E402
from dlpipe.export.evaluate import evaluate_onnx  # noqa: E402
from dlpipe.training.train import TrainConfig, train  # noqa: E402

MODEL = "rcnn"  # trained with its registered recipe, what `dlpipe train rcnn` runs (issue 19)
TARGET_MAP50 = {"shapes-boxes": 0.90, "mnist-boxes": 0.85}


def latency(stored: dict, fp32: Path, args) -> tuple[dict, dict]:
    """Batch-1 latency of PyTorch eager and the runtime on the same real held-out scenes, in turn, at each
    thread count of ``--latency-threads`` (both runners alike)."""
    module = model_from_checkpoint(stored)
    images, _ = load_split(stored["dataset"]["name"], "test", args.data_dir, limit=16)
    xs = to_nchw(images).float() / 255
    lat, speedup = {}, {}
    for threads in (int(t) for t in args.latency_threads.split(",")):
        key = f"threads={threads or 'all'}"
        torch.set_num_threads(threads or os.cpu_count())
        engine = Engine(fp32, device="cpu", threads=threads or None)
        state = {"i": 0}

        def nxt() -> torch.Tensor:
            state["i"] = (state["i"] + 1) % len(xs)
            return xs[state["i"]]

        def eager():
            with torch.inference_mode():
                return module(nxt())

        stats = measure_interleaved({"pytorch eager": eager,
                                     "runtime fp32": lambda e=engine: e.run({"image": nxt().numpy()})},
                                    batch=1, warmup=10, iters=args.iters, rounds=10)
        lat[key] = {k: v.as_dict() for k, v in stats.items()}
        speedup[key] = stats["pytorch eager"].p50_ms / stats["runtime fp32"].p50_ms
        print(f"batch-1 latency ({images.shape[1]}x{images.shape[2]}, {key}): eager "
              f"{stats['pytorch eager'].p50_ms:.3f} ms, runtime {stats['runtime fp32'].p50_ms:.3f} ms "
              f"-> {speedup[key]:.2f}x")
    return lat, speedup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="shapes-boxes", choices=sorted(TARGET_MAP50))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="work folder (default runs/bench_rcnn[_digits])")
    p.add_argument("--checkpoint", default=None, help="reuse a trained checkpoint instead of training")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default: all cores)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--latency-threads", default="1,0",
                   help="thread counts for the latency comparison, both runners alike (0: all cores)")
    p.add_argument("--latency-only", action="store_true",
                   help="only re-measure latency (needs --checkpoint and an earlier run's JSON)")
    p.add_argument("--json", default=None, help="result file (default bench/results/detection.json)")
    args = p.parse_args()
    out = Path(args.out or ("runs/bench_rcnn" if args.dataset == "shapes-boxes" else "runs/bench_rcnn_digits"))
    ckpt, train_seconds = args.checkpoint, None
    if ckpt is None:
        start = time.perf_counter()
        ckpt = train(TrainConfig(model=MODEL, epochs=args.epochs, dataset=args.dataset, data_dir=args.data_dir,
                                 threads=args.threads, out=str(out / "train")))["best"]
        train_seconds = time.perf_counter() - start
    stored = load_checkpoint(ckpt)
    fp32 = out / f"{stored['model']}.onnx"
    name = "detection" if stored["dataset"]["name"] == "shapes-boxes" else "detection_digits"
    if args.latency_only:
        previous = json.loads(Path(args.json or RESULTS / f"{name}.json").read_text())
        lat, speedup = latency(stored, fp32, args)
        previous.update(latency_b1=lat, runtime_speedup_b1=speedup, latency_command=" ".join(["python", *sys.argv]))
        previous["targets"]["runtime faster than eager at batch 1"] = min(speedup.values()) > 1
        Path(args.json or RESULTS / f"{name}.json").write_text(json.dumps(previous, indent=2))
        return
    export_checkpoint(ckpt, fp32)
    paths, agreement, kept = {"fp32": fp32}, {}, {}
    for precision in ("fp16", "int8"):
        report = quantize(fp32, variant_path(fp32, precision), QuantizationConfig(precision, calibration_size=128,
                                                                                  min_agreement=0.9),
                          data_dir=args.data_dir, check_size=200)
        paths[precision], agreement[precision], kept[precision] = Path(report.path), report.agreement, report.kept_fp32
    evals = {k: evaluate_onnx(v, device="cpu", data_dir=args.data_dir) for k, v in paths.items()}
    map50 = {k: e["map50"] for k, e in evals.items()}
    points = {k: 100 * (map50["fp32"] - map50[k]) for k in ("fp16", "int8")}

    lat, speedup = latency(stored, fp32, args)
    target = TARGET_MAP50[stored["dataset"]["name"]]
    targets = {f"mAP@0.5 >= {target}": map50["fp32"] >= target, "fp16 within 0.5 points": points["fp16"] <= 0.5,
               "int8 within 2 points": points["int8"] <= 2.0,
               "runtime faster than eager at batch 1": min(speedup.values()) > 1}
    if train_seconds is not None:
        targets["training under 20 minutes"] = train_seconds < 20 * 60
    rows = [[k, f"{map50[k]:.4f}", f"{evals[k]['map']:.4f}", f"{points[k]:+.2f}" if k in points else "-",
             f"{agreement[k]:.2%}" if k in agreement else "-"] for k in paths]
    print(table(rows, ["variant", "mAP@0.5", "mAP@[.5:.95]", "points lost", "detections agree"]))
    if train_seconds is not None:
        print(f"training: {train_seconds / 60:.1f} min")
    for target, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {target}")
    path = write_result(name, {
        "recipe": get_spec(MODEL).recipe_for(stored["dataset"]["name"])
                  | {k: v for k, v in stored.get("config", {}).items() if k in ("epochs", "seed", "recipe")},
        "checkpoint": str(ckpt),
        "training": {"seconds": train_seconds, "epoch": stored.get("epoch"), "metrics": stored.get("metrics")},
        "test_images": evals["fp32"]["images"], "objects": evals["fp32"]["objects"], "map50": map50,
        "map": {k: e["map"] for k, e in evals.items()}, "points_lost": points, "agreement_with_fp32": agreement,
        "kept_fp32": kept, "latency_b1": lat, "runtime_speedup_b1": speedup,
        "targets": targets}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
