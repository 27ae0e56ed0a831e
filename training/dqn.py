"""Deep Q-learning (Mnih et al., 2015) as plain functions, configured by one :class:`DQNConfig`
(cleanrl's ``dqn.py`` / ``dqn_atari.py`` layout, issue 5).

A uniform replay buffer with wrap-around, a target network copied on a fixed schedule, a linear
epsilon-greedy schedule, Huber loss, Adam with gradient-norm clipping, optional Double DQN
(van Hasselt et al., 2016), learning starts and a train frequency with several gradient steps per
training phase (the rl-baselines3-zoo CartPole recipe), periodic greedy evaluation episodes that
choose ``best.pt``, a progress bar with the recent return, ``metrics.jsonl`` and seeded runs.
Checkpoints have the same format as ``dlpipe train``'s, with recorded observations as ``examples``
so ``dlpipe export`` proves parity on real inputs.
"""

from __future__ import annotations

import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dlpipe.runtime.errors import InputError
from dlpipe.training.checkpoint import checkpoint_payload, save_checkpoint
from dlpipe.training.envs import EnvironmentSpec, environment_spec, lives, make_env
from dlpipe.training.loop import MetricsLog
from dlpipe.training.registry import get_spec


@dataclass
class DQNConfig:
    """Everything one DQN run depends on; stored in the checkpoint. ``None`` takes the model's recipe."""

    model: str = "dqn-cartpole"
    """Registered Q-network (``dqn-cartpole`` MLP or ``dqn-atari`` Nature CNN)."""
    env: str | None = None
    """Gymnasium environment id (``CartPole-v1``, ``ALE/Pong-v5``...); the model's default when None."""
    out: str = "runs/dqn"
    """Output folder: best.pt, last.pt and metrics.jsonl."""
    total_steps: int | None = None
    """Environment steps to train for."""
    buffer_size: int | None = None
    """Replay buffer capacity (transitions); the oldest are overwritten."""
    lr: float | None = None
    """Adam learning rate."""
    batch_size: int | None = None
    """Transitions per gradient step."""
    gamma: float | None = None
    """Discount factor."""
    learning_starts: int | None = None
    """Environment steps of pure exploration before the first gradient step."""
    train_freq: int | None = None
    """A training phase every this many environment steps."""
    gradient_steps: int | None = None
    """Gradient steps per training phase."""
    target_update_interval: int | None = None
    """Copy the online network into the target network every this many environment steps."""
    exploration_fraction: float | None = None
    """Share of ``total_steps`` over which epsilon falls linearly from ``exploration_initial_eps``."""
    exploration_initial_eps: float = 1.0
    """Epsilon at the first step."""
    exploration_final_eps: float | None = None
    """Epsilon after the exploration phase."""
    max_grad_norm: float = 10.0
    """Gradient-norm clip."""
    double_dqn: bool = False
    """Choose the next action with the online network, value it with the target network."""
    hidden: tuple[int, ...] | None = None
    """MLP hidden widths (``dqn-cartpole`` only)."""
    clip_rewards: bool | None = None
    """Learn from the sign of each reward (Atari)."""
    episodic_life: bool | None = None
    """A lost life ends the bootstrapped return, the game goes on (Atari)."""
    eval_interval: int | None = None
    """Greedy evaluation every this many environment steps (0: only at the end)."""
    eval_episodes: int = 5
    """Episodes per evaluation."""
    eval_epsilon: float | None = None
    """Epsilon while evaluating (0 for CartPole, 0.05 for Atari as in the Nature paper)."""
    eval_max_steps: int | None = None
    """Cap on an evaluation episode's length (None: the environment's own limit)."""
    seed: int = 0
    """Seed for torch, numpy, Python, the environment and its action space."""
    threads: int | None = None
    """torch intra-op threads; torch's default when None."""
    progress: bool = True
    """Show a progress bar."""
    examples: int = 64
    """Recorded observations stored in the checkpoint for export parity checks."""


# Per-model defaults: rl-baselines3-zoo's CartPole-v1 DQN, and the Nature / cleanrl Atari DQN
# (with a smaller default buffer: 1M stacked frames need ~56 GB here, see the README).
RECIPES: dict[str, dict[str, Any]] = {
    "dqn-cartpole": dict(env="CartPole-v1", total_steps=50_000, buffer_size=100_000, lr=2.3e-3, batch_size=64,
                         gamma=0.99, learning_starts=1000, train_freq=256, gradient_steps=128,
                         target_update_interval=10, exploration_fraction=0.16, exploration_final_eps=0.04,
                         hidden=(256, 256), clip_rewards=False, episodic_life=False, eval_interval=2500,
                         eval_epsilon=0.0),
    "dqn-atari": dict(env="ALE/Pong-v5", total_steps=10_000_000, buffer_size=100_000, lr=1e-4, batch_size=32,
                      gamma=0.99, learning_starts=80_000, train_freq=4, gradient_steps=1,
                      target_update_interval=1000, exploration_fraction=0.1, exploration_final_eps=0.01,
                      clip_rewards=True, episodic_life=True, eval_interval=250_000, eval_epsilon=0.05),
}


def resolve_config(cfg: DQNConfig) -> DQNConfig:
    """Fill ``None`` fields from the model's recipe and validate them."""
    if cfg.model not in RECIPES:
        get_spec(cfg.model)  # an unknown name gets the registry's error
        raise InputError(f"{cfg.model} is not a DQN Q-network; choose from {', '.join(RECIPES)}")
    out = DQNConfig(**asdict(cfg))
    for name, value in RECIPES[cfg.model].items():
        if getattr(out, name) is None:
            setattr(out, name, value)
    if cfg.learning_starts is None:  # a run shorter than the recipe's warm-up still learns (10% warm-up)
        out.learning_starts = min(out.learning_starts, out.total_steps // 10)
    if out.eval_interval is None:
        out.eval_interval = 0
    for name in ("total_steps", "buffer_size", "batch_size", "train_freq", "gradient_steps", "target_update_interval"):
        if getattr(out, name) < 1:
            raise InputError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(out, name)}")
    if out.lr <= 0 or not 0 <= out.gamma <= 1 or not 0 < out.exploration_fraction <= 1:
        raise InputError("the learning rate must be above zero, gamma in [0, 1] and the exploration fraction in (0, 1]")
    return out


def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    """Epsilon at ``step``: linear from ``start`` to ``end`` over ``duration`` steps, then ``end``."""
    return end + (start - end) * max(0.0, 1.0 - step / max(duration, 1))


class ReplayBuffer:
    """Uniform replay of ``(obs, action, reward, next_obs, done)`` in preallocated numpy arrays.

    When full, new transitions overwrite the oldest (a ring). Observations keep the environment's
    dtype (uint8 Atari frames stay uint8).
    """

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype, seed: int = 0):
        self.capacity = capacity
        self.obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.next_obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=np.float32)
        self.pos, self.size = 0, 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, done: bool) -> None:
        self.obs[self.pos] = obs
        self.next_obs[self.pos] = next_obs
        self.actions[self.pos], self.rewards[self.pos], self.dones[self.pos] = action, reward, float(done)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """A uniform batch (with replacement) as float32/int64 tensors."""
        idx = self.rng.integers(0, self.size, size=batch_size)
        return (torch.from_numpy(self.obs[idx].astype(np.float32)), torch.from_numpy(self.actions[idx]),
                torch.from_numpy(self.rewards[idx]), torch.from_numpy(self.next_obs[idx].astype(np.float32)),
                torch.from_numpy(self.dones[idx]))


def td_loss(q_net: nn.Module, target_net: nn.Module, batch: tuple[torch.Tensor, ...], gamma: float,
            double_dqn: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Huber loss between Q(s, a) and the one-step target; also returns the mean Q(s, a)."""
    obs, actions, rewards, next_obs, dones = batch
    with torch.no_grad():
        next_target = target_net(next_obs)
        if double_dqn:
            next_actions = q_net(next_obs).argmax(1, keepdim=True)
            next_q = next_target.gather(1, next_actions).squeeze(1)
        else:
            next_q = next_target.max(1).values
        target = rewards + gamma * (1.0 - dones) * next_q
    q = q_net(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
    return F.smooth_l1_loss(q, target), q.mean().detach()


def update_target(q_net: nn.Module, target_net: nn.Module, step: int, interval: int) -> bool:
    """Copy the online weights into the target network when ``step`` is a multiple of ``interval``."""
    if step % interval:
        return False
    target_net.load_state_dict(q_net.state_dict())
    return True


def greedy_action(q_net: nn.Module, obs: np.ndarray) -> int:
    with torch.no_grad():
        return int(q_net(torch.as_tensor(np.asarray(obs, dtype=np.float32)).unsqueeze(0)).argmax(1).item())


def run_episodes(act: Callable[[np.ndarray], int], env_id: str, episodes: int, seed: int, epsilon: float = 0.0,
                 max_steps: int | None = None, env=None) -> list[float]:
    """Returns of ``episodes`` episodes of ``act`` (epsilon-greedy), seeded ``seed``, ``seed + 1``..."""
    own = env is None
    env = env or make_env(env_id, max_episode_steps=max_steps)
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    returns = []
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            total, done = 0.0, False
            while not done:
                action = env.action_space.sample() if rng.random() < epsilon else act(obs)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        if own:
            env.close()
    return returns


def record_observations(act: Callable[[np.ndarray], int], env_id: str, count: int, seed: int,
                        epsilon: float = 0.1, max_steps: int | None = None) -> np.ndarray:
    """``count`` observations met while playing ``act`` epsilon-greedily (float32, N x observation shape):
    real policy inputs for parity checks, int8 calibration and agreement checks."""
    env = make_env(env_id, max_episode_steps=max_steps)
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    observations, episode = [], 0
    try:
        obs, _ = env.reset(seed=seed)
        while len(observations) < count:
            observations.append(np.asarray(obs, dtype=np.float32))
            action = env.action_space.sample() if rng.random() < epsilon else act(obs)
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                episode += 1
                obs, _ = env.reset(seed=seed + episode)
    finally:
        env.close()
    return np.stack(observations)


def observations(model_path, source: str | None, split: str, count: int, data_dir: str | None = None,
                 offset: int = 0) -> np.ndarray:
    """Policy inputs for ``dlpipe quantize``: observations recorded by playing the fp32 policy (10% random
    actions; calibration and checks on different seeds), or those of a ``.npy`` file."""
    from dlpipe.runtime.predictors import load

    del data_dir
    policy = load(model_path, device="cpu")
    if source and Path(source).suffix == ".npy":
        arr = np.load(source)
        if arr.ndim < 2 or tuple(arr.shape[1:]) != policy.observation_shape:
            raise InputError(f"'{source}' must hold N x {list(policy.observation_shape)} observations, "
                             f"got {list(arr.shape)}")
        return np.ascontiguousarray(arr[offset:offset + count], dtype=np.float32)
    if source:
        raise InputError(f"a DQN policy calibrates on observations recorded in {policy.env_id} or on a .npy "
                         f"file of them, not on '{source}'")
    return record_observations(policy.act, policy.env_id, count, seed=1 if split == "train" else 2, max_steps=2000)


def int8_fp32_nodes(model) -> tuple[str, ...]:
    """Layers of a Q-network (an ONNX ``ModelProto``) that int8 keeps in float32: the Q-value head (the
    action gap, often 0.1% of the Q-values on CartPole, is below an int8 output's resolution) and, for
    feature-vector observations, the first layer (cart position and pole angle would share one int8
    input scale). Measured on CartPole: quantizing either one cut the mean return from 500 to ~25."""
    graph = model.graph
    dense = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul", "Conv")]
    vector_input = len(graph.input[0].type.tensor_type.shape.dim) == 2
    return tuple(dict.fromkeys(dense[-1:] + (dense[:1] if vector_input else [])))


def decisive_agreement(fp32, variant, checks: np.ndarray) -> tuple[float, float]:
    """How often the variant takes fp32's greedy action where the fp32 policy prefers it by a margin. A
    policy's Q-values for its actions can be nearly equal (CartPole: ~90 each, ~0.1 apart); where the fp32
    network itself is indifferent (its best two within 1% of the Q scale) either action is its choice, so
    only the decisions it makes with a margin count."""
    name = fp32.engine.input_names[0]
    ref, got = fp32.engine.run({name: checks})[0], variant.engine.run({name: checks})[0]
    same = ref.argmax(1) == got.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) >= 0.01 * np.abs(ref).mean()
    same = same[decisive] if decisive.any() else same
    return float(same.mean()), float(np.abs(ref - got).max())


def build_q_network(cfg: DQNConfig, spec: EnvironmentSpec) -> tuple[nn.Module, dict[str, Any]]:
    """The registered Q-network for this environment, and the model arguments that rebuild it."""
    model_args: dict[str, Any] = {"observation_shape": list(spec.observation_shape), "num_actions": spec.num_actions}
    if cfg.hidden is not None:  # the MLP's widths (dqn-cartpole's recipe)
        model_args["hidden"] = list(cfg.hidden)
    return get_spec(cfg.model).build(**model_args), model_args


def _payload(cfg: DQNConfig, spec: EnvironmentSpec, model_args: dict[str, Any], examples) -> dict[str, Any]:
    """The checkpoint content of a Q-network: the environment stands where a dataset stands for the others."""
    return checkpoint_payload(model=cfg.model, task="control", model_args=model_args, config=asdict(cfg),
                              dataset={"name": spec.id, "labels": list(spec.action_names),
                                       "preprocessing": {"observation_shape": list(spec.observation_shape),
                                                         "observation_dtype": spec.observation_dtype}},
                              examples=examples, environment=spec.as_dict())


@dataclass
class _Run:
    """One DQN run's moving parts and its bookkeeping (best and last checkpoints, metrics.jsonl)."""

    cfg: DQNConfig
    env: Any
    eval_env: Any
    q_net: nn.Module
    target_net: nn.Module
    optimizer: torch.optim.Optimizer
    buffer: ReplayBuffer
    base: dict[str, Any]
    out: Path
    log: MetricsLog
    bar: Any
    best_return: float = -float("inf")
    last_eval: float | None = None
    eval_seconds: float = 0.0

    def evaluate_and_save(self, step: int) -> None:
        """Greedy evaluation episodes; best.pt when the mean return is at least the best so far, last.pt."""
        cfg, eval_start = self.cfg, time.perf_counter()
        self.q_net.eval()
        returns = run_episodes(lambda o: greedy_action(self.q_net, o), cfg.env, cfg.eval_episodes,
                               seed=10_000 + cfg.seed * 1000 + step % 997, epsilon=cfg.eval_epsilon, env=self.eval_env)
        self.q_net.train()
        mean, std = float(np.mean(returns)), float(np.std(returns))
        self.last_eval = mean
        self.log.write({"step": step, "eval_mean_return": mean, "eval_std_return": std, "eval_episodes": len(returns)})
        payload = {**self.base, "state_dict": self.q_net.state_dict(), "metric": "eval_mean_return",
                   "examples": _examples(self.buffer, cfg.examples, cfg.seed),
                   "metrics": {"eval_mean_return": mean, "eval_std_return": std, "step": step}}
        if mean >= self.best_return:  # ties go to the later (longer trained) network
            self.best_return = mean
            save_checkpoint(payload, self.out / "best.pt")
        save_checkpoint({**payload, "best_val_score": self.best_return}, self.out / "last.pt")
        self.bar.write(f"step {step}: eval return {mean:.1f} ± {std:.1f}{' *' if mean >= self.best_return else ''}",
                       file=sys.stderr)
        self.eval_seconds += time.perf_counter() - eval_start


def _start(cfg: DQNConfig) -> _Run:
    """Seeds, environments, the online and target networks, the optimizer and the replay buffer."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    env = make_env(cfg.env)
    eval_env = make_env(cfg.env, max_episode_steps=cfg.eval_max_steps)
    spec = environment_spec(env, cfg.env)
    if cfg.hidden is None and len(spec.observation_shape) != 3:  # the Nature CNN reads stacked frames
        raise InputError(f"{cfg.model} needs stacked frames; {cfg.env} gives observations of shape "
                         f"{list(spec.observation_shape)} (use dqn-cartpole)")
    q_net, model_args = build_q_network(cfg, spec)
    target_net, _ = build_q_network(cfg, spec)
    target_net.load_state_dict(q_net.state_dict())
    target_net.eval()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return _Run(cfg, env, eval_env, q_net, target_net, torch.optim.Adam(q_net.parameters(), lr=cfg.lr),
                ReplayBuffer(min(cfg.buffer_size, cfg.total_steps), spec.observation_shape,
                             np.dtype(spec.observation_dtype), cfg.seed),
                _payload(cfg, spec, model_args, None), out, MetricsLog(out / "metrics.jsonl"),
                tqdm(total=cfg.total_steps, unit="step", disable=not cfg.progress, desc=f"{cfg.model}/{cfg.env}",
                     dynamic_ncols=True, file=sys.stderr))


def _learn(run: _Run, step: int, losses: list[float]) -> None:
    """A training phase: ``gradient_steps`` TD updates on replayed batches; the mean loss logged now and then."""
    cfg = run.cfg
    for _ in range(cfg.gradient_steps):
        loss, q_mean = td_loss(run.q_net, run.target_net, run.buffer.sample(cfg.batch_size), cfg.gamma, cfg.double_dqn)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(run.q_net.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        losses.append(float(loss.detach()))
    if len(losses) >= 100 or step % (cfg.train_freq * 10) == 0:
        run.log.write({"step": step, "loss": float(np.mean(losses)), "q_mean": float(q_mean)})
        losses.clear()


def train(cfg: DQNConfig) -> dict[str, Any]:
    """Train a DQN agent; write best.pt (best evaluation return), last.pt and metrics.jsonl under ``cfg.out``.

    Returns:
        Summary: checkpoint paths, the best and final evaluation returns, steps, episodes, steps/s.

    Raises:
        UnknownEnvironmentError, InputError: a bad environment id or configuration.
    """
    cfg = resolve_config(cfg)
    run = _start(cfg)
    env, explore_steps = run.env, int(cfg.exploration_fraction * cfg.total_steps)
    env.action_space.seed(cfg.seed)
    obs, info = env.reset(seed=cfg.seed)
    lives_left, episode_return, episode_length, episodes, target_updates = lives(info), 0.0, 0, 0, 0
    recent: deque[float] = deque(maxlen=20)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, cfg.total_steps + 1):
        epsilon = linear_schedule(cfg.exploration_initial_eps, cfg.exploration_final_eps, explore_steps, step)
        action = int(env.action_space.sample()) if random.random() < epsilon else greedy_action(run.q_net, obs)
        next_obs, reward, terminated, truncated, info = env.step(action)
        episode_return, episode_length = episode_return + float(reward), episode_length + 1
        now_lives = lives(info)
        life_lost = cfg.episodic_life and lives_left is not None and now_lives is not None and now_lives < lives_left
        lives_left = now_lives
        # Truncation (a time limit) is not a terminal state: the target still bootstraps from next_obs.
        run.buffer.add(obs, action, float(np.sign(reward)) if cfg.clip_rewards else float(reward), next_obs,
                       terminated or life_lost)
        obs = next_obs
        if terminated or truncated:
            episodes += 1
            recent.append(episode_return)
            run.log.write({"step": step, "episode": episodes, "episode_return": episode_return,
                           "episode_length": episode_length, "epsilon": round(epsilon, 4)})
            obs, info = env.reset()
            lives_left, episode_return, episode_length = lives(info), 0.0, 0
        if step > cfg.learning_starts and step % cfg.train_freq == 0:
            _learn(run, step, losses)
        target_updates += update_target(run.q_net, run.target_net, step, cfg.target_update_interval)
        if cfg.eval_interval and step % cfg.eval_interval == 0:
            run.evaluate_and_save(step)
        if step % 100 == 0 or step == cfg.total_steps:
            run.bar.update(step - run.bar.n)
            if recent:
                run.bar.set_postfix(ret=f"{np.mean(recent):.1f}", eps=f"{epsilon:.2f}", refresh=False)
    if not cfg.eval_interval or cfg.total_steps % cfg.eval_interval:
        run.evaluate_and_save(cfg.total_steps)
    return _finish(run, time.perf_counter() - start, episodes, recent, target_updates)


def _finish(run: _Run, seconds: float, episodes: int, recent, target_updates: int) -> dict[str, Any]:
    run.bar.close()
    run.env.close()
    run.eval_env.close()
    cfg = run.cfg
    return {"best": str(run.out / "best.pt"), "last": str(run.out / "last.pt"), "log": str(run.log.path),
            "task": "control", "env": cfg.env, "steps": cfg.total_steps, "episodes": episodes,
            "metric": "eval_mean_return", "best_val_score": run.best_return, "best_eval_return": run.best_return,
            "final_eval_return": run.last_eval, "recent_train_return": float(np.mean(recent)) if recent else None,
            "target_updates": target_updates, "seconds": round(seconds, 1), "eval_seconds": round(run.eval_seconds, 1),
            # training throughput: environment steps (with their share of gradient steps) per second, evaluation excluded
            "steps_per_second": round(cfg.total_steps / max(seconds - run.eval_seconds, 1e-9), 1)}


def untrained_checkpoint(path: str | Path, model: str, env_id: str, examples: int = 24, seed: int = 0) -> Path:
    """A checkpoint of a freshly initialised Q-network for ``env_id`` with observations recorded under
    random actions as examples (export tests; the same format :func:`train` writes)."""
    env = make_env(env_id)
    spec = environment_spec(env, env_id)
    env.close()
    cfg = resolve_config(DQNConfig(model=model, env=env_id))
    torch.manual_seed(seed)
    q_net, model_args = build_q_network(cfg, spec)
    obs = record_observations(lambda o: 0, env_id, examples, seed, epsilon=1.0)
    return save_checkpoint({**_payload(cfg, spec, model_args, torch.from_numpy(obs)), "state_dict": q_net.state_dict(),
                            "metrics": {}}, path)


def _examples(buffer: ReplayBuffer, count: int, seed: int) -> torch.Tensor:
    """Recorded observations (float32, as the network sees them) for the checkpoint's parity checks."""
    idx = np.random.default_rng(seed).choice(len(buffer), size=min(count, len(buffer)), replace=False)
    return torch.from_numpy(buffer.obs[np.sort(idx)].astype(np.float32))


# ----------------------------------------------------------------------------------------------- CLI
_NOT_FOR_DQN = ("dataset", "epochs", "optimizer", "weight_decay", "init", "batch_norm", "limit", "resume", "model_arg")


def train_command(model: str, progress: bool = True, **opts: Any) -> dict[str, Any]:
    """``dlpipe train dqn-...``: run :func:`train` from the command's options.

    Raises:
        InputError: an option that only supervised training understands was given.
    """
    opts["model_arg"] = opts.pop("model_args", None)  # the option is --model-arg
    given = [k for k in _NOT_FOR_DQN if opts.get(k) not in (None, False)]
    if given:
        raise InputError(f"{model} trains in an environment; --{given[0].replace('_', '-')} does not apply "
                         "(use --env, --total-steps, --buffer-size, --lr, --batch-size, --seed)")
    names = {f.name for f in fields(DQNConfig)}
    return train(DQNConfig(model=model, progress=progress,
                           **{k: v for k, v in opts.items() if k in names and v is not None}))


def summary(result: dict[str, Any]) -> str:
    """What ``dlpipe train dqn-...`` prints."""
    return (f"{result['env']}: best evaluation return {result['best_eval_return']:.1f}, final "
            f"{result['final_eval_return']:.1f} after {result['steps']} steps ({result['episodes']} episodes, "
            f"{result['steps_per_second']:.0f} steps/s)\ncheckpoint: {result['best']}\n"
            f"next: dlpipe export {result['best']} --out policy.onnx && dlpipe play policy.onnx --env {result['env']}")
