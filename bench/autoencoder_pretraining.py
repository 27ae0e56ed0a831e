"""Unsupervised pretraining payoff (issue 15): a convolutional denoising autoencoder (``dae``; or with
``--autoencoder ae`` the stacked fully connected one) is trained on
unlabelled MNIST training images; ``ae_classifier`` (the same encoder, named alike, plus a linear head) is
then fine-tuned from it (``--init-from``) on the first ``--labels`` labelled training images (about 100
per class; 10% of them held out for choosing best.pt), against the same network from random weights with the
same images, epochs, optimizer and learning rates (``--lrs``: each arm and seed keeps the one its validation
images prefer). Three seeds; test accuracy on the full test split.

    python bench/autoencoder_pretraining.py --data-dir ../shared/data --pretrain-limit 60000 --pretrain-epochs 8
    python bench/autoencoder_pretraining.py --autoencoder ae --name autoencoder_pretraining_fc   # the stacked FC one
    python bench/autoencoder_pretraining.py --pretrained runs/bench_ae_pretraining/dae/best.pt --lrs 1e-3,3e-4
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.training.checkpoint import load_checkpoint  # noqa: E402
from dlpipe.training.data import load_split  # noqa: E402
from dlpipe.training.loop import split_indices  # noqa: E402
from dlpipe.training.train import TrainConfig, train  # noqa: E402


def label_counts(dataset: str, limit: int, seed: int, data_dir: str | None) -> dict[str, list[int]]:
    """Images per class among the first ``limit`` labelled images: all of them, and the training part of
    the seed's split (the rest chooses best.pt)."""
    _, labels = load_split(dataset, "train", data_dir, limit)
    train_idx, _ = split_indices(len(labels), 0.1, seed)
    return {"all": np.bincount(labels, minlength=10).tolist(),
            "training": np.bincount(labels[train_idx.numpy()], minlength=10).tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--autoencoder", choices=["dae", "ae"], default="dae",
                   help="dae (conv encoder) or ae (the stacked fully connected one: ae_classifier arch=fc)")
    p.add_argument("--pretrained", default=None, help="reuse an autoencoder checkpoint instead of pretraining")
    p.add_argument("--pretrain-limit", type=int, default=20000, help="unlabelled images the dae trains on")
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--labels", type=int, default=1000, help="first N labelled training images (~100 per class)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lrs", default="1e-3", help="learning rates tried per arm and seed; validation picks one")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench_ae_pretraining")
    p.add_argument("--json", default=None, help="result file (default bench/results/autoencoder_pretraining.json)")
    p.add_argument("--name", default="autoencoder_pretraining", help="result name (bench/results/NAME.json)")
    args = p.parse_args()
    out = Path(args.out)
    if args.pretrained is None:
        result = train(TrainConfig(model=args.autoencoder, dataset=args.dataset, epochs=args.pretrain_epochs,
                                   limit=args.pretrain_limit, test_limit=1000, batch_size=64, lr=2e-3,
                                   data_dir=args.data_dir, threads=args.threads, out=str(out / args.autoencoder),
                                   progress=False))
        args.pretrained = result["best"]
    stored = load_checkpoint(args.pretrained)
    pretraining = {"checkpoint": args.pretrained, "model": stored["model"], "model_args": stored["model_args"],
                   "epochs": stored["epoch"], "metrics": stored["metrics"],
                   "images": stored["config"].get("limit"), "labels_used": 0}
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        counts = label_counts(args.dataset, args.labels, seed, args.data_dir)
        for arm in ("pretrained", "scratch"):
            tried = []
            for lr in (float(v) for v in args.lrs.split(",")):
                r = train(TrainConfig(model="ae_classifier", dataset=args.dataset, limit=args.labels,
                                      epochs=args.epochs, batch_size=64, lr=lr, seed=seed, data_dir=args.data_dir,
                                      threads=args.threads, init_from=args.pretrained if arm == "pretrained" else None,
                                      model_args={"arch": "fc"} if args.autoencoder == "ae" else None,
                                      out=str(out / f"{arm}_{seed}_lr{lr:g}"), progress=False))
                tried.append({"arm": arm, "seed": seed, "lr": lr, "test_acc": r["test_acc"],
                              "best_val_acc": r["best_val_score"], "train_seconds": r["train_seconds"],
                              "per_class": counts})
            # each arm keeps the learning rate its own validation images prefer (the test split is not looked at)
            chosen = max(tried, key=lambda t: t["best_val_acc"])
            runs += [{**t, "chosen": t is chosen} for t in tried]
    summary = {}
    for arm in ("pretrained", "scratch"):
        accs = [r["test_acc"] for r in runs if r["arm"] == arm and r["chosen"]]
        summary[arm] = {"mean_test_acc": statistics.mean(accs), "stdev": statistics.stdev(accs) if len(accs) > 1
                        else 0.0, "runs": accs}
    summary["gain_points"] = 100 * (summary["pretrained"]["mean_test_acc"] - summary["scratch"]["mean_test_acc"])
    arms = [(arm, s) for arm, s in summary.items() if arm != "gain_points"]
    print(table([[arm, f"{100 * s['mean_test_acc']:.2f}% +- {100 * s['stdev']:.2f}",
                  ", ".join(f"{100 * a:.2f}" for a in s["runs"])] for arm, s in arms],
                ["arm", "test accuracy (mean +- sd)", "per seed"]))
    print(f"pretraining gain: {summary['gain_points']:+.2f} points")
    path = write_result(args.name, {
        "dataset": args.dataset, "autoencoder": args.autoencoder, "labelled_images": args.labels,
        "epochs": args.epochs, "lrs": args.lrs,
        "batch_size": 64, "optimizer": "adam", "pretraining": pretraining, "summary": summary, "runs": runs,
        "note": "ae_classifier from the autoencoder's encoder (--init-from, every encoder tensor copied) vs from "
                "random "
                "weights; same images, epochs, optimizer and learning rates; 10% of the labelled images choose "
                "best.pt and, per arm and seed, the learning rate; test accuracy on the full test split. Short runs "
                "on a shared, busy machine."}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
