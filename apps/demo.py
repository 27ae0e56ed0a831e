"""``dlpipe demo``: the main job end to end on a fresh machine with no network.

Train a classifier on the embedded shapes world (or MNIST when the data root has it), export it with
parity checks, quantize to fp16 and int8, evaluate and time every variant through the runtime,
classify a few sample image files; then the same chain, shorter, for the other tasks (a segmenter and
a detector on shapes scenes), and return one summary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from dlpipe.export.evaluate import benchmark, evaluate_onnx
from dlpipe.export.onnx_export import export_checkpoint
from dlpipe.export.quantize import QuantizationConfig, quantize
from dlpipe.runtime import load
from dlpipe.runtime.errors import DlpipeError
from dlpipe.runtime.files import write_json
from dlpipe.runtime.formats import variant_path
from dlpipe.training.data import load_split
from dlpipe.training.registry import get_spec
from dlpipe.training.tasks import TASKS, DemoRow, Task, get_task
from dlpipe.training.train import TrainConfig, train, train_command


def run_demo(out: str | Path = "runs/demo", dataset: str = "shapes", model: str = "lenet5", epochs: int | None = None,
             quick: bool = False, data_dir: str | None = None, progress: bool = True,
             tasks: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run every stage once for ``model`` (the headline: a classifier), then each other task's demo row and
    the transfer step; write ``summary.json`` under ``out``. Each variant's timing carries its spread (p90 / p10)
    and ``spread_too_wide`` per batch size (``dlpipe.runtime.benchmark.SPREAD_LIMIT``): numbers from a machine
    too busy to trust.

    Args:
        quick: A tiny run for tests: a few hundred images, one epoch, short benchmarks.
        tasks: The other rows to run: task names from the task table and ``transfer`` (the classifier
            fine-tuned on a folder of new classes); every task with a demo row, and transfer, when None.
    """
    out = Path(out)
    headline = get_task(get_spec(model).task)
    epochs = epochs or (1 if quick else (8 if dataset == "shapes" else 2))
    result = train(TrainConfig(model=model, dataset=dataset, out=str(out / "train"), epochs=epochs,
                               limit=1200 if quick else None, test_limit=300 if quick else None,
                               data_dir=data_dir, progress=progress, seed=0,
                               schedule="none" if quick else "onecycle", lr=None if quick else 3e-3,
                               optimizer=None if quick else "adam"))
    fp32 = out / "model.onnx"
    export_checkpoint(result["best"], fp32)
    paths, reports = {"fp32": fp32}, {}
    for precision in ("fp16", "int8"):
        config = QuantizationConfig(precision=precision, calibration_size=64 if quick else 256,
                                    min_agreement=0.9 if quick else 0.98)
        reports[precision] = quantize(fp32, variant_path(fp32, precision), config, data_dir=data_dir,
                                      check_size=128 if quick else 512)
        paths[precision] = variant_path(fp32, precision)
    # Interleaved rounds with rests, timed again once when the spread is too wide (issue 12: a busy machine).
    stats = benchmark([str(p) for p in paths.values()], batches=(1, 64), checkpoint=result["best"],
                      warmup=3 if quick else 10, iters=20 if quick else 100, rounds=5 if quick else 10, attempts=2)
    variants = _variant_rows(headline, paths, reports, stats, result, dataset, 300 if quick else None, data_dir)
    names = tasks if tasks is not None else (*(t.name for t in TASKS.values() if t.demo and t is not headline),
                                             "transfer")
    rows = [run_transfer_demo(out, result["best"], quick, progress) if name == "transfer"
            else run_task_demo(get_task(name), out, quick, progress) for name in names]
    summary = {"out": str(out), "model": model, "dataset": dataset, "epochs": epochs, "metric": headline.metric.name,
               "best_val_score": result["best_val_score"], "variants": variants,
               "samples": _samples(out, paths["int8"], dataset, data_dir), "benchmarks": [s.as_dict() for s in stats],
               "tasks": rows}
    write_json(out / "summary.json", summary)
    return summary


def _variant_rows(task: Task, paths: dict[str, Path], reports: dict, stats: list, result: dict[str, Any],
                  dataset: str, limit: int | None, data_dir: str | None) -> list[dict[str, Any]]:
    """The headline table: per variant its size, task metric, agreement with fp32, latency and throughput (with
    their spreads and flags)."""
    key, variants = task.metric.key, []
    for precision, path in paths.items():
        ev = evaluate_onnx(path, dataset, limit=limit, data_dir=data_dir)
        mine = [s for s in stats if s.name.startswith(path.name + " ")]
        variants.append({"variant": precision, "path": str(path), "size_kib": path.stat().st_size / 1024,
                         "accuracy": ev[key],
                         "agreement": f"{reports[precision].agreement:.2%}" if precision in reports else "-",
                         **_timing(mine)})
    eager = [s for s in stats if s.name.startswith("pytorch")]
    variants.append({"variant": "pytorch eager", "path": result["best"],
                     "size_kib": Path(result["best"]).stat().st_size / 1024, "accuracy": result[f"test_{key}"],
                     "agreement": "-", **_timing(eager)})
    return variants


def _timing(stats: list) -> dict[str, Any]:
    """One variant's timing columns: p50 at batch 1 and throughput at batch 64, each with its spread and flag."""
    b1, b64 = next(s for s in stats if s.batch == 1), next(s for s in stats if s.batch == 64)
    return {"p50_ms_b1": b1.p50_ms, "spread_b1": b1.spread, "spread_too_wide_b1": b1.spread_too_wide,
            "throughput_b64": b64.throughput, "spread_b64": b64.spread, "spread_too_wide_b64": b64.spread_too_wide}


def _samples(out: Path, model: Path, dataset: str, data_dir: str | None) -> list[dict[str, Any]]:
    """Sample image files, classified through the runtime from disk like a user's own pictures."""
    images, labels = load_split(dataset, "test", data_dir, limit=6)
    predictor = load(model)
    sample_dir = out / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(images):
        f = sample_dir / f"sample_{i}.png"
        Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.Resampling.NEAREST).save(f)
        files.append(f)
    return [{"image": str(f), "truth": predictor.info.labels[int(t)], "label": r.label, "score": r.score}
            for f, t, r in zip(files, labels, predictor.predict(files))]


def colour_folder(root: Path, per_class: int, start: int = 0) -> Path:
    """An ImageFolder of shapes sorted by colour (a user's own classes, new to the kind classifier)."""
    from dlpipe.training.shapes import COLOURS, ShapesWorld

    world = ShapesWorld(seed=99, image_size=32)
    counts = dict.fromkeys(COLOURS, 0)
    index = start
    while min(counts.values()) < per_class:
        scene = world.scene(index)
        colour = scene.shapes[-1].colour
        if counts[colour] < per_class:
            (root / colour).mkdir(parents=True, exist_ok=True)
            Image.fromarray(world.render(scene)[0]).save(root / colour / f"{index}.png")
            counts[colour] += 1
        index += 1
    return root


def run_transfer_demo(out: Path, classifier: str, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """The demo's shape-kind classifier fine-tuned to tell the shapes' colours, from a folder of 80 images per
    colour, then exported, quantized to int8 and run on 10 held-out files per colour through the runtime."""
    from dlpipe.training.finetune import FinetuneConfig, finetune

    out = Path(out) / "transfer"
    train_dir = colour_folder(out / "images", 12 if quick else 80)
    held_out = colour_folder(out / "held_out", 2 if quick else 10, start=100_000)
    r = finetune(FinetuneConfig(source=classifier, data=str(train_dir), out=str(out / "train"),
                                head_epochs=1 if quick else 2, epochs=1 if quick else 15, lr=3e-3, head_lr=3e-3,
                                batch_size=16, progress=progress))
    fp32 = out / "model.onnx"
    export_checkpoint(r["best"], fp32)
    quantize(fp32, variant_path(fp32, "int8"), QuantizationConfig("int8", calibration_size=64,
                                                                   min_agreement=0.0 if quick else 0.9))
    files = sorted(held_out.rglob("*.png"))
    scores = {"head only (val)": (r["head_only"] or {}).get("val_acc"),
              f"best.pt, {r['best_stage']} stage (val)": r["after"]["val_acc"]}
    for precision in ("fp32", "int8"):
        results = load(variant_path(fp32, precision) if precision != "fp32" else fp32).predict(files)
        scores[f"{precision} held-out"] = sum(f.parent.name == p.label for f, p in zip(files, results)) / len(files)
    return {"task": "transfer", "model": f"{r['model']} (fine-tuned)",
            "dataset": "shapes by colour (folder)", "metric": "accuracy", "scores": scores,
            "sample": f"classified {len(files)} held-out files"}


def run_task_demo(task: Task, out: str | Path, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """One task's demo row (its declaration's :class:`DemoRow`): train briefly, export, quantize, score every
    variant with the task's metric through the runtime, and run the task's app as a user would (the
    ``dlpipe`` command line on sample files); returns a summary row."""
    row = task.demo
    out = Path(out) / task.name
    options = {**row.options, **(row.quick if quick else {}), "out": str(out / "train"), "seed": 0}
    result, _ = train_command(row.model, progress=progress, **options)
    fp32 = Path(export_checkpoint(result["best"], out / f"{row.model}.onnx").path)
    paths, agreement = {"fp32": fp32}, {}
    settings = {k: (min(v, 16) if quick and k != "min_agreement" else v) for k, v in row.quantize.items()}
    for precision in row.precisions:
        config = QuantizationConfig(precision=precision, calibration_size=settings["calibration_size"],
                                    min_agreement=0.0 if quick else settings["min_agreement"])
        report = quantize(fp32, variant_path(fp32, precision), config, check_size=settings["check_size"])
        paths[precision], agreement[precision] = Path(report.path), report.agreement
    limit = min(row.evaluate_limit, 50) if quick else row.evaluate_limit
    scores = {p: evaluate_onnx(path, limit=limit)[task.metric.key] for p, path in paths.items()}
    app = run_app(row, paths[row.precisions[-1]], out)
    return {"task": task.name, "model": row.model, "dataset": result.get("env") or _dataset(fp32),
            "metric": task.metric.name, "scores": scores, "agreement": agreement, "sample": row.describe(app)}


def _dataset(model: Path) -> str:
    from dlpipe.runtime import load

    return str(load(model, device="cpu").info.raw.get("dataset"))


def run_app(row: DemoRow, model: Path, out: Path) -> Any:
    """The task's app through the ``dlpipe`` command line (``--json``) on sample files; its JSON output."""
    files = []
    if row.samples is not None:
        for i, image in enumerate(row.samples(2)):
            f = out / "samples" / f"sample_{i}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).resize((image.shape[1] * 3, image.shape[0] * 3), Image.Resampling.BICUBIC).save(f)
            files.append(str(f))
    args = []
    for word in row.app:
        args += files if word == "{images}" else [word.format(model=model, out=out / "app")]
    proc = subprocess.run([sys.executable, "-m", "dlpipe.apps.cli", *args, "--json"], capture_output=True, text=True)
    if proc.returncode:
        raise DlpipeError(f"the demo's app 'dlpipe {' '.join(args)}' failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout)
