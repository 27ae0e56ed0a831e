"""What every registered model's no-flag command reaches, beside what the README claims (issue 19), in one JSON.

Two sources, one row per model and dataset:
- trained here (``--train MODEL:DATASET ...``): the plain ``dlpipe train MODEL --dataset DATASET --seed S``
  through the same library call, for the models without a benchmark of their own (the classifiers); the test
  figure is the one the command prints. The JSON is rewritten after every run; ``--merge`` combines files of
  runs made side by side.
- collected: the other models' own benchmark results (``bench/results/<file>.json``), with a check that the
  recipe they trained with is still the registry's (``recipe_is_registry_default``).

Each row carries the README model table's claim for that model and dataset (parsed from README.md) and
``gap``: the measured mean, rounded as the README rounds it, below the claim (above it for the figures where
less is better: an RBM's reconstruction error, a GAN's FID). A gap is a failed benchmark.

    python bench/defaults.py --train dmlp:mnist lenet5:mnist --seeds 0,1,2 --threads 1   # then:
    python bench/defaults.py --merge a.json b.json                                       # -> defaults.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_result  # noqa: E402

from dlpipe.training.loop import TrainConfig, resolve_config  # noqa: E402
from dlpipe.training.models.spec import RECIPE_FIELDS  # noqa: E402
from dlpipe.training.registry import get_spec  # noqa: E402
from dlpipe.training.tasks import get_task  # noqa: E402
from dlpipe.training.train import train  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
# The figure a model's README row quotes, where it is not the task's test figure: the captioner's row quotes
# beam-search BLEU-4, the figure `dlpipe evaluate` reports for the package; a GAN has no test split, and its
# command prints the best epoch's FID against held-out training digits in the features of its own judge.
TEST_KEY = {"captioner": "test_beam_bleu", "dcgan": "best_val_score", "cdcgan": "best_val_score"}
# How the README writes each task's figure (the first match in the row's "figure reached" cell).
CLAIM_PATTERNS = {"acc": r"([0-9]+\.[0-9]+)%", "miou": r"mean IoU ([0-9.]+)", "map50": r"mAP@0\.5 ([0-9.]+)",
                  "bleu": r"BLEU-4 ([0-9.]+)", "return": r"mean return ([0-9.]+)",
                  "psnr": r"PSNR ([0-9.]+) dB", "recon_error": r"reconstruction error ([0-9.]+)",
                  "fid": r"FID ([0-9.]+)"}
# The figures where less is better: a gap is the measured mean above the claim.
LOWER_IS_BETTER = {"recon_error", "fid"}


def _seeded(values: list[tuple[int, float]]) -> dict[str, Any]:
    xs = [v for _, v in values]
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "seeds": len(xs),
            "per_seed": {str(s): v for s, v in values}}


# Where each benchmark keeps its fp32 figure: (model, dataset, file, metric key, seeds and values).
COLLECTED: list[tuple[str, str, str, str, Callable[[dict], list[tuple[int, float]]]]] = [
    ("deep_convnet", "mnist", "mnist_accuracy.json", "acc",
     lambda d: [(r["seed"], r["test_accuracy"]["fp32"]) for r in d["runs"]]),
    ("fcn2s", "shapes-scenes", "segmentation.json", "miou", lambda d: [(d["recipe"]["seed"], d["miou"]["fp32"])]),
    ("fcn2s", "mnist-scenes", "segmentation_digits.json", "miou",
     lambda d: [(d["recipe"]["seed"], d["miou"]["fp32"])]),
    ("rcnn", "shapes-boxes", "detection.json", "map50", lambda d: [(d["recipe"]["seed"], d["map50"]["fp32"])]),
    ("rcnn", "mnist-boxes", "detection_digits.json", "map50", lambda d: [(d["recipe"]["seed"], d["map50"]["fp32"])]),
    ("captioner", "shapes-captions", "captioning.json", "bleu",
     lambda d: [(d["recipe"]["seed"], d["bleu_beam"]["fp32"])]),
    ("dqn-cartpole", "CartPole-v1", "dqn_cartpole.json", "return",
     lambda d: [(r["seed"], r["fp32"]["mean_return"]) for r in d["runs"]]),
    ("dbn", "mnist", "dbn_default.json", "acc", lambda d: [(r["seed"], r["test_acc"]) for r in d["runs"]]),
    *((m, "fashion-mnist", "classic_cnns.json", "acc",
       lambda d, m=m: [(r["seed"], r["test_accuracy"]["fp32"]) for r in d["runs"] if r["model"] == m])
      for m in ("alexnet", "vgg11", "vgg16", "googlenet")),
]
# Where a benchmark keeps the recipe it trained with, when not under "recipe" (each run's own; the first is
# compared, and the runs must agree).
TRAINED_RECIPE: dict[str, Callable[[dict, str], list[dict[str, Any]]]] = {
    "dbn_default.json": lambda d, m: [r["recipe"] | {"model_args": r["model_args"]} for r in d["runs"]],
    "classic_cnns.json": lambda d, m: [r["config"] for r in d["runs"] if r["model"] == m],
}
# What the no-flag command is, where one command is not the whole of it.
COMMANDS = {"dbn": "dlpipe train rbm, then dlpipe train dbn --init-from RBM/best.pt",
            "ae_classifier": "dlpipe train dae, then dlpipe train ae_classifier --init-from DAE/best.pt"}


def readme_claim(model: str, dataset: str, metric: str) -> tuple[float | None, str]:
    """The README model table's figure for ``model`` on ``dataset`` (None when it says not measured) and its text."""
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 6 or f"`{model}`" not in cells[1] or f"`{dataset}`" not in cells[2]:
            continue
        text = cells[4]
        found = re.search(CLAIM_PATTERNS[metric], text)
        if not found or text.startswith("not measured"):
            return None, text
        value = float(found.group(1))
        return (value / 100 if metric == "acc" else value), text
    return None, "no row in the README's model table"


def _decimals(text: str, metric: str) -> int:
    found = re.search(CLAIM_PATTERNS[metric], text)
    digits = len(found.group(1).split(".")[1]) if found and "." in found.group(1) else 0
    return digits + (2 if metric == "acc" else 0)


def row(model: str, dataset: str, metric: str, measured: dict[str, Any], source: str, **extra) -> dict[str, Any]:
    claim, text = readme_claim(model, dataset, metric)
    digits = _decimals(text, metric)
    sign = -1 if metric in LOWER_IS_BETTER else 1
    gap = None if claim is None else sign * round(measured["mean"], digits) < sign * round(claim, digits)
    command = COMMANDS.get(model) or (
        f"dlpipe train {model}" + ("" if dataset == get_spec(model).default_dataset else f" --dataset {dataset}"))
    return {"model": model, "dataset": dataset, "command": command, "metric": metric, "measured": measured,
            "source": source, "readme_claim": claim, "readme_text": text, "gap": gap, **extra}


def _registry_recipe(model: str, dataset: str) -> dict[str, Any]:
    if get_spec(model).task == "control":
        return {}
    cfg = resolve_config(TrainConfig(model=model, dataset=dataset))
    return {k: getattr(cfg, k) for k in RECIPE_FIELDS}


def collected() -> list[dict[str, Any]]:
    rows = []
    for model, dataset, file, metric, values in COLLECTED:
        doc = json.loads((RESULTS / file).read_text())
        measured = values(doc)
        if not measured:  # a shared benchmark that has not trained this model
            continue
        registry = _registry_recipe(model, dataset)
        recipes = TRAINED_RECIPE[file](doc, model) if file in TRAINED_RECIPE else [doc.get("recipe", {})]
        differs = {}
        for trained in recipes:
            differs |= {k: (trained[k], registry[k]) for k in registry if k in trained and trained[k] != registry[k]
                        and k not in ("model_args", "batch_norm")}
            differs |= {k: (trained[k], None) for k in ("limit", "test_limit") if trained.get(k)}  # reduced runs
        rows.append(row(model, dataset, metric, _seeded(measured), f"bench/results/{file}",
                        recipe_is_registry_default=not differs if registry else None,
                        recipe_differences=differs))
    return rows


def train_rows(pairs: list[str], seeds: list[int], threads: int | None, data_dir: str | None, out: Path,
               path: Path, init_from: str | None = None) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        model, _, dataset = pair.partition(":")
        dataset = dataset or get_spec(model).default_dataset
        metric = get_task(get_spec(model).task).metric.key
        key = TEST_KEY.get(model, f"test_{metric}")
        values, runs = [], []
        for seed in seeds:
            source = init_from.format(seed=seed) if init_from else None
            result = train(TrainConfig(model=model, dataset=dataset, seed=seed, threads=threads, data_dir=data_dir,
                                       out=str(out / f"{model}_{dataset}_s{seed}"), progress=False,
                                       init_from=source))
            values.append((seed, result[key]))
            runs.append({"seed": seed, "value": result[key], **({"init_from": source} if source else {}),
                         "test": {k: v for k, v in result.items() if k.startswith("test_") and k != key
                                  and isinstance(v, (int, float))},
                         "train_seconds": round(result["train_seconds"], 1),
                         **({"train_cpu_seconds": round(result["train_cpu_seconds"], 1)}
                            if "train_cpu_seconds" in result else {})})
            print(f"{model} {dataset} seed {seed}: {metric} {values[-1][1]:.4f} in {runs[-1]['train_seconds']:.0f} s",
                  flush=True)
            rows[pair] = row(model, dataset, metric, _seeded(values), "trained by bench/defaults.py", runs=runs,
                             recipe=_registry_recipe(model, dataset), threads=threads)
            write_result("defaults", {"rows": list(rows.values())}, str(path))
    return list(rows.values())


def merge(files: list[str]) -> list[dict[str, Any]]:
    by_pair: dict[tuple[str, str], dict[str, Any]] = {}
    for f in files:
        for r in json.loads(Path(f).read_text())["rows"]:
            if "runs" not in r:  # a collected benchmark's row: collected afresh below
                continue
            key = (r["model"], r["dataset"])
            if key in by_pair and by_pair[key]["recipe"] != r["recipe"]:
                sys.exit(f"defaults: {key[0]} on {key[1]} was trained with two recipes in {files}; merge one")
            if key in by_pair:
                by_pair[key]["runs"] += r["runs"]
            else:
                by_pair[key] = dict(r)
    rows = []
    for (model, dataset), r in by_pair.items():
        runs = sorted(r["runs"], key=lambda x: x["seed"])
        values = [(x["seed"], x["value"]) for x in runs]
        rows.append(row(model, dataset, r["metric"], _seeded(values), "trained by bench/defaults.py", runs=runs,
                        recipe=r["recipe"], threads=r["threads"]))
    return rows


def combine(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model and dataset: seeds trained here join the seeds its own benchmark measured."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["model"], r["dataset"])
        if key not in out:
            out[key] = r
            continue
        first = out[key]
        per_seed = {**first["measured"]["per_seed"], **r["measured"]["per_seed"]}
        values = sorted((int(s), v) for s, v in per_seed.items())
        extra = {k: v for k, v in {**r, **first}.items() if k not in ("model", "dataset", "metric", "measured",
                                                                     "source", "readme_claim", "readme_text",
                                                                     "gap", "command")}
        out[key] = row(r["model"], r["dataset"], r["metric"], _seeded(values), f"{first['source']} + {r['source']}",
                       **extra)
    return list(out.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", nargs="*", default=[], metavar="MODEL:DATASET")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--init-from", default=None, metavar="PATH",
                   help="checkpoint each run starts from ({seed} is replaced by the run's seed), for the models "
                        "whose no-flag command needs one (ae_classifier: a dae's best.pt)")
    p.add_argument("--runs", default="runs/bench_defaults", help="training output folders")
    p.add_argument("--merge", nargs="*", default=None, help="result files of --train runs to combine")
    p.add_argument("--json", default=None, help="result file (default bench/results/defaults.json)")
    args = p.parse_args()
    path = Path(args.json) if args.json else RESULTS / "defaults.json"
    if args.merge:
        trained = merge(args.merge)
    else:
        trained = train_rows(args.train, [int(s) for s in args.seeds.split(",")], args.threads, args.data_dir,
                             Path(args.runs), path, args.init_from)
    rows = combine(trained + collected())
    write_result("defaults", {"rows": rows, "gaps": [f"{r['model']}:{r['dataset']}" for r in rows if r["gap"]]},
                 str(path))
    for r in rows:
        m = r["measured"]
        claim = "-" if r["readme_claim"] is None else f"{r['readme_claim']:.4g}"
        print(f"{r['model']:>13} {r['dataset']:<16} {r['metric']:<6} {m['mean']:.4f} ± {m['std']:.4f} "
              f"({m['seeds']} seeds)  README {claim:<7} gap {r['gap']}  {r['source']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
