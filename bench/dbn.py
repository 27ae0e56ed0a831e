"""DBN pretraining (issue 15): a stack of RBMs trained greedily with CD-1 on MNIST's training images (no labels),
unrolled into the ``dbn`` classifier and fine-tuned with back-propagation, against the same network from scratch
(Xavier initialisation) with the same recipe, images and epochs; with few labels (the first ``--limit`` training
images, about 100 per class: their per-class counts are recorded) and with all of them. The first pretrained
few-label model is also exported, quantized to int8 and scored through the runtime.

The texts report DBN-pretrained MLPs around 98.7% on full MNIST (Hinton et al., 2006: 784-500-500-2000, 1.25%
error). The full run (long on 2 cores):

    OMP_NUM_THREADS=1 python bench/dbn.py --labels 1000,all --seeds 0,1,2 --full-epochs 20 --data-dir ../shared/data

The reduced run recorded in bench/results/dbn.json (its ``command``): all-label runs with one seed, ``--full-seeds 0``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.export.evaluate import evaluate_onnx  # noqa: E402
from dlpipe.export.onnx_export import export_checkpoint  # noqa: E402
from dlpipe.export.quantize import QuantizationConfig, quantize  # noqa: E402
from dlpipe.runtime.formats import variant_path  # noqa: E402
from dlpipe.training.data import load_split  # noqa: E402
from dlpipe.training.registry import get_spec  # noqa: E402
from dlpipe.training.tasks import features  # noqa: E402
from dlpipe.training.train import TrainConfig, train  # noqa: E402


def pretrain(args: argparse.Namespace, hidden: list[int], out: Path) -> dict:
    """The RBM stack on the training images (labels unused), the registered recipe but for the given flags."""
    cfg = TrainConfig(model="rbm", out=str(out / "rbm"), epochs=args.rbm_epochs, limit=args.rbm_limit,
                      test_limit=args.test_limit, model_args={"hidden": hidden}, seed=0, threads=args.threads,
                      data_dir=args.data_dir, progress=False)
    r = features.train(cfg, cd_k=args.cd_k, persistent=args.persistent or None)
    return {"checkpoint": r["best"], "val_recon_error": r["val_recon_error"], "test_recon_error": r["test_recon_error"],
            "pseudo_likelihood": r["val_pseudo_likelihood"], "train_seconds": r["train_seconds"],
            "samples": r["samples"], "filters": r["filters"],
            "per_layer": [{k: row[k] for k in ("layer", "epoch", "val_recon_error", "val_pseudo_likelihood")}
                          for row in r["history"] if row["epoch"] == max(h["epoch"] for h in r["history"])]}


def fine_tune(args, hidden, limit, epochs, seed, init_from, out: Path) -> dict:
    cfg = TrainConfig(model="dbn", out=str(out), epochs=epochs, limit=limit, test_limit=args.test_limit, seed=seed,
                      model_args={"hidden": hidden}, init_from=init_from, threads=args.threads,
                      data_dir=args.data_dir, progress=False)
    r = train(cfg)
    return {"test_acc": r["test_acc"], "best_val_acc": r["best_val_score"], "train_seconds": r["train_seconds"],
            "checkpoint": r["best"]}


def deploy(checkpoint: str, out: Path, data_dir: str | None) -> dict:
    """fp32 and int8 accuracy of a fine-tuned DBN through the runtime, on the whole test split."""
    fp32 = out / "dbn.onnx"
    export_checkpoint(checkpoint, fp32)
    quantize(fp32, variant_path(fp32, "int8"), QuantizationConfig("int8", calibration_size=256), data_dir=data_dir)
    return {p: evaluate_onnx(path, "mnist", data_dir=data_dir, device="cpu")["accuracy"]
            for p, path in (("fp32", fp32), ("int8", variant_path(fp32, "int8")))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--labels", default="1000,all", help="labelled training images: the first N, or all")
    p.add_argument("--hidden", default=None, help="RBM/DBN widths, comma-separated (default: the recipe's)")
    p.add_argument("--rbm-epochs", type=int, default=None, help="epochs per RBM (default: the rbm recipe's)")
    p.add_argument("--rbm-limit", type=int, default=None, help="unlabelled pretraining images (default: all)")
    p.add_argument("--cd-k", type=int, default=1)
    p.add_argument("--persistent", action="store_true")
    p.add_argument("--pretrained", default=None, help="reuse an rbm best.pt instead of pretraining")
    p.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs with few labels")
    p.add_argument("--full-epochs", type=int, default=None, help="fine-tuning epochs with all labels (recipe's)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the few-label runs")
    p.add_argument("--full-seeds", default=None, help="seeds of the all-label runs (default: --seeds)")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench_dbn")
    p.add_argument("--json", default=None, help="result file (default bench/results/dbn.json)")
    args = p.parse_args()
    out = Path(args.out)
    hidden = ([int(h) for h in args.hidden.split(",")] if args.hidden
              else list(get_spec("dbn").recipe.model_args["hidden"]))
    rbm = ({"checkpoint": args.pretrained} if args.pretrained else pretrain(args, hidden, out))
    for name in ("samples", "filters") if "samples" in rbm else ():  # the pictures beside the figures
        shutil.copyfile(rbm[name], RESULTS / f"dbn_{name}.png")
    _, train_labels = load_split("mnist", "train", args.data_dir)
    rows, table_rows, deployed = [], [], None
    for labels in args.labels.split(","):
        limit = None if labels == "all" else int(labels)
        epochs = args.epochs if limit else (args.full_epochs or get_spec("dbn").recipe.epochs)
        counts = np.bincount(train_labels[:limit], minlength=10).tolist()
        for arm, init in (("pretrained", rbm["checkpoint"]), ("scratch", None)):
            runs = [fine_tune(args, hidden, limit, epochs, int(s), init, out / f"{labels}_{arm}_s{s}")
                    for s in (args.seeds if limit else args.full_seeds or args.seeds).split(",")]
            accs = [r["test_acc"] for r in runs]
            rows.append({"labels": labels, "per_class_counts": counts, "arm": arm, "epochs": epochs, "runs": runs,
                         "test_acc_mean": statistics.mean(accs),
                         "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
            table_rows.append([labels, arm, epochs, len(runs), f"{100 * statistics.mean(accs):.2f}"])
            if deployed is None and arm == "pretrained":
                deployed = deploy(runs[0]["checkpoint"], out, args.data_dir)
    print(table(table_rows, ["labels", "start", "epochs", "seeds", "test acc %"]))
    path = write_result("dbn", {
        "hidden": hidden, "rbm": rbm, "rbm_recipe": get_spec("rbm").recipe_for("mnist"),
        "rbm_options": {"epochs": args.rbm_epochs, "limit": args.rbm_limit, "cd_k": args.cd_k,
                        "persistent": args.persistent}, "dbn_recipe": get_spec("dbn").recipe_for("mnist"),
        "results": rows,
        "deployed_first_pretrained": deployed,
        "note": ("labelled images are the first N of MNIST's training split, of which 10% are held out for "
                 "validation (best.pt); the RBMs pretrain on all training images without labels; timings on a "
                 "shared, busy 2-core machine")}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
