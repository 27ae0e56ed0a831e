"""The CUDA path on a real GPU: onnxruntime's CPU provider vs its CUDA provider, plain (``Engine.run``, numpy in
and out, so the host-device copies are included) and through IO binding with inputs and outputs left in the
GPU's memory (``Engine.run_bound(..., on_device=True)``), for fp32, fp16 and int8 variants; medians measured
side by side (interleaved rounds) at several batch sizes. Also: each variant's CUDA outputs against the CPU
provider's on the same inputs (max |diff| at two batch sizes), the time to a first answer (session creation
plus the first run, where cuDNN picks its algorithms), and, given MNIST, every variant's test accuracy on the
GPU beside the CPU's. fp32 models run with TF32 convolutions (onnxruntime's default and the engine's) and
are also timed with TF32 off (``Engine(tf32=False)``: float32 as the CPU computes it).

Needs a machine with a GPU and onnxruntime-gpu whose CUDA/cuDNN libraries load (the engine asks onnxruntime
to load them from the nvidia-* pip packages when they are not on the library path). The models are made on
any machine first:

    dlpipe export torchvision:mobilenet_v2 --weights ../shared/weights/mobilenet_v2-b0353104.pth --out mnv2.onnx
    dlpipe quantize mnv2.onnx --to fp16 --calibration fashion-mnist
    dlpipe quantize mnv2.onnx --to int8 --calibration fashion-mnist --min-agreement 0
    python bench/gpu.py --models mnv2.onnx mnv2.fp16.onnx mnv2.int8.onnx dc.onnx dc.fp16.onnx dc.int8.onnx \
        --photos docs/photos --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import write_result  # noqa: E402

from dlpipe.runtime import Engine, load  # noqa: E402
from dlpipe.runtime.benchmark import engine_runners, measure_interleaved, random_input  # noqa: E402

CELL_SECONDS = 3.0  # timing budget of the slowest runner in one (model, batch) cell


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def first_answer(path: str, device: str, batch: int, tf32: bool = True) -> tuple[Engine, float]:
    """An engine and the seconds from nothing to its first answer at ``batch``."""
    t0 = time.perf_counter()
    engine = Engine(path, device=device, tf32=tf32)
    engine.run(random_input(engine, batch))
    return engine, time.perf_counter() - t0


def max_diff(a: Engine, b: Engine, batches: list[int]) -> dict[str, float]:
    out = {}
    for batch in batches:
        feeds = random_input(a, batch, seed=batch)
        out[f"b{batch}"] = float(max(np.abs(x.astype(np.float64) - y).max() for x, y in zip(a.run(feeds), b.run(feeds))))
    return out


def latency(engines: dict[str, Engine], batches: list[int], rounds: int) -> list[dict]:
    rows = []
    for batch in batches:
        runners = {}
        for name, engine in engines.items():
            runners.update(engine_runners(name, engine, random_input(engine, batch)))
        slowest = 0.0
        for fn in runners.values():  # warm-up, and the slowest call sets how many calls fit the budget
            fn()
            t0 = time.perf_counter()
            fn()
            slowest = max(slowest, time.perf_counter() - t0)
        iters = int(max(rounds * 2, min(200, CELL_SECONDS / max(slowest, 1e-6))))
        stats = measure_interleaved(runners, batch, warmup=3, iters=iters, rounds=rounds, pause_s=0.02)
        for s in stats.values():
            rows.append({**s.as_dict(), "items_per_s": s.throughput})
        print(f"  b{batch}: " + ", ".join(f"{n} {s.p50_ms:.3f} ms" for n, s in stats.items()), flush=True)
    return rows


def accuracy(models: list[str], data_dir: str, dataset: str) -> list[dict]:
    """Test accuracy of each classifier on the CPU and on the GPU, and how often the two agree."""
    from dlpipe.training.data import load_split  # the MNIST reader (torchvision); the runtime itself needs no torch

    images, labels = load_split(dataset, "test", data_dir)
    rows = []
    for model in models:
        predicted = {device: load(model, device=device).logits(images, batch_size=256).argmax(1)
                     for device in ("cpu", "cuda")}
        rows.append({"model": Path(model).name, "dataset": dataset, "images": len(labels),
                     "accuracy_cpu": float((predicted["cpu"] == labels).mean()),
                     "accuracy_cuda": float((predicted["cuda"] == labels).mean()),
                     "top1_agreement_cpu_cuda": float((predicted["cpu"] == predicted["cuda"]).mean())})
        print(f"  {rows[-1]}", flush=True)
    return rows


def photos(models: list[str], folder: str) -> list[dict]:
    files = sorted(str(p) for p in Path(folder).glob("*.jpg"))
    rows = []
    for model in models:
        for device in ("cpu", "cuda"):
            results = load(model, device=device).predict(files, top_k=5)
            rows.append({"model": Path(model).name, "device": device,
                         "top5": {Path(f).name: [(label, round(score, 4)) for label, score in r.top_k]
                                  for f, r in zip(files, results)}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="ONNX files; '<stem>.fp16/.int8' group with <stem>")
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cpu-for", default="fp32,int8", help="precisions also timed on the CPU provider")
    parser.add_argument("--data-dir", default=os.environ.get("DLPIPE_DATA_DIR"))
    parser.add_argument("--dataset", default="mnist", help="for --accuracy-models")
    parser.add_argument("--accuracy-models", nargs="*", default=[], help="classifiers to evaluate on --dataset")
    parser.add_argument("--photos", default=None, help="folder of .jpg photographs for the ImageNet models' top-5")
    parser.add_argument("--photo-models", nargs="*", default=[])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    cpu_for = set(args.cpu_for.split(","))

    result: dict = {"gpu": gpu_name(), "models": {}}
    for path in args.models:
        name = Path(path).name
        print(name, flush=True)
        gpu, first_gpu_s = first_answer(path, "cuda", batches[0])
        cpu, first_cpu_s = first_answer(path, "cpu", batches[0])
        precision = gpu.info.precision if gpu.info else "fp32"
        entry = {"precision": precision, "providers": gpu.providers,
                 "provider_options": gpu.session.get_provider_options().get("CUDAExecutionProvider", {}),
                 "first_answer_s": {"cuda": first_gpu_s, "cpu": first_cpu_s},
                 "max_abs_diff_cuda_vs_cpu": max_diff(gpu, cpu, [batches[0], batches[-1]])}
        engines = {f"{name} cuda": gpu}
        if precision == "fp32":  # TF32 off: float32 as the CPU computes it
            exact, _ = first_answer(path, "cuda", batches[0], tf32=False)
            entry["max_abs_diff_cuda_no_tf32_vs_cpu"] = max_diff(exact, cpu, [batches[0], batches[-1]])
            engines[f"{name} cuda no-tf32"] = exact
        if precision in cpu_for:
            engines[f"{name} cpu"] = cpu
        entry["latency"] = latency(engines, batches, args.rounds)
        result["models"][name] = entry
    if args.accuracy_models and args.data_dir:
        result["accuracy"] = accuracy(args.accuracy_models, args.data_dir, args.dataset)
    if args.photos and args.photo_models:
        result["photos"] = photos(args.photo_models, args.photos)
    path = write_result("gpu", result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
