"""Training-loop throughput: dlpipe's loop (DataLoader over the in-memory dataset, per-batch
normalisation, metrics, progress bar) against a bare PyTorch loop over pre-normalised tensors,
same model and batch size, epochs alternated so both see the same machine load.

Target (issue 2): dlpipe sustains at least 90% of the bare loop's samples per second.

    python bench/train_throughput.py --data-dir ../shared/data
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
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.training import data as datasets  # noqa: E402
from dlpipe.training.registry import get_spec  # noqa: E402
from dlpipe.training.tasks.classification import classification_loss  # noqa: E402
from dlpipe.training.train import build_optimizer, train_one_epoch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deep_convnet")
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    info = datasets.get_dataset("mnist")
    images, labels = datasets.load_split("mnist", "train", args.data_dir, limit=args.images)
    x_u8, y = datasets.to_nchw(images), torch.from_numpy(labels)
    x = datasets.normalize(x_u8, info)
    model_args = {"in_channels": 1, "image_size": [28, 28], "num_classes": 10}

    def fresh():
        torch.manual_seed(0)
        m = get_spec(args.model).build(**model_args)
        return m, build_optimizer("adam", m.parameters(), 1e-3, 0.9, 0.0)

    def bare_epoch(model, opt):
        model.train()
        perm = torch.randperm(len(y))
        start = time.perf_counter()
        for i in range(0, len(y), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss, _ = classification_loss(model(x[idx]), y[idx])  # GoogLeNet: + auxiliary losses
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return len(y) / (time.perf_counter() - start)

    ds = datasets.ImageTensorDataset(x_u8, y, info)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, collate_fn=datasets.batch_collate)

    def dlpipe_epoch(model, opt):
        with tqdm(total=len(ds), unit="img", leave=False) as bar:
            return train_one_epoch(model, loader, opt, progress=bar)["samples_per_s"]

    bare_m, bare_o = fresh()
    dl_m, dl_o = fresh()
    bare_epoch(bare_m, bare_o)  # warm-up epoch for each
    dlpipe_epoch(dl_m, dl_o)
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(bare_epoch(bare_m, bare_o))
        ours.append(dlpipe_epoch(dl_m, dl_o))
    ratio = statistics.median(ours) / statistics.median(bare)
    print(table([["bare PyTorch loop", f"{statistics.median(bare):.0f}", ", ".join(f"{v:.0f}" for v in bare)],
                 ["dlpipe train_one_epoch", f"{statistics.median(ours):.0f}", ", ".join(f"{v:.0f}" for v in ours)]],
                ["loop", "median samples/s", "per epoch"]))
    print(f"ratio {ratio:.3f}  {'PASS' if ratio >= 0.9 else 'FAIL'}  dlpipe >= 90% of bare")
    path = write_result("train_throughput", {"model": args.model, "batch_size": args.batch_size, "images": args.images,
                                             "bare_samples_per_s": bare, "dlpipe_samples_per_s": ours,
                                             "ratio": ratio, "targets": {"dlpipe >= 90% of bare loop": ratio >= 0.9}},
                        args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
