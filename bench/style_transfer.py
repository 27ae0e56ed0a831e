"""Neural style transfer (issue 16): the perceptual losses the feed-forward stylizer reaches on held-out images
beside the optimisation of each image itself (Gatys et al.), in the same MobileNetV2 feature space; images/s of
the exported stylizer (fp32, fp16, int8) at 256x256 and 512x512 through the torch-free runtime; before/after
images for the README (docs/style/).

The style is the built-in procedural brush-stroke texture (a real painting is not available offline). The
stylizer trains on random crops of three of the CC0 photos in docs/photos (astronaut, coffee, rocket); the
held-out content images are the fourth photo (chelsea) and shapes-world scenes it never saw.

    python bench/style_transfer.py                              # trains first (~17 min on one busy thread)
    python bench/style_transfer.py --checkpoint runs/bench_style/train/best.pt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import write_result  # noqa: E402
from PIL import Image  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.export.onnx_export import export_checkpoint  # noqa: E402
from dlpipe.export.quantize import QuantizationConfig, quantize  # noqa: E402
from dlpipe.runtime import Engine, load  # noqa: E402
from dlpipe.runtime.benchmark import measure_interleaved  # noqa: E402
from dlpipe.runtime.formats import variant_path  # noqa: E402
from dlpipe.training import style as nst  # noqa: E402
from dlpipe.training.style_train import StylizerConfig, content_images, train  # noqa: E402
from dlpipe.training.tasks.stylization import PSNR_BOUND, psnr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "docs" / "photos"
TRAIN_PHOTOS = ("astronaut.jpg", "coffee.jpg", "rocket.jpg")
HELD_OUT_PHOTO = PHOTOS / "chelsea.jpg"
DOCS = REPO / "docs" / "style"
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"


def held_out(size: int, scenes: int) -> list[tuple[str, np.ndarray]]:
    """The held-out content images: the fourth photo (longer side ``size``) and shapes-world test scenes."""
    photo = np.asarray(nst.fit_longer_side(Image.open(HELD_OUT_PHOTO), size, 4))
    images = [("chelsea.jpg", photo)]
    for i, scene in enumerate(content_images("shapes-scenes", "test", scenes, 128)):
        images.append((f"shapes-scene-{i}", scene))
    return images


def compare(stylizer_path: Path, images, steps: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Losses of the content image itself, the feed-forward result and the optimised one, per held-out image."""
    net = nst.load_perceptual()
    stored = load(stylizer_path, device="cpu")
    from dlpipe.training.tasks.stylization import style_image

    target = nst.StyleTarget.of(net, nst.to_tensor(style_image(stored.info.raw)))
    rows, pictures = [], {}
    for name, image in images:
        content = nst.to_tensor(image)
        start = time.perf_counter()
        fast = stored.stylize(image)[0]
        ff_seconds = time.perf_counter() - start
        start = time.perf_counter()
        slow, _ = nst.optimize_image(net, content, target, nst.OptimizeConfig(steps=steps))
        opt_seconds = time.perf_counter() - start
        slow = nst.to_uint8(slow)
        row = {"image": name, "size": list(image.shape[:2]), "feed_forward_seconds": round(ff_seconds, 3),
               "optimize_seconds": round(opt_seconds, 1)}
        for label, result in (("content", image), ("feed_forward", fast), ("optimized", slow)):
            row[label] = {k: round(v, 4) for k, v in nst.measure(net, nst.to_tensor(result), content, target).items()}
        rows.append(row)
        pictures[name] = np.concatenate([image, fast, slow], axis=1)
    return rows, pictures


def throughput(paths: dict[str, Path], sizes: tuple[int, ...], iters: int, threads: int) -> list[dict]:
    """Images/s of each variant at batch 1 for square images of each size (interleaved timing)."""
    rows = []
    for size in sizes:
        x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
        engines = {p: Engine(path, device="cpu", threads=threads) for p, path in paths.items()}
        runners = {p: (lambda e=e: e.run(x)) for p, e in engines.items()}
        stats = measure_interleaved(runners, batch=1, warmup=2, iters=iters, rounds=3)
        rows += [{"precision": p, "size": size, "images_per_s": round(s.throughput, 2), "p50_ms": round(s.p50_ms, 1),
                  "spread": round(s.spread, 2)} for p, s in stats.items()]
    return rows


def variants(fp32: Path, folder: Path, check: np.ndarray) -> tuple[dict[str, Path], dict[str, dict]]:
    """fp16 and int8 variants (calibrated on training crops), and the PSNR of each against fp32 on ``check``."""
    paths, quality = {"fp32": fp32}, {}
    np.save(folder / "check.npy", check)
    for precision in ("fp16", "int8"):
        out = variant_path(fp32, precision)
        report = quantize(fp32, out, QuantizationConfig(precision, calibration_size=64, min_agreement=0.0),
                          calibration=str(folder / "photos"), check=str(folder / "check.npy"), check_size=len(check))
        ref, got = load(fp32, device="cpu").run(check), load(out, device="cpu").run(check)
        values = psnr(ref, got)
        quality[precision] = {"psnr_db_mean": round(float(values.mean()), 2), "psnr_db_min": round(float(values.min()), 2),
                              "bound_db": PSNR_BOUND, "gate_share": report.agreement,
                              "max_abs_diff": round(report.max_abs_diff, 4), "format": report.format,
                              "integer_convs": report.integer_convs, "convs": report.convs}
        paths[precision] = out
    return paths, quality


def write_pictures(pictures: dict[str, np.ndarray], style: np.ndarray) -> list[str]:
    """docs/style/: the style image and, per held-out image, content | feed-forward | optimised (small JPEGs)."""
    DOCS.mkdir(parents=True, exist_ok=True)
    written = []
    Image.fromarray(style).resize((192, 192), Image.Resampling.BICUBIC).save(DOCS / "style.jpg", quality=85)
    written.append(str((DOCS / "style.jpg").relative_to(REPO)))
    for name, strip in pictures.items():
        path = DOCS / f"{Path(name).stem}_before_after.jpg"
        Image.fromarray(strip).save(path, quality=85)
        written.append(str(path.relative_to(REPO)))
    return written


def mean_losses(rows: list[dict], label: str) -> dict[str, float]:
    return {k: round(float(np.mean([r[label][k] for r in rows])), 4) for k in ("content", "style", "tv", "total")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="reuse a trained checkpoint instead of training")
    p.add_argument("--out", default="runs/bench_style")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit", type=int, default=1000, help="training crops")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=200, help="optimisation steps per held-out image")
    p.add_argument("--iters", type=int, default=30, help="timed runs per variant and size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault(nst.WEIGHTS_ENV, str(WEIGHTS))
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = out / "photos"
    photos.mkdir(exist_ok=True)
    for name in TRAIN_PHOTOS:
        if not (photos / name).exists():
            (photos / name).symlink_to(PHOTOS / name)
    train_seconds, ckpt = None, args.checkpoint
    if ckpt is None:
        result = train(StylizerConfig(dataset=str(photos), out=str(out / "train"), epochs=args.epochs,
                                      limit=args.limit, image_size=args.image_size, threads=args.threads))
        ckpt, train_seconds = result["best"], result["train_seconds"]
    fp32 = out / "stylizer.onnx"
    export = export_checkpoint(ckpt, fp32)
    images = held_out(256, 3)
    check = np.stack([np.asarray(Image.fromarray(im).resize((128, 128))) for _, im in images]).transpose(0, 3, 1, 2)
    paths, quality = variants(fp32, out, np.ascontiguousarray(check, dtype=np.float32) / 255)
    rows, pictures = compare(fp32, images, args.steps)
    speed = throughput(paths, (256, 512), args.iters, args.threads)
    print(table([[r["image"], r["content"]["style"], r["feed_forward"]["content"], r["feed_forward"]["style"],
                  r["optimized"]["content"], r["optimized"]["style"]] for r in rows],
                ["image", "style (input)", "ff content", "ff style", "opt content", "opt style"]))
    print(table([[r["precision"], r["size"], r["images_per_s"], r["p50_ms"]] for r in speed],
                ["precision", "size", "images/s", "p50 ms"]))
    written = write_pictures(pictures, nst.procedural_style(256))
    path = write_result("style_transfer", {
        "note": ("timings taken on a shared, busy 2-core machine (other jobs running): the lead re-runs them alone; "
                 "the losses are not timing-dependent"),
        "style": "built-in procedural brush-stroke texture (dlpipe.training.style.procedural_style; no painting "
                 "is available offline)",
        "perceptual_network": "torchvision MobileNetV2 ImageNet (IMAGENET1K_V1), ReLU6 expansion activations of "
                              f"blocks {list(nst.STYLE_LAYERS)} (style Gram matrices), block {nst.CONTENT_LAYER} (content)",
        "loss_weights": asdict(nst.LossWeights()),
        "train": {"content": f"random crops of {', '.join(TRAIN_PHOTOS)} (docs/photos)", "crops": args.limit,
                  "epochs": args.epochs, "image_size": args.image_size, "seconds": train_seconds, "checkpoint": ckpt,
                  "threads": args.threads},
        "export_parity": [r.as_dict() for r in export.parity],
        "held_out": rows, "mean": {label: mean_losses(rows, label) for label in ("content", "feed_forward", "optimized")},
        "optimize_steps": args.steps, "variants": quality, "throughput": speed, "threads": args.threads,
        "pictures": written}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
