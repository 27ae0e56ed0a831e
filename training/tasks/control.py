"""The control task: observation in, an action out (DQN Q-networks). It trains in an environment with its
own step loop (replay, target network, epsilon schedule), keeps the shared checkpoint and metrics
bookkeeping, and is judged by the return its policy earns when it plays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlpipe.runtime.policy import Policy
from dlpipe.training import dqn, report_plots
from dlpipe.training.loop import Metric, TrainConfig
from dlpipe.training.play import play
from dlpipe.training.tasks.base import DemoRow, QuantizationPolicy, Task
from dlpipe.training.tasks.common import single_graph

METRIC = Metric("mean_return", "mean return")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """A :class:`TrainConfig` as a DQN run: its output folder, learning rate, batch size, seed and threads
    (the environment and step budget come from the model's recipe)."""
    return dqn.train(dqn.DQNConfig(model=cfg.model, out=cfg.out, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                                   threads=cfg.threads, progress=cfg.progress))


def evaluate_onnx(predictor: Policy, model: str | Path, dataset: str | None, split: str = "test",
                  limit: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Mean return of the policy over ``limit`` (default 10) episodes in its environment (or ``dataset``,
    another environment id), seeded apart from training's evaluation episodes."""
    del predictor, split, data_dir
    r = play(model, dataset, episodes=limit or 10, seed=1000)
    return {"mean_return": r["mean_return"], "std_return": r["std_return"], "episodes": r["episodes"],
            "images": 0, "env": r["env"], "policy_ms_per_step": r["policy_ms_per_step"], "returns": r["returns"]}


TASK = Task(
    name="control", description="observation in, an action out (a DQN policy playing its environment)",
    metric=METRIC, train=train, command=dqn.train_command, summary=dqn.summary, graphs=single_graph,
    metadata=lambda ckpt: {"environment": ckpt["environment"]},
    quantization=QuantizationPolicy(inputs=dqn.observations, agreement=dqn.decisive_agreement,
                                    agreement_name="agreement on decisive actions",
                                    keep_fp32_nodes=dqn.int8_fp32_nodes, bias_correct_output=True),
    evaluate=evaluate_onnx, plots=report_plots.returns, predictor=Policy,
    report=lambda r: (f"mean return {r['mean_return']:.1f} ± {r['std_return']:.1f} over {r['episodes']} "
                      f"episode{'s' * (r['episodes'] != 1)}"),
    demo=DemoRow(model="dqn-cartpole", options=dict(total_steps=8000, eval_interval=2000),
                 quick=dict(total_steps=2000, eval_interval=500), app=("play", "{model}", "--episodes", "2"),
                 describe=lambda r: (f"played {r['episodes']} episode{'s' * (r['episodes'] != 1)} "
                                     f"({r['mean_return']:.0f} return)"),
                 # near-tie Q-values make argmax agreement a poor gate for policies; the return is the check
                 quantize={"calibration_size": 256, "min_agreement": 0.0, "check_size": 512}, evaluate_limit=5))
