"""Mixed-precision training on this CPU (issue 14): bf16 autocast (``dlpipe train --amp bf16``) against
float32, training images/s and final accuracy, for deep_convnet on MNIST and fcn8s on shapes scenes,
through ``dlpipe train``'s own library call. The two precisions alternate epoch-run by epoch-run
(fp32, bf16, fp32, bf16...) so both see the same machine load; the figures are the medians.

It first records what the CPU offers (``lscpu``'s avx512_bf16 / amx_bf16 flags and torch's CPU
capability): bf16 matmuls and convolutions are fast only where oneDNN has bf16 kernels for them.

    python bench/amp.py --data-dir ../shared/data                      # short: a subset, 1 epoch, 1 round
    python bench/amp.py --data-dir ../shared/data --limit-mnist 54000 --limit-scenes 27000 --epochs 3 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.training.train import train_command  # noqa: E402


def cpu_support() -> dict:
    """What this CPU and torch offer for bf16."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16_supported": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: None)())}


def run(model: str, dataset: str, amp: str, args, out: Path) -> dict:
    result, _ = train_command(model, progress=False, dataset=dataset, amp=amp, epochs=args.epochs,
                              limit=args.limit_mnist if dataset == "mnist" else args.limit_scenes,
                              threads=args.threads, batch_size=args.batch, out=str(out), data_dir=args.data_dir,
                              test_limit=args.test_limit)
    metric = result["metric"].removeprefix("val_")
    rates = [row["samples_per_s"] for row in result["history"]]
    return {"images_per_s": statistics.median(rates), "best_val": result["best_val_score"],
            "test": result[f"test_{metric}"], "metric": metric, "final_train_loss": result["history"][-1]["train_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit-mnist", type=int, default=6000)
    p.add_argument("--limit-scenes", type=int, default=1200)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="Alternating fp32/bf16 runs per model.")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/bench_amp")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = {}
    for model, dataset in [("deep_convnet", "mnist"), ("fcn8s", "shapes-scenes")]:
        runs = {"off": [], "bf16": []}
        for r in range(args.rounds):
            for amp in runs:
                runs[amp].append(run(model, dataset, amp, args, Path(args.out) / model / f"{amp}{r}"))
        summary = {amp: {"images_per_s": statistics.median(x["images_per_s"] for x in rs),
                         "best_val": statistics.median(x["best_val"] for x in rs),
                         "test": statistics.median(x["test"] for x in rs), "metric": rs[0]["metric"], "runs": rs}
                   for amp, rs in runs.items()}
        summary["bf16_speedup"] = summary["bf16"]["images_per_s"] / summary["off"]["images_per_s"]
        rows[model] = {"dataset": dataset, **summary}
    print(table([[m, r["off"]["metric"], f"{r['off']['images_per_s']:.0f}", f"{r['bf16']['images_per_s']:.0f}",
                  f"{r['bf16_speedup']:.2f}", f"{r['off']['test']:.4f}", f"{r['bf16']['test']:.4f}"]
                 for m, r in rows.items()],
                ["model", "metric", "fp32 img/s", "bf16 img/s", "speed-up", "fp32 test", "bf16 test"]))
    path = write_result("amp", {
        "cpu": cpu_support(), "threads": args.threads, "results": rows,
        "note": ("timed on a shared, busy 2-core machine (other jobs running): throughput figures are indicative "
                 "only and the lead re-runs them alone; accuracy figures hold. bf16 autocast casts weights and "
                 "activations at every autocast op boundary; on small convolutions (MNIST 28x28, 64x64 scenes, "
                 "narrow layers) those casts and reorders can cost more than the bf16 kernels save, and ops "
                 "without bf16 kernels (pooling, batch norm in float, the loss) run as before."),
    }, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
