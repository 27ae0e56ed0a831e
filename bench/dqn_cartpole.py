"""DQN on CartPole-v1 (issue 5): mean return over 20 evaluation episodes after at most 100k
environment steps, over several seeds; ONNX-vs-PyTorch action agreement on 10,000 recorded
observations; fp16 and int8 policies' mean return beside fp32; policy latency per action.

Targets: mean return >= 475 (20 episodes) after <= 100k steps, >= 3 seeds; ONNX picks PyTorch's
action on >= 99.9% of 10,000 recorded observations; fp16/int8 mean return within 5% of fp32.

Recipe: rl-baselines3-zoo's CartPole-v1 DQN (lr 2.3e-3, batch 64, buffer 100k, learning starts
1000, gamma 0.99, target update every 10 steps, train every 256 steps with 128 gradient steps,
epsilon 1 -> 0.04 over the first 16% of the steps, MLP 256-256), 50k steps, ``best.pt`` chosen by
the periodic 5-episode greedy evaluations during training (every 2,500 steps). The 20 evaluation
episodes here use other seeds than those evaluations.

    python bench/dqn_cartpole.py                                  # trains 3 seeds (~2-3 min each, 1 thread)
    python bench/dqn_cartpole.py --reuse                          # reuse runs/bench_dqn/seedN/best.pt
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
from dlpipe.export.onnx_export import export_checkpoint  # noqa: E402
from dlpipe.export.quantize import QuantizationConfig, quantize  # noqa: E402
from dlpipe.runtime import load  # noqa: E402
from dlpipe.runtime.formats import variant_path  # noqa: E402
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from dlpipe.training.dqn import (DQNConfig, greedy_action, record_observations, resolve_config,  # noqa: E402
                                 run_episodes, train)

# the registered recipe (rl-baselines3-zoo's), what `dlpipe train dqn-cartpole` runs (issue 19)
RECIPE = resolve_config(DQNConfig(model="dqn-cartpole"))
ENV = RECIPE.env
EVAL_SEED = 100_000  # evaluation episodes: seeds 100000.., never used during training


def bench_seed(seed: int, out: Path, total_steps: int, episodes: int, observations: int, reuse: bool) -> dict:
    run = out / f"seed{seed}"
    train_result = None
    if not (reuse and (run / "best.pt").is_file()):
        train_result = train(DQNConfig(model="dqn-cartpole", env=ENV, out=str(run), total_steps=total_steps,
                                       seed=seed, threads=1, progress=False))
    ckpt = load_checkpoint(run / "best.pt")
    module = model_from_checkpoint(ckpt)
    onnx_path = run / "policy.onnx"
    export = export_checkpoint(run / "best.pt", onnx_path)
    reports = {"fp32": None}
    for precision, min_agreement in (("fp16", 0.0), ("int8", 0.0)):  # agreement reported, not enforced here
        reports[precision] = quantize(onnx_path, variant_path(onnx_path, precision),
                                      QuantizationConfig(precision, min_agreement=min_agreement))
    row: dict = {"seed": seed, "checkpoint_step": ckpt["metrics"].get("step"),
                 "train": {k: train_result[k] for k in ("steps", "episodes", "best_eval_return", "final_eval_return",
                                                        "seconds", "steps_per_second")} if train_result else None,
                 "export_max_abs_diff": max(p.max_abs for p in export.parity)}
    row["pytorch_mean_return"] = float(np.mean(run_episodes(lambda o: greedy_action(module, o), ENV, episodes,
                                                            EVAL_SEED)))
    policies = {p: load(variant_path(onnx_path, p) if p != "fp32" else onnx_path, device="cpu", threads=1)
                for p in ("fp32", "fp16", "int8")}
    for precision, policy in policies.items():
        start = time.perf_counter()
        returns = run_episodes(policy.act, ENV, episodes, EVAL_SEED)
        row[precision] = {"mean_return": float(np.mean(returns)), "std_return": float(np.std(returns)),
                          "min_return": float(np.min(returns)), "seconds": round(time.perf_counter() - start, 2)}
    # 10,000 observations met by the fp32 ONNX policy (10% random actions so that unusual states appear too)
    obs = record_observations(policies["fp32"].act, ENV, observations, seed=EVAL_SEED + 777)
    with torch.no_grad():
        torch_q = module(torch.from_numpy(obs)).numpy()
    for precision, policy in policies.items():
        q = policy.q_values(obs)
        row[precision]["agreement_with_pytorch"] = float((q.argmax(1) == torch_q.argmax(1)).mean())
        if reports[precision] is not None:
            row[precision]["quantize_check_agreement"] = reports[precision].agreement
            row[precision]["kept_fp32"] = reports[precision].kept_fp32
        gap = np.abs(np.diff(torch_q, axis=1)[:, 0])
        decisive = gap > 0.3
        row[precision]["agreement_where_gap_gt_0.3"] = float((q.argmax(1) == torch_q.argmax(1))[decisive].mean())
        row[precision]["share_gap_gt_0.3"] = float(decisive.mean())
        one = obs[:1]
        for _ in range(50):
            policy.predict(one)
        start = time.perf_counter()
        for _ in range(1000):
            policy.predict(one)
        row[precision]["ms_per_action"] = round((time.perf_counter() - start), 4)  # 1000 calls -> ms each
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_dqn")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--total-steps", type=int, default=RECIPE.total_steps, help="default: the recipe's")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--observations", type=int, default=10_000)
    p.add_argument("--reuse", action="store_true", help="reuse OUT/seedN/best.pt when it exists")
    p.add_argument("--result", default=None, help="JSON output (default bench/results/dqn_cartpole.json)")
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [bench_seed(s, Path(args.out), args.total_steps, args.episodes, args.observations, args.reuse)
            for s in seeds]
    summary = {"env": ENV, "total_steps": args.total_steps, "eval_episodes": args.episodes,
               "recorded_observations": args.observations, "seeds": seeds,
               "mean_return_over_seeds": {pr: float(np.mean([r[pr]["mean_return"] for r in rows]))
                                          for pr in ("fp32", "fp16", "int8")},
               "pytorch_mean_return_over_seeds": float(np.mean([r["pytorch_mean_return"] for r in rows])),
               "min_onnx_agreement_with_pytorch": min(r["fp32"]["agreement_with_pytorch"] for r in rows)}
    path = write_result("dqn_cartpole", {"summary": summary, "runs": rows}, args.result)
    print(table([[r["seed"], r["checkpoint_step"], r["pytorch_mean_return"], r["fp32"]["mean_return"],
                  r["fp16"]["mean_return"], r["int8"]["mean_return"], f"{100 * r['fp32']['agreement_with_pytorch']:.2f}%",
                  f"{100 * r['fp16']['agreement_with_pytorch']:.2f}%", f"{100 * r['int8']['agreement_with_pytorch']:.2f}%",
                  r["fp32"]["ms_per_action"], r["int8"]["ms_per_action"]] for r in rows],
                ["seed", "best.pt step", "torch", "fp32", "fp16", "int8", "onnx agree", "fp16 agree", "int8 agree",
                 "fp32 ms/act", "int8 ms/act"]))
    print(f"\nmean return over seeds: {summary['mean_return_over_seeds']}\nwrote {path}")


if __name__ == "__main__":
    main()
