"""Inference speed on this CPU, measured side by side in one run (interleaved rounds, medians).

Targets (issue 2): ONNX fp32 through the runtime >= 3x faster than PyTorch eager at batch 1;
int8 >= 1.5x faster than fp32 at batch 64; the runtime's own overhead over a bare
``InferenceSession.run`` under 10% at batch 1.

    python bench/latency.py --checkpoint runs/bench_mnist/train/best.pt --onnx runs/bench_mnist/deep_convnet.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.runtime import Engine, load  # noqa: E402
from dlpipe.runtime.benchmark import measure_interleaved  # noqa: E402
from dlpipe.runtime.formats import variant_path  # noqa: E402
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from dlpipe.training.data import load_split  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--onnx", required=True, help="fp32 model; its .int8.onnx variant is used beside it")
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3, help="whole comparisons; ratios are medians over them")
    p.add_argument("--threads", type=int, default=None, help="for both torch and onnxruntime (default: all cores)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = model_from_checkpoint(load_checkpoint(args.checkpoint))
    fp32 = Engine(args.onnx, device="cpu", threads=args.threads)
    int8 = Engine(variant_path(args.onnx, "int8"), device="cpu", threads=args.threads)
    classifier = load(args.onnx, device="cpu", threads=args.threads)
    images, _ = load_split(fp32.info.raw["dataset"], "test", args.data_dir, limit=64)
    from dlpipe.runtime.images import preprocess

    x64 = preprocess(list(images), fp32.info.preprocessing)
    x1 = x64[:1]
    name = fp32.input_names[0]

    def eager(x):
        t = torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                return module(t)
        return run

    session = fp32.session
    b1_runners = {
        "pytorch eager fp32": eager(x1),
        "session.run fp32 (bare onnxruntime)": lambda: session.run(None, {name: x1}),
        "Engine.run fp32 (dlpipe runtime)": lambda: fp32.run({name: x1}),
        "Classifier.predict fp32 (uint8 image in, labels out)": lambda: classifier.predict(images[0]),
        "Engine.run int8": lambda: int8.run({name: x1}),
    }
    b64_runners = {
        "pytorch eager fp32": eager(x64),
        "Engine.run fp32 (dlpipe runtime)": lambda: fp32.run({name: x64}),
        "Engine.run int8": lambda: int8.run({name: x64}),
    }
    assert np.allclose(fp32.run({name: x64})[0], module(torch.from_numpy(x64)).detach().numpy(), atol=1e-3)

    def ratios_of(b1, b64):
        return {
            "onnx_fp32_vs_eager_b1": b1["pytorch eager fp32"].p50_ms / b1["Engine.run fp32 (dlpipe runtime)"].p50_ms,
            "int8_vs_fp32_b64": b64["Engine.run fp32 (dlpipe runtime)"].p50_ms / b64["Engine.run int8"].p50_ms,
            "runtime_overhead_b1": b1["Engine.run fp32 (dlpipe runtime)"].p50_ms
            / b1["session.run fp32 (bare onnxruntime)"].p50_ms - 1,
            "classifier_overhead_b1": b1["Classifier.predict fp32 (uint8 image in, labels out)"].p50_ms
            / b1["session.run fp32 (bare onnxruntime)"].p50_ms - 1,
            "onnx_fp32_vs_eager_b64": b64["pytorch eager fp32"].p50_ms / b64["Engine.run fp32 (dlpipe runtime)"].p50_ms,
            "int8_vs_fp32_b1": b1["Engine.run fp32 (dlpipe runtime)"].p50_ms / b1["Engine.run int8"].p50_ms,
        }

    repeats = []
    for _ in range(args.repeats):
        b1 = measure_interleaved(b1_runners, batch=1, warmup=50, iters=args.iters, rounds=10)
        b64 = measure_interleaved(b64_runners, batch=64, warmup=10, iters=max(50, args.iters // 4), rounds=10)
        repeats.append({"b1": b1, "b64": b64, "ratios": ratios_of(b1, b64)})
    ratios = {k: float(np.median([r["ratios"][k] for r in repeats])) for k in repeats[0]["ratios"]}
    spread = {k: [round(min(r["ratios"][k] for r in repeats), 3), round(max(r["ratios"][k] for r in repeats), 3)]
              for k in ratios}
    middle = sorted(repeats, key=lambda r: r["ratios"]["int8_vs_fp32_b64"])[len(repeats) // 2]
    b1, b64 = middle["b1"], middle["b64"]
    targets = {"onnx fp32 >= 3x eager at batch 1": ratios["onnx_fp32_vs_eager_b1"] >= 3,
               "int8 >= 1.5x fp32 at batch 64": ratios["int8_vs_fp32_b64"] >= 1.5,
               "runtime overhead < 10% at batch 1": ratios["runtime_overhead_b1"] < 0.10}
    print(f"latencies of the repeat with the median int8/fp32 ratio (of {args.repeats}):")
    rows = [[s.name, s.batch, f"{s.p50_ms:.3f}", f"{s.p90_ms:.3f}", f"{s.p99_ms:.3f}", f"{s.throughput:.0f}"]
            for s in [*b1.values(), *b64.values()]]
    print(table(rows, ["runner", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s"]))
    print(table([[k, f"{v:.3f}", f"{spread[k][0]:.3f} - {spread[k][1]:.3f}"] for k, v in ratios.items()],
                ["ratio", f"median of {args.repeats}", "range"]))
    for t, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {t}")
    path = write_result("latency", {"model": args.onnx, "threads": args.threads,
                                    "stats": [s.as_dict() for s in [*b1.values(), *b64.values()]],
                                    "ratios": ratios, "ratio_range": spread, "repeats": args.repeats,
                                    "per_repeat_ratios": [r["ratios"] for r in repeats], "targets": targets},
                        args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
