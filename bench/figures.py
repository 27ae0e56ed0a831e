"""The README's figures (issue 18), made for real through the ``dlpipe`` commands a user runs: a short LeNet-5
run on the shapes world and its ``curves.png``, ``evaluate --plots`` (the confusion matrix of fp32 and int8),
and ``bench --plot`` of fp32, fp16 and int8. Under ``bench/results/figures/``: the run's ``metrics.jsonl``
with ``curves.png`` beside it, ``evaluate/<variant>.json`` with ``<variant>_confusion.png``, ``bench.json``
with ``bench.png``, and ``figures.json`` (the commands, timings and figures). About two minutes on 2 cores.

    python bench/figures.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_result  # noqa: E402

from dlpipe.apps.cli import cli  # noqa: E402


def dlpipe(*args: object) -> list[str]:
    """Run one ``dlpipe`` command in this process, as the command line runs it; the arguments as given."""
    argv = [str(a) for a in args]
    print("$ dlpipe " + " ".join(argv), flush=True)
    cli.main(argv, prog_name="dlpipe", standalone_mode=False)
    return argv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/figures", help="checkpoints and ONNX files (not kept in results)")
    p.add_argument("--out", default=str(RESULTS / "figures"))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--limit", type=int, default=20000, help="training images of the shapes world")
    args = p.parse_args()
    work, out = Path(args.work), Path(os.path.relpath(args.out))  # relative paths in the commands recorded
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    commands, seconds = [], {}

    started = time.perf_counter()
    commands.append(dlpipe("train", "lenet5", "--dataset", "shapes", "--epochs", args.epochs, "--limit", args.limit,
                           "--test-limit", 1000, "--optimizer", "adam", "--lr", 3e-3, "--schedule", "onecycle",
                           "--out", work / "run", "--no-progress"))
    seconds["train"] = time.perf_counter() - started
    (out / "train").mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "curves.png"):  # the PNG beside the JSON it comes from
        shutil.copyfile(work / "run" / name, out / "train" / name)

    started = time.perf_counter()
    model = work / "lenet5.onnx"
    commands.append(dlpipe("export", work / "run" / "best.pt", "--out", model))
    commands.append(dlpipe("quantize", model, "--to", "fp16"))
    commands.append(dlpipe("quantize", model, "--to", "int8", "--calibration-size", 256))
    seconds["export_quantize"] = time.perf_counter() - started
    variants = [model, work / "lenet5.fp16.onnx", work / "lenet5.int8.onnx"]

    started = time.perf_counter()
    commands.append(dlpipe("evaluate", variants[0], variants[2], "--plots", out / "evaluate"))
    seconds["evaluate"] = time.perf_counter() - started

    started = time.perf_counter()
    commands.append(dlpipe("bench", *variants, "--batch", "1,64", "--iters", 200, "--threads", 1,
                           "--plot", out / "bench.png"))
    seconds["bench"] = time.perf_counter() - started

    figures = sorted(str(f.relative_to(out)) for f in out.rglob("*.png"))
    path = write_result("figures", {"commands": [" ".join(["dlpipe", *c]) for c in commands],
                                    "seconds": {k: round(v, 1) for k, v in seconds.items()},
                                    "total_seconds": round(sum(seconds.values()), 1), "figures": figures},
                        out=str(out / "figures.json"))
    print(f"wrote {path} and {len(figures)} figures: {', '.join(figures)}")


if __name__ == "__main__":
    main()
