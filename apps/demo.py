"""``dlpipe demo``: the main job end to end on a fresh machine with no network.

Train a classifier on the embedded shapes world (or MNIST when the data root has it), export it with
parity checks, quantize to fp16 and int8, evaluate and time every variant through the runtime,
classify a few sample image files; then the same chain, shorter, for the other tasks (a segmenter and
a detector on shapes scenes), and return one summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from dlpipe.export.onnx_export import export_checkpoint
from dlpipe.export.quantize import QuantizationConfig, quantize
from dlpipe.runtime import load
from dlpipe.runtime.formats import variant_path
from dlpipe.training.data import load_split
from dlpipe.training.evaluate import benchmark, evaluate_onnx
from dlpipe.training.train import TrainConfig, main as train


# The other tasks, each briefly: (model, dataset, training overrides, quick overrides, metric key, metric name).
TASK_DEMOS = {
    "segmentation": ("fcn2s", "shapes-scenes", dict(epochs=8, limit=3000, lr=3e-3, batch_norm=True,
                                                    model_args={"fusion": "conv"}),
                     dict(epochs=1, limit=96), "miou", "mean IoU"),
    "detection": ("rcnn", "shapes-boxes", dict(epochs=4, limit=2400, lr=2e-3),
                  dict(epochs=1, limit=96), "map50", "mAP@0.5"),
}


def run_demo(out: str | Path = "runs/demo", dataset: str = "shapes", model: str = "lenet5", epochs: int | None = None,
             quick: bool = False, data_dir: str | None = None, progress: bool = True,
             tasks: tuple[str, ...] = ("segmentation", "detection", "captioning", "control", "transfer")
             ) -> dict[str, Any]:
    """Run every stage once and write ``summary.json`` under ``out``.

    Args:
        quick: A tiny run for tests: a few hundred images, one epoch, short benchmarks.
        tasks: The other tasks to run after the classifier: keys of :data:`TASK_DEMOS`, ``control`` (a DQN
            agent on CartPole), ``captioning`` (a Show-and-Tell captioner) and ``transfer`` (the classifier
            fine-tuned on a folder of new classes).
    """
    out = Path(out)
    epochs = epochs or (1 if quick else (8 if dataset == "shapes" else 2))
    result = train(TrainConfig(model=model, dataset=dataset, out=str(out / "train"), epochs=epochs,
                               limit=1200 if quick else None, test_limit=300 if quick else None,
                               data_dir=data_dir, progress=progress, seed=0,
                               schedule="none" if quick else "onecycle", lr=None if quick else 3e-3,
                               optimizer=None if quick else "adam"))
    fp32 = out / "model.onnx"
    export_checkpoint(result["best"], fp32)
    paths = {"fp32": fp32}
    reports = {}
    for precision in ("fp16", "int8"):
        config = QuantizationConfig(precision=precision, calibration_size=64 if quick else 256,
                                    min_agreement=0.9 if quick else 0.98)
        reports[precision] = quantize(fp32, variant_path(fp32, precision), config, data_dir=data_dir,
                                      check_size=128 if quick else 512)
        paths[precision] = variant_path(fp32, precision)

    limit = 300 if quick else None
    stats = benchmark([str(p) for p in paths.values()], batches=(1, 64), checkpoint=result["best"],
                      warmup=3 if quick else 10, iters=10 if quick else 100)
    variants = []
    for precision, path in paths.items():
        ev = evaluate_onnx(path, dataset, limit=limit, data_dir=data_dir)
        mine = [s for s in stats if s.name.startswith(path.name + " ")]
        variants.append({"variant": precision, "path": str(path), "size_kib": path.stat().st_size / 1024,
                         "accuracy": ev["accuracy"],
                         "agreement": f"{reports[precision].agreement:.2%}" if precision in reports else "-",
                         "p50_ms_b1": next(s.p50_ms for s in mine if s.batch == 1),
                         "throughput_b64": next(s.throughput for s in mine if s.batch == 64)})
    eager = [s for s in stats if s.name.startswith("pytorch")]
    variants.append({"variant": "pytorch eager", "path": result["best"],
                     "size_kib": Path(result["best"]).stat().st_size / 1024, "accuracy": result["test_acc"],
                     "agreement": "-", "p50_ms_b1": next(s.p50_ms for s in eager if s.batch == 1),
                     "throughput_b64": next(s.throughput for s in eager if s.batch == 64)})

    # Sample image files, classified through the runtime from disk like a user's own pictures.
    images, labels = load_split(dataset, "test", data_dir, limit=6)
    predictor = load(paths["int8"])
    sample_dir = out / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(images):
        f = sample_dir / f"sample_{i}.png"
        Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.Resampling.NEAREST).save(f)
        files.append(f)
    samples = [{"image": str(f), "truth": predictor.info.labels[int(t)], "label": r.label, "score": r.score}
               for f, t, r in zip(files, labels, predictor.predict(files))]
    summary = {"out": str(out), "model": model, "dataset": dataset, "epochs": epochs,
               "best_val_acc": result["best_val_acc"], "variants": variants, "samples": samples,
               "benchmarks": [s.as_dict() for s in stats],
               "tasks": [_other_task(task, out, result["best"], quick, progress) for task in tasks]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _other_task(task: str, out: Path, classifier: str, quick: bool, progress: bool) -> dict[str, Any]:
    if task == "control":
        return run_control_demo(out, quick)
    if task == "transfer":
        return run_transfer_demo(out, classifier, quick, progress)
    if task == "captioning":
        return run_captioning_demo(out, quick)
    return run_task_demo(task, out, quick=quick, progress=progress)


def run_control_demo(out: Path, quick: bool = False) -> dict[str, Any]:
    """A DQN agent trained briefly on CartPole, exported, quantized, and each variant played from ONNX."""
    from dlpipe.training.dqn import demo_run

    r = demo_run(out=Path(out) / "control", total_steps=2000 if quick else 8000, episodes=2 if quick else 5)
    return {"task": "control", "model": "dqn-cartpole", "dataset": "CartPole-v1", "metric": "mean return",
            "scores": {v["variant"]: v["mean_return"] for v in r["variants"]},
            "sample": f"played {2 if quick else 5} episodes per variant through 'dlpipe play'"}


def run_captioning_demo(out: Path, quick: bool = False) -> dict[str, Any]:
    """A captioner trained briefly on shapes scenes, exported as its two-graph package, int8, BLEU-4 of both,
    and held-out scenes captioned through the runtime (under two minutes of training: the captions are still
    rough; bench/captioning.py trains the full recipe)."""
    from dlpipe.apps.caption import demo_captioner

    r = demo_captioner(out=Path(out) / "captioning", quick=quick, limit=6000, epochs=8)
    first = r["samples"][0]
    return {"task": "captioning", "model": "captioner", "dataset": "shapes-captions", "metric": "BLEU-4",
            "scores": {v["precision"]: v["bleu"] for v in r["variants"]},
            "sample": f"'{first['caption']}' (truth: '{first['truth']}')"}


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
    from dlpipe.training.finetune import FinetuneConfig, main as finetune

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
    scores = {"head only (val)": (r["head_only"] or {}).get("val_acc"), "fine-tuned (val)": r["after"]["val_acc"]}
    for precision in ("fp32", "int8"):
        results = load(variant_path(fp32, precision) if precision != "fp32" else fp32).predict(files)
        scores[f"{precision} held-out"] = sum(f.parent.name == p.label for f, p in zip(files, results)) / len(files)
    return {"task": "transfer", "model": f"{r['model']} (fine-tuned)",
            "dataset": "shapes by colour (folder)", "metric": "accuracy", "scores": scores,
            "sample": f"classified {len(files)} held-out files"}


def run_task_demo(task: str, out: str | Path, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, export, quantize (fp16, int8), evaluate every variant and run the task's app on two sample
    files, for one of :data:`TASK_DEMOS`; returns a summary row."""
    from dlpipe.apps.detect import detect_images
    from dlpipe.apps.segment import segment_images

    model, dataset, full, short, metric, metric_name = TASK_DEMOS[task]
    out = Path(out) / task
    opts = {**full, **(short if quick else {})}
    result = train(TrainConfig(model=model, dataset=dataset, out=str(out / "train"), optimizer="adam",
                               schedule="none" if quick else "onecycle", test_limit=50 if quick else 300,
                               progress=progress, seed=0, **opts))
    fp32 = out / f"{model}.onnx"
    export_checkpoint(result["best"], fp32)
    paths, agreement = {"fp32": fp32}, {}
    for precision in ("fp16", "int8"):
        config = QuantizationConfig(precision=precision, calibration_size=16 if quick else 64,
                                    min_agreement=0.0 if quick else 0.9)
        report = quantize(fp32, variant_path(fp32, precision), config, check_size=16 if quick else 64)
        paths[precision], agreement[precision] = variant_path(fp32, precision), report.agreement
    scores = {p: evaluate_onnx(path, dataset, limit=50 if quick else 300)[metric] for p, path in paths.items()}

    images, _ = load_split(dataset, "test", limit=2)
    files = []
    for i, img in enumerate(images):
        f = out / "samples" / f"scene_{i}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.Resampling.BICUBIC).save(f)
        files.append(str(f))
    app_out = out / "app"
    if task == "segmentation":
        rows = segment_images(paths["int8"], files, app_out)
        sample = f"{len(rows)} overlays + masks in {app_out}"
    else:
        rows = detect_images(paths["int8"], files, app_out, threshold=0.5)
        sample = f"{sum(len(r['detections']) for r in rows)} objects found, drawn in {app_out}"
    return {"task": task, "model": model, "dataset": dataset, "metric": metric_name, "scores": scores,
            "agreement": agreement, "sample": sample}
