"""A short Atari DQN run (issue 5): the Nature CNN trains on CPU without error, its exported policy
(fp32, fp16, int8) plays through the app, and the training throughput (environment steps per second)
and the policy latency per action are reported.

Full Atari scores need ~10M steps (40M frames) and a GPU; this script does not claim them. The full
recipe is ``dlpipe train dqn-atari --env ALE/Pong-v5`` (10M steps, Nature/cleanrl hyper-parameters).

    python bench/dqn_atari.py                          # 5,000 steps on Pong (several minutes on 1 thread)
    python bench/dqn_atari.py --reuse                  # reuse runs/dqn_atari/pong/best.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import write_result  # noqa: E402

from dlpipe.apps.output import table  # noqa: E402
from dlpipe.training.play import play  # noqa: E402
from dlpipe.export.onnx_export import export_checkpoint  # noqa: E402
from dlpipe.export.quantize import QuantizationConfig, quantize  # noqa: E402
from dlpipe.runtime import load  # noqa: E402
from dlpipe.runtime.formats import variant_path  # noqa: E402
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from dlpipe.training.dqn import DQNConfig, train  # noqa: E402


def latency_ms(fn, obs, iters: int = 200) -> float:
    for _ in range(10):
        fn(obs)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(obs)
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="ALE/Pong-v5")
    p.add_argument("--out", default="runs/dqn_atari/pong")
    p.add_argument("--total-steps", type=int, default=5000)
    p.add_argument("--play-steps", type=int, default=1000, help="cap on each played episode (agent steps)")
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--result", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    train_result = None
    if not (args.reuse and (out / "best.pt").is_file()):
        train_result = train(DQNConfig(model="dqn-atari", env=args.env, out=str(out), total_steps=args.total_steps,
                                       buffer_size=args.total_steps, threads=1, progress=False))
    ckpt = load_checkpoint(out / "best.pt")
    module = model_from_checkpoint(ckpt)
    onnx_path = out / "policy.onnx"
    export = export_checkpoint(out / "best.pt", onnx_path)
    paths = {"fp32": onnx_path}
    for precision in ("fp16", "int8"):
        report = quantize(onnx_path, variant_path(onnx_path, precision), QuantizationConfig(precision, min_agreement=0))
        paths[precision] = Path(report.path)
    obs = ckpt["examples"][:1].numpy()
    with torch.no_grad():
        rows = [{"variant": "pytorch eager", "ms_per_action": latency_ms(lambda o: module(torch.from_numpy(o)), obs)}]
    for precision, path in paths.items():
        policy = load(path, device="cpu", threads=1)
        r = play(path, args.env, episodes=1, seed=0, epsilon=0.05, max_steps=args.play_steps)
        rows.append({"variant": precision, "ms_per_action": latency_ms(policy.predict, obs),
                     "return": r["mean_return"], "steps": r["lengths"][0], "size_kib": round(path.stat().st_size / 1024)})
    doc = {"env": args.env, "train": train_result, "export_max_abs_diff": max(p.max_abs for p in export.parity),
           "variants": rows, "note": "short run: scores are not meaningful; see README for the full-run command"}
    path = write_result("dqn_atari", doc, args.result)
    if train_result:
        print(f"trained {train_result['steps']} steps at {train_result['steps_per_second']} steps/s")
    print(table([[r["variant"], r["ms_per_action"], r.get("return"), r.get("steps"), r.get("size_kib")] for r in rows],
                ["variant", "ms/action (b=1, 1 thread)", "return", "steps played", "KiB"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
