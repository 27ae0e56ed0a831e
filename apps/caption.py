"""``dlpipe caption``: one sentence per image file from a captioner package (issue 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlpipe.runtime import load
from dlpipe.runtime.errors import InputError
from dlpipe.runtime.images import open_image


def caption_images(model: str | Path, images: list[str], beam: int | None = None,
                   device: str = "auto") -> list[dict[str, Any]]:
    """Caption each image file (every file is read and checked before any decoding).

    Returns:
        Per image: the file, the caption, its length-normalised log-probability (``score``), the raw
        log-probability and the beam width used.
    """
    captioner = load(model, device=device)
    if getattr(captioner, "task", None) != "captioning":
        raise InputError(f"'{model}' is a {captioner.info.task} model, not a captioner package")
    pictures = [open_image(p) for p in images]
    width = int(captioner.decoding.get("beam", 1) if beam is None else beam)
    results = captioner.predict(pictures, beam=width)
    return [{"image": str(path), "caption": r.sentence, "score": r.score, "log_prob": r.log_prob, "beam": width}
            for path, r in zip(images, results)]


def demo_captioner(out: str | Path = "runs/demo/captioner", quick: bool = False, limit: int = 1500,
                   epochs: int = 3) -> dict[str, Any]:
    """A short captioner run for ``dlpipe demo``: train on shapes scenes, export the package, add its
    int8 variant, evaluate both with BLEU-4 and caption a few held-out scenes saved as PNG files.

    About 40-60 s on 2 CPU cores with the defaults (``quick``: a few seconds, captions still poor).

    Returns:
        Paths, BLEU-4 and exact-match rate per variant, and the sample captions beside the truth.
    """
    from PIL import Image

    from dlpipe.export.onnx_export import export_checkpoint
    from dlpipe.export.quantize import QuantizationConfig, quantize
    from dlpipe.training.captioning import CaptionOptions, train_captioner
    from dlpipe.training.captions import TEST_START, caption_set
    from dlpipe.training.evaluate import evaluate_onnx
    from dlpipe.training.train import TrainConfig

    out = Path(out)
    limit, epochs = (200, 1) if quick else (limit, epochs)
    cfg = TrainConfig(model="captioner", out=str(out / "train"), epochs=epochs, limit=limit, test_limit=100,
                      schedule="onecycle", progress=False)
    trained = train_captioner(cfg, CaptionOptions(hidden=128))
    package = Path(export_checkpoint(trained["best"], out / "captioner").path)
    int8 = quantize(package, package.with_name("manifest.int8.json"),
                    QuantizationConfig("int8", calibration_size=64, min_agreement=0.0), check_size=64)
    scores = {m.name: evaluate_onnx(m, limit=100, device="cpu") for m in (package, Path(int8.path))}
    images, truth = caption_set(4, start=TEST_START)
    files = []
    for i, image in enumerate(images):
        path = out / f"scene_{i}.png"
        Image.fromarray(image).save(path)
        files.append(str(path))
    samples = caption_images(int8.path, files, device="cpu")
    return {"package": str(package), "train_seconds": trained["train_seconds"],
            "variants": [{"manifest": k, "precision": v["precision"], "bleu": v["bleu"], "exact": v["exact"]}
                         for k, v in scores.items()],
            "samples": [{**s, "truth": t} for s, t in zip(samples, truth)]}
