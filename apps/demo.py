"""``dlpipe demo``: the main job end to end on a fresh machine with no network.

Train a classifier on the embedded shapes world (or MNIST when the data root has it), export it with
parity checks, quantize to fp16 and int8, evaluate and time every variant through the runtime,
classify a few sample image files, and return one summary.
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


def run_demo(out: str | Path = "runs/demo", dataset: str = "shapes", model: str = "lenet5", epochs: int | None = None,
             quick: bool = False, data_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every stage once and write ``summary.json`` under ``out``.

    Args:
        quick: A tiny run for tests: a few hundred images, one epoch, short benchmarks.
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
               "benchmarks": [s.as_dict() for s in stats]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
