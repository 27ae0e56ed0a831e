"""Training-step time of the CNN classifiers in the NCHW and the channels-last memory layout, and AlexNet's
local response normalisation as PyTorch's module and as dlpipe's (a banded 1x1 convolution over the squares).

The loop trains a model channels-last when its ``ModelSpec.channels_last`` says so; this script shows why, per
model: one Adam step (forward, loss, backward, update) on a batch of 28x28 grayscale images, the two variants
built from the same seed and timed side by side in alternating rounds on one thread. Speed does not depend on
the values, so the images are normal noise. Medians of the per-round times and their ratio.

    python bench/train_layout.py                 # ~3 min on one quiet core
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import write_result  # noqa: E402
from torch import nn  # noqa: E402

from dlpipe.training.models.classic import LocalResponseNorm  # noqa: E402
from dlpipe.training.registry import get_spec, list_models  # noqa: E402
from dlpipe.training.tasks.classification import classification_loss  # noqa: E402

SIZE, CLASSES = 28, 10


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return get_spec(name).build(in_channels=1, image_size=[SIZE, SIZE], num_classes=CLASSES).train()


def _torch_lrn(model: nn.Module) -> nn.Module:
    """``model`` with each of dlpipe's LRN modules swapped for PyTorch's own (the same arguments)."""
    for parent in model.modules():
        for key, child in parent.named_children():
            if isinstance(child, LocalResponseNorm):
                setattr(parent, key, nn.LocalResponseNorm(child.size, child.alpha, child.beta, child.k))
    return model


def side_by_side(models: dict[str, nn.Module], batch: int, rounds: int, steps: int) -> dict[str, float]:
    """Median milliseconds of one training step per variant, over ``rounds`` alternating blocks of ``steps``."""
    x, y = torch.randn(batch, 1, SIZE, SIZE), torch.randint(0, CLASSES, (batch,))
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}

    def step(key: str) -> None:
        optimizers[key].zero_grad()
        loss, _ = classification_loss(models[key](x), y)
        loss.backward()
        optimizers[key].step()

    for key in models:  # warm-up: oneDNN picks and caches its kernels on the first calls
        step(key)
        step(key)
    for _ in range(rounds):
        for key in models:
            start = time.perf_counter()
            for _ in range(steps):
                step(key)
            times[key].append((time.perf_counter() - start) / steps * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(["lenet5"] + [n for n in list_models() if get_spec(n).channels_last]))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps a round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="result file (default bench/results/train_layout.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        ms = side_by_side({"nchw": _build(name), "channels_last": _build(name).to(memory_format=torch.channels_last)},
                          args.batch, args.rounds, args.steps)
        rows.append({"model": name, "registry_channels_last": get_spec(name).channels_last, "step_ms": ms,
                     "speedup": ms["nchw"] / ms["channels_last"]})
        print(f"{name:>13}: NCHW {ms['nchw']:7.1f} ms, channels-last {ms['channels_last']:7.1f} ms a step: "
              f"{rows[-1]['speedup']:.2f}x", flush=True)
    lrn = side_by_side({"pytorch_lrn": _torch_lrn(_build("alexnet")), "dlpipe_lrn": _build("alexnet")},
                       args.batch, args.rounds, args.steps)
    print(f"      alexnet: PyTorch's LRN {lrn['pytorch_lrn']:.1f} ms, dlpipe's {lrn['dlpipe_lrn']:.1f} ms a step "
          f"(NCHW): {lrn['pytorch_lrn'] / lrn['dlpipe_lrn']:.2f}x", flush=True)
    path = write_result("train_layout", {
        "batch": args.batch, "image": [1, SIZE, SIZE], "threads": args.threads, "rounds": args.rounds,
        "steps_a_round": args.steps, "layouts": rows,
        "alexnet_lrn": {"step_ms": lrn, "speedup": lrn["pytorch_lrn"] / lrn["dlpipe_lrn"]}}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
