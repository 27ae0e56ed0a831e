"""int8 on real CNNs (issue 17): PyTorch eager vs ONNX fp32 vs dlpipe int8 vs plain onnxruntime QDQ (U8S8 and
S8S8) on the same model and calibration, medians measured side by side in one run (interleaved rounds), with
how many convolutions each int8 model runs as integer kernels (read from onnxruntime's optimized graph) and its
agreement with fp32 on held-out images. Then the calibration methods (minmax, entropy, percentile) compared on
held-out images, the format fixed (qdq-u8s8) so only the calibration differs.

Models: torchvision's ImageNet MobileNetV2 (the real weights, ../shared/weights) at 3x224x224, batch 1 and 32;
the registered ``deep_convnet`` and ``resnet_small`` trained one epoch on 12,000 MNIST digits (speed does not
depend on training, agreement does), batch 1 and 64. This machine has no ImageNet: MobileNetV2 is calibrated on
Fashion-MNIST training images and checked on Fashion-MNIST test images, upscaled to RGB 224x224 by the runtime's
preprocessing (stretched, ImageNet mean/std) -- out-of-distribution inputs with low-margin predictions, so its
top-1 agreement is a harsh measure; top-5 containment is reported beside it.

"Plain onnxruntime" is ``quant_pre_process`` then ``quantize_static`` with onnxruntime's defaults (per-tensor
weights) and only the activation type set, on the same calibration array; and U8S8 with per-channel weights, the
plain setting with dlpipe's weight granularity.

Targets: dlpipe int8 >= 2.5x fp32 at batch 32 on MobileNetV2 and never slower than the best plain setting;
fp32 >= 3x eager at batch 1; deep_convnet int8 >= 2x fp32 at batch 64.

    python bench/int8_real.py --data-dir ../shared/data            # 13 min on 2 quiet cores (AVX-512 VNNI EPYC, 2026-12-07)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.export.onnx_export import export_checkpoint, export_user_module  # noqa: E402
from dlpipe.export.quantize import (QuantizationConfig, QuantizationError, conv_kernels,  # noqa: E402
                                   optimized_op_counts, quantize)
from dlpipe.runtime import Engine  # noqa: E402
from dlpipe.runtime.benchmark import SPREAD_FOOTNOTE, marked, measure_interleaved  # noqa: E402
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from dlpipe.training.data import load_split  # noqa: E402
from dlpipe.training.tasks.common import load_images_for  # noqa: E402
from dlpipe.training.train import TrainConfig, train  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# name: (activation type, per-channel weights). onnxruntime's default is per-tensor; per-channel U8S8 is the plain
# setting with dlpipe's weight granularity (per-tensor costs MobileNetV2's depthwise convolutions most of their
# accuracy).
PLAIN = {"plain ORT QDQ U8S8": ("QUInt8", False), "plain ORT QDQ S8S8": ("QInt8", False),
         "plain ORT QDQ U8S8 per-channel": ("QUInt8", True)}
TRAIN_IMAGES = 12000
# dlpipe's --min-agreement. The MNIST models are trained one epoch only: 95%. MobileNetV2 on out-of-distribution
# Fashion-MNIST images agrees with fp32 on ~60% of them in any int8 format (its predictions there have a median
# top-1 probability of 0.23); 50% lets every convolution run in int8, and 66% shows what leaving out of
# quantization the convolutions int8 hurts most buys (the quantizer's search) and costs.
MNIST_GATE = 0.95
MOBILENET_GATES = (0.5, 0.66)


def mobilenet_v2(out: Path, weights: Path) -> dict[str, Any]:
    """The ImageNet MobileNetV2 exported through dlpipe (its own builder, the real weights)."""
    import torchvision

    path = out / "mobilenet_v2.onnx"
    if not path.exists():
        labels = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
        export_user_module("torchvision.models:mobilenet_v2", path, input_shape=(3, 224, 224), labels=labels,
                           weights=weights, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    module = torchvision.models.mobilenet_v2()
    module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return {"name": "mobilenet_v2 (ImageNet weights)", "onnx": path, "module": module.eval(), "batch": 32,
            "calibration": "fashion-mnist", "gates": MOBILENET_GATES, "trained": "torchvision ImageNet-1k (IMAGENET1K_V1)"}


def registered(name: str, out: Path, data_dir: str | None) -> dict[str, Any]:
    """A registered classifier trained one epoch on TRAIN_IMAGES MNIST digits (its recipe otherwise), exported."""
    path = out / f"{name}.onnx"
    ckpt = out / name / "best.pt"
    if not ckpt.exists():
        train(TrainConfig(out=str(out / name), progress=False, model=name, dataset="mnist", data_dir=data_dir,
                          epochs=1, limit=TRAIN_IMAGES, test_limit=1000))  # the model's recipe otherwise
    if not path.exists():
        export_checkpoint(str(ckpt), path)
    module = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    return {"name": name, "onnx": path, "module": module, "batch": 64, "calibration": "mnist", "gates": (MNIST_GATE,),
            "trained": f"1 epoch on {TRAIN_IMAGES:,} MNIST digits, the registered recipe"}


def plain_ort(src: Path, out: Path, calibration: np.ndarray, activation: str, per_channel: bool = False) -> Path:
    """onnxruntime's own static QDQ quantization, its defaults but the activation type (and per-channel weights)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prep = out.with_suffix(".prep.onnx")
    quant_pre_process(str(src), str(prep))

    class Reader:
        def __init__(self):
            self.chunks = iter(np.array_split(calibration, max(1, len(calibration) // 16)))

        def get_next(self):
            chunk = next(self.chunks, None)
            return None if chunk is None else {"image": chunk}

    quantize_static(str(prep), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType[activation], weight_type=QuantType.QInt8, per_channel=per_channel)
    return out


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's outputs on ``x``, 64 inputs at a time (memory)."""
    engine = Engine(path, device="cpu")
    return np.concatenate([engine.run({"image": x[i:i + 64]})[0] for i in range(0, len(x), 64)])


def agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Top-1 agreement with fp32 and how often fp32's class is in the variant's top 5."""
    top5 = np.argsort(got, axis=1)[:, -5:]
    return {"top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
            "fp32_in_top5": float(np.mean([r in t for r, t in zip(ref.argmax(1), top5)]))}


def variants(m: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """dlpipe int8 and the plain onnxruntime int8 models of ``m``, with their conv kernels and agreement."""
    info = Engine(m["onnx"], device="cpu").info
    calib = load_images_for(info, m["calibration"], "train", args.calibration_size, args.data_dir)
    checks = load_images_for(info, m["calibration"], "test", args.check_size, args.data_dir)
    np.save(work / f"{m['onnx'].stem}.calib.npy", calib)
    paths, dlpipe = {}, {}
    for k, gate in enumerate(m["gates"]):
        name = "dlpipe int8" if k == 0 else f"dlpipe int8, gate {gate:.0%}"
        start = time.perf_counter()
        try:
            report = quantize(m["onnx"], work / f"{m['onnx'].stem}.int8.{k}.onnx",
                              QuantizationConfig("int8", calibration_size=len(calib), batch=m["batch"], min_agreement=gate),
                              calibration=str(work / f"{m['onnx'].stem}.calib.npy"), check=m["calibration"],
                              check_size=args.check_size, data_dir=args.data_dir)
        except QuantizationError as exc:  # the gate refused every attempt: reported, not timed
            if k == 0:
                raise
            dlpipe[name] = {"gate": gate, "error": str(exc)}
            print(f"{name}: {exc}")
            continue
        paths[name] = Path(report.path)
        dlpipe[name] = {"gate": gate, "format": report.format, "reason": report.format_reason,
                        "kept_fp32": report.kept_fp32, "conv_summary": report.conv_summary,
                        "candidates": report.candidates, "quantize_seconds": round(time.perf_counter() - start, 1)}
    for name, (activation, per_channel) in PLAIN.items():
        suffix = activation + (".per_channel" if per_channel else "")
        paths[name] = plain_ort(m["onnx"], work / f"{m['onnx'].stem}.{suffix}.onnx", calib, activation, per_channel)
    ref = logits(m["onnx"], checks)
    described = {}
    for name, path in paths.items():
        integer, floating = conv_kernels(optimized_op_counts(path))
        described[name] = {"path": str(path), "integer_convs": integer, "float_convs": floating,
                           **agreement(ref, logits(path, checks))}
    return {"paths": paths, "check_images": len(checks), "calibration_images": len(calib), "int8": described,
            "dlpipe": dlpipe}


def timings(m: dict[str, Any], paths: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Every runner at batch 1 and the model's batch, interleaved; ``--repeats`` times, ratios' medians."""
    info = Engine(m["onnx"], device="cpu").info
    x = load_images_for(info, m["calibration"], "test", m["batch"], args.data_dir)
    sessions = {"onnx fp32": Engine(m["onnx"], device="cpu", threads=args.threads).session}
    sessions |= {name: Engine(p, device="cpu", threads=args.threads).session for name, p in paths.items()}
    repeats = []
    for _ in range(args.repeats):
        per_batch = {}
        for batch in (1, m["batch"]):
            xb, tb = x[:batch], torch.from_numpy(x[:batch])

            def eager(t=tb):
                with torch.inference_mode():
                    return m["module"](t)

            runners = {"pytorch eager": eager}
            runners |= {name: (lambda s=s, xb=xb: s.run(None, {"image": xb})) for name, s in sessions.items()}
            iters = args.iters if batch == 1 else max(10, args.iters // 6)
            per_batch[batch] = measure_interleaved(runners, batch=batch, warmup=3, iters=iters, rounds=5, attempts=2)
        repeats.append(per_batch)
    ratios = [_ratios(r, m["batch"]) for r in repeats]
    median = {k: float(statistics.median(r[k] for r in ratios)) for k in ratios[0]}
    middle = sorted(repeats, key=lambda r: _ratios(r, m["batch"])[f"int8_vs_fp32_b{m['batch']}"])[len(repeats) // 2]
    return {"stats": [s.as_dict() for b in middle.values() for s in b.values()], "ratios": median,
            "ratio_range": {k: [round(min(r[k] for r in ratios), 3), round(max(r[k] for r in ratios), 3)]
                            for k in median}, "middle": middle}


def _ratios(per_batch: dict[int, dict[str, Any]], batch: int) -> dict[str, float]:
    """Speed-ups (higher: the first named is faster): fp32 over eager, each int8 over fp32, dlpipe over the best
    plain onnxruntime setting."""
    out = {}
    for b, stats in per_batch.items():
        fp32 = stats["onnx fp32"].p50_ms
        out[f"fp32_vs_eager_b{b}"] = stats["pytorch eager"].p50_ms / fp32
        for name in [n for n in stats if n not in ("pytorch eager", "onnx fp32")]:
            key = name.replace("dlpipe int8", "int8").replace(", gate ", "_gate").replace("%", "").replace(" ", "_")
            out[f"{key}_vs_fp32_b{b}"] = fp32 / stats[name].p50_ms
        best_plain = min(stats[name].p50_ms for name in PLAIN)
        out[f"int8_vs_best_plain_b{b}"] = best_plain / stats["dlpipe int8"].p50_ms
        out[f"int8_vs_plain_per_channel_b{b}"] = stats["plain ORT QDQ U8S8 per-channel"].p50_ms / stats["dlpipe int8"].p50_ms
    return out


def calibration_methods(m: dict[str, Any], work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """minmax, entropy and percentile on the same calibration images, format fixed, agreement on held-out ones
    (and, for the MNIST models, held-out accuracy against the labels)."""
    info = Engine(m["onnx"], device="cpu").info
    calib = work / f"{m['onnx'].stem}.calib.npy"
    np.save(calib, load_images_for(info, m["calibration"], "train", args.calibration_size, args.data_dir))
    checks = load_images_for(info, m["calibration"], "test", args.check_size, args.data_dir, offset=args.check_size)
    ref = logits(m["onnx"], checks)
    labels = None
    if m["calibration"] == "mnist":
        _, labels = load_split("mnist", "test", args.data_dir, limit=2 * args.check_size)
        labels = np.asarray(labels[args.check_size:2 * args.check_size])
    rows = []
    for method in ("minmax", "entropy", "percentile"):
        start = time.perf_counter()
        report = quantize(m["onnx"], work / f"{m['onnx'].stem}.{method}.onnx",
                          QuantizationConfig("int8", format="qdq-u8s8", calibration_method=method,
                                             calibration_size=args.calibration_size, min_agreement=0.0),
                          calibration=str(calib), check=m["calibration"], check_size=64, data_dir=args.data_dir)
        got = logits(Path(report.path), checks)
        row = {"model": m["name"], "method": method, "seconds": round(time.perf_counter() - start, 1),
               **agreement(ref, got)}
        if labels is not None:
            row |= {"fp32_accuracy": float((ref.argmax(1) == labels).mean()),
                    "int8_accuracy": float((got.argmax(1) == labels).mean())}
        rows.append(row)
    return rows


def print_model(m: dict[str, Any], v: dict[str, Any], t: dict[str, Any]) -> None:
    batch = m["batch"]
    print(f"\n== {m['name']} ({m['trained']})")
    rows = []
    for name in t["middle"][1]:
        s1, sb = t["middle"][1][name], t["middle"][batch][name]
        q = v["int8"].get(name, {})
        rows.append([name, marked(s1.p50_ms, s1.spread_too_wide, 3), marked(sb.p50_ms, sb.spread_too_wide, 2),
                     f"{q['integer_convs']}/{q['integer_convs'] + q['float_convs']}" if q else "",
                     f"{q['top1_agreement']:.2%}" if q else "", f"{q['fp32_in_top5']:.2%}" if q else ""])
    print(table(rows, ["runner", "b1 p50 ms", f"b{batch} p50 ms", "int convs", "top-1 agr.", "fp32 in top-5"]))
    print(table([[k, f"{val:.2f}", f"{t['ratio_range'][k][0]:.2f}-{t['ratio_range'][k][1]:.2f}"]
                 for k, val in t["ratios"].items()], ["ratio (higher: first is faster)", "median", "range"]))
    for name, d in v["dlpipe"].items():
        if "error" in d:
            continue
        print(f"{name} (--min-agreement {d['gate']:.0%}): {d['format']}, {d['conv_summary']}; float: "
              f"{', '.join(d['kept_fp32']) or 'none'}; {d['quantize_seconds']} s to quantize\n  why: {d['reason']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("DLPIPE_DATA_DIR"))
    p.add_argument("--weights", default=str(WEIGHTS))
    p.add_argument("--work", default=None, help="folder for the models (default: a temporary one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibration-size", type=int, default=128)
    p.add_argument("--check-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=60, help="timed calls at batch 1 (a sixth, at least 10, at the large batch)")
    p.add_argument("--repeats", type=int, default=2, help="whole interleaved comparisons; ratios are their medians")
    p.add_argument("--skip-calibration", action="store_true")
    p.add_argument("--skip-timing", action="store_true", help="only the calibration methods")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = [mobilenet_v2(work, Path(args.weights)), registered("deep_convnet", work, args.data_dir),
                  registered("resnet_small", work, args.data_dir)]
        results, calibration = [], []
        for m in models if not args.skip_timing else []:
            v = variants(m, work, args)
            t = timings(m, v.pop("paths"), args)
            print_model(m, v, t)
            t.pop("middle")
            results.append({"model": m["name"], "trained": m["trained"], "batch": m["batch"], **v, **t})
        if not args.skip_calibration:
            for m in models:
                calibration += calibration_methods(m, work, args)
            print("\ncalibration methods (format qdq-u8s8; agreement on held-out images the check above did not use)")
            print(table([[r["model"], r["method"], r["seconds"], f"{r['top1_agreement']:.2%}", f"{r['fp32_in_top5']:.2%}",
                          f"{r['fp32_accuracy']:.2%} / {r['int8_accuracy']:.2%}" if "int8_accuracy" in r else ""]
                         for r in calibration], ["model", "method", "seconds", "top-1 agr.", "fp32 in top-5",
                                                 "accuracy fp32 / int8"]))
    mnv2, dcn = (results[0]["ratios"], results[1]["ratios"]) if results else ({}, {})
    targets = {} if not results else {"mobilenet_v2: dlpipe int8 >= 2.5x fp32 at batch 32": mnv2["int8_vs_fp32_b32"] >= 2.5,
               "mobilenet_v2: dlpipe int8 never slower than the best plain ORT (b1, b32)":
                   min(mnv2["int8_vs_best_plain_b1"], mnv2["int8_vs_best_plain_b32"]) >= 1.0,
               "mobilenet_v2: dlpipe int8 never slower than plain ORT per-channel U8S8 (b1, b32)":
                   min(mnv2["int8_vs_plain_per_channel_b1"], mnv2["int8_vs_plain_per_channel_b32"]) >= 1.0,
               "mobilenet_v2: fp32 >= 3x eager at batch 1": mnv2["fp32_vs_eager_b1"] >= 3,
               "deep_convnet: int8 >= 2x fp32 at batch 64": dcn["int8_vs_fp32_b64"] >= 2}
    for name, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(SPREAD_FOOTNOTE)
    path = write_result("int8_real", {"threads": args.threads, "load_average_before": load_before,
                                      "load_average_after": os.getloadavg(), "models": results,
                                      "calibration_methods": calibration, "targets": targets,
                                      "calibration_data": "Fashion-MNIST (MobileNetV2, upscaled to RGB 224) and MNIST "
                                                          "(deep_convnet, resnet_small) training images; checks on test images"},
                        args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
