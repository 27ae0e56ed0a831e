"""Few-shot transfer (issue 6): a backbone pretrained on one dataset, fine-tuned on another with 10 and
100 labelled images per class, against the same network trained from scratch on the same images with the
same budget (epochs, batch size), over several seeds; then the first seed's 100-shot fine-tuned model is
exported, quantized to int8 and evaluated and used for classification through the runtime.

Target: fine-tuned at least 3 points ahead of scratch at 100 images per class; int8 within 0.5 points.

    OMP_NUM_THREADS=1 python bench/transfer.py --data-dir ../shared/data            # pretrains 3 epochs first
    python bench/transfer.py --pretrained runs/transfer/pretrain_mnist/best.pt --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.export.onnx_export import export_checkpoint  # noqa: E402
from dlpipe.export.quantize import QuantizationConfig, quantize  # noqa: E402
from dlpipe.runtime import load  # noqa: E402
from dlpipe.runtime.formats import variant_path  # noqa: E402
from dlpipe.training.checkpoint import load_checkpoint  # noqa: E402
from dlpipe.training.data import load_split  # noqa: E402
from dlpipe.export.evaluate import evaluate_onnx  # noqa: E402
from dlpipe.training.finetune import FinetuneConfig, finetune  # noqa: E402
from dlpipe.training.train import TrainConfig, train  # noqa: E402

# Same images, epochs, batch size, optimizer (Adam) and learning rate for both arms: only the starting
# weights differ (and the fine-tuned arm spends its first epochs on the new head alone). Fewer images get
# more epochs so both budgets are a few hundred steps.
BUDGET = {10: {"head_epochs": 10, "epochs": 90}, 100: {"head_epochs": 5, "epochs": 25}}
FINETUNE = {"head_lr": 1e-3, "lr": 1e-3}
SCRATCH = {"lr": 1e-3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="deep_convnet")
    p.add_argument("--source", default="mnist", help="pretraining dataset")
    p.add_argument("--target", default="fashion-mnist", help="fine-tuning dataset")
    p.add_argument("--pretrained", default=None, help="reuse a pretrained checkpoint instead of pretraining")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--batch-norm", action="store_true", help="pretrain the model with batch normalisation")
    p.add_argument("--shots", default="10,100", help="labelled images per class, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--freeze", default="none")
    p.add_argument("--lr", type=float, default=FINETUNE["lr"], help="fine-tuning: backbone learning rate")
    p.add_argument("--head-lr", type=float, default=FINETUNE["head_lr"], help="fine-tuning: head learning rate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench_transfer")
    p.add_argument("--json", default=None, help="result file (default bench/results/transfer.json)")
    args = p.parse_args()
    out = Path(args.out)
    shots = [int(s) for s in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    FINETUNE.update(lr=args.lr, head_lr=args.head_lr)
    if args.pretrained is None:
        result = train(TrainConfig(model=args.model, dataset=args.source, epochs=args.pretrain_epochs,
                                   schedule="cosine", batch_norm=args.batch_norm or None, data_dir=args.data_dir,
                                   threads=args.threads, out=str(out / "pretrain"), progress=False))
        args.pretrained = result["best"]
    stored = load_checkpoint(args.pretrained)
    pretraining = {"checkpoint": args.pretrained, "model": stored["model"], "dataset": stored["dataset"]["name"],
                   "epochs": stored["epoch"], "config": stored["config"], "metrics": stored["metrics"]}

    runs = []
    for n in shots:
        for seed in seeds:
            for arm, lrs in (("finetune", FINETUNE), ("scratch", SCRATCH)):
                r = finetune(FinetuneConfig(source=args.pretrained, data=args.target, per_class=n, seed=seed,
                                            scratch=arm == "scratch", freeze=args.freeze, data_dir=args.data_dir,
                                            threads=args.threads, out=str(out / f"{arm}_{n}_{seed}"), progress=False,
                                            **BUDGET[n], **lrs))
                runs.append({"per_class": n, "seed": seed, "arm": arm, "test_acc": r["after"]["test_acc"],
                             "head_only_test_acc": (r["head_only"] or {}).get("test_acc"),
                             "train_images": r["images"]["train"], "val_images": r["images"]["val"],
                             "test_images": r["images"]["test"], "best_epoch": r["best_epoch"],
                             "checkpoint": r["best"]})
                print(f"{n:4d}/class seed {seed} {arm:8s} test {100 * r['after']['test_acc']:.2f}%", flush=True)

    summary, rows = {}, []
    for n in shots:
        acc = {arm: [r["test_acc"] for r in runs if r["per_class"] == n and r["arm"] == arm]
               for arm in ("finetune", "scratch")}
        gains = [100 * (f - s) for f, s in zip(acc["finetune"], acc["scratch"])]
        head = [r["head_only_test_acc"] for r in runs if r["per_class"] == n and r["arm"] == "finetune"]
        summary[n] = {"finetune_mean": statistics.mean(acc["finetune"]),
                      "scratch_mean": statistics.mean(acc["scratch"]),
                      "head_only_mean": statistics.mean(head), "gain_points_mean": statistics.mean(gains),
                      "gain_points_median": statistics.median(gains),
                      "gain_points_per_seed": gains, "seeds": len(gains)}
        sd = (lambda v: f" ± {100 * statistics.stdev(v):.2f}" if len(v) > 1 else "")
        rows.append([n, f"{100 * summary[n]['head_only_mean']:.2f}", f"{100 * summary[n]['finetune_mean']:.2f}"
                     + sd(acc["finetune"]), f"{100 * summary[n]['scratch_mean']:.2f}" + sd(acc["scratch"]),
                     f"{summary[n]['gain_points_mean']:+.2f}", f"{summary[n]['gain_points_median']:+.2f}"])

    # the first seed's 100-shot (largest) fine-tuned model through export, int8 and the runtime
    chosen = next(r for r in runs if r["arm"] == "finetune" and r["per_class"] == max(shots) and r["seed"] == seeds[0])
    fp32 = out / "finetuned.onnx"
    export_checkpoint(chosen["checkpoint"], fp32)
    q = quantize(fp32, variant_path(fp32, "int8"), QuantizationConfig("int8", calibration_size=256),
                 data_dir=args.data_dir, check_size=1000)
    deploy = {k: evaluate_onnx(v, args.target, data_dir=args.data_dir, device="cpu")["accuracy"]
              for k, v in (("fp32", fp32), ("int8", Path(q.path)))}
    images, labels = load_split(args.target, "test", args.data_dir, limit=200)
    predictions = load(q.path, device="cpu").predict(list(images))
    classify_acc = sum(p.index == y for p, y in zip(predictions, labels)) / len(labels)
    deploy.update(int8_points_lost=100 * (deploy["fp32"] - deploy["int8"]), agreement=q.agreement,
                  classify_int8_first200=classify_acc, sample=[p.label for p in predictions[:5]],
                  checkpoint=chosen["checkpoint"])
    targets = {f"fine-tuned >= scratch + 3 points at {max(shots)}/class": summary[max(shots)]["gain_points_mean"] >= 3,
               "int8 within 0.5 points of fp32": deploy["int8_points_lost"] <= 0.5}

    print(f"\n{args.model} pretrained on {pretraining['dataset']} ({pretraining['epochs']} epochs), "
          f"fine-tuned on {args.target}; test accuracy (%) on the full test split, {len(seeds)} seeds")
    print(table(rows, ["images/class", "head only", "fine-tuned", "scratch", "mean gain (points)", "median gain"]))
    print(f"\nfine-tuned {max(shots)}/class (seed {seeds[0]}): fp32 {100 * deploy['fp32']:.2f}%, "
          f"int8 {100 * deploy['int8']:.2f}% ({deploy['int8_points_lost']:+.2f} points), "
          f"runtime classify (int8) on 200 test images {100 * classify_acc:.1f}%")
    for name, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    path = write_result("transfer", {"pretraining": pretraining, "target": args.target, "budget": BUDGET,
                                     "finetune_lr": FINETUNE, "scratch_lr": SCRATCH, "freeze": args.freeze,
                                     "runs": runs, "summary": summary, "deploy": deploy, "targets": targets}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
