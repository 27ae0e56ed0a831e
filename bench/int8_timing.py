"""Two facts the int8 format search's timing rests on (issue 17), measured on torchvision's ImageNet MobileNetV2.

1. ``spin``: onnxruntime's intra-op threads keep spinning after a session's last call, and a session timed right
   after another pays for it. Two sessions (fp32 and int8) timed in alternating blocks of calls, with a rest of
   0, 10, 50 or 100 ms between blocks: the median first call of a block against the median of the rest. The
   search rests ``TIMING_PAUSE_S`` (export/quantize.py).
2. ``stem``: the int8 image stem against the float one. Plain onnxruntime QDQ U8S8 per-channel builds of the same
   model and calibration, the stem convolution left out of quantization or not, timed side by side at batch 1
   and 32 (``--repeats`` interleaved comparisons). The search keeps an int8 stem when it is faster at the largest
   batch and at most ``TWIN_SLOWER_LIMIT`` slower at the others.

Speed does not depend on the weights' or the inputs' values: calibration and timing use normal noise.

    python bench/int8_timing.py        # ~3 min on 2 quiet cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from common import write_result  # noqa: E402

from dlpipe.export.onnx_export import export_torchvision  # noqa: E402
from dlpipe.runtime.benchmark import measure_interleaved  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"


def build(folder: Path) -> dict[str, Path]:
    """fp32 MobileNetV2 and its QDQ U8S8 per-channel builds with the stem in float and in int8."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    export_torchvision("torchvision:mobilenet_v2", folder / "fp32.onnx", weights=WEIGHTS)
    quant_pre_process(str(folder / "fp32.onnx"), str(folder / "prep.onnx"))
    stem = next(n.name for n in onnx.load(str(folder / "prep.onnx")).graph.node if n.op_type == "Conv")
    inputs = np.random.default_rng(0).normal(0, 1, (16, 3, 224, 224)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": inputs[i:i + 1]} for i in range(len(inputs))])

        def get_next(self):
            return next(self.batches, None)

    paths = {"fp32": folder / "fp32.onnx"}
    for name, excluded in (("float_stem", [stem]), ("int8_stem", [])):
        paths[name] = folder / f"{name}.onnx"
        quantize_static(str(folder / "prep.onnx"), str(paths[name]), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=excluded, extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return paths


def spin(sessions: dict[str, ort.InferenceSession], batch: int, blocks: int, per_block: int) -> list[dict]:
    """First call of a block against the block's other calls, for each rest between blocks."""
    x = {"image": np.random.default_rng(1).normal(0, 1, (batch, 3, 224, 224)).astype(np.float32)}
    for s in sessions.values():
        s.run(None, x)
    rows = []
    for rest in (0.0, 0.01, 0.05, 0.1):
        first = {k: [] for k in sessions}
        others = {k: [] for k in sessions}
        for _ in range(blocks):
            for name, s in sessions.items():
                for i in range(per_block):
                    start = time.perf_counter()
                    s.run(None, x)
                    (first if i == 0 else others)[name].append(1000 * (time.perf_counter() - start))
                time.sleep(rest)
        for name in sessions:
            a, b = statistics.median(first[name]), statistics.median(others[name])
            rows.append({"rest_s": rest, "session": name, "first_call_ms": round(a, 2), "other_calls_ms": round(b, 2),
                         "first_over_others": round(a / b, 2)})
            print(f"rest {1000 * rest:>4.0f} ms  {name:<10} first call {a:7.2f} ms, others {b:7.2f} ms: {a / b:.2f}x")
    return rows


def stem(sessions: dict[str, ort.InferenceSession], repeats: int) -> list[dict]:
    """p50 of the two stem builds side by side at batch 1 and 32, and int8 stem / float stem."""
    rows = []
    for batch, iters in ((1, 60), (32, 24)):
        x = {"image": np.random.default_rng(2).normal(0, 1, (batch, 3, 224, 224)).astype(np.float32)}
        runners = {name: (lambda s=s: s.run(None, x)) for name, s in sessions.items()}
        for repeat in range(repeats):
            stats = measure_interleaved(runners, batch=batch, warmup=2, iters=iters, rounds=6, pause_s=0.15)
            f, i = stats["float_stem"].p50_ms, stats["int8_stem"].p50_ms
            rows.append({"batch": batch, "repeat": repeat, "float_stem_ms": round(f, 3), "int8_stem_ms": round(i, 3),
                         "int8_over_float": round(i / f, 3)})
            print(f"batch {batch:>2} repeat {repeat}: float stem {f:8.2f} ms, int8 stem {i:8.2f} ms: {i / f:.3f}x")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp))
        sessions = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    for name, path in paths.items()}
        spin_rows = spin({k: sessions[k] for k in ("fp32", "float_stem")}, batch=4, blocks=12, per_block=6)
        stem_rows = stem({k: sessions[k] for k in ("float_stem", "int8_stem")}, args.repeats)
    summary = {f"int8_over_float_stem_b{b}": statistics.median(r["int8_over_float"] for r in stem_rows
                                                               if r["batch"] == b) for b in (1, 32)}
    print(summary)
    path = write_result("int8_timing", {"threads": "onnxruntime default (one per core)", "spin": spin_rows,
                                        "stem": stem_rows, "summary": summary}, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
