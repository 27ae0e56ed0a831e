"""Playing an ONNX DQN policy in its gymnasium environment (``dlpipe play``, the control task's evaluation
and its demo). Torch-free: the runtime's :class:`~dlpipe.runtime.policy.Policy`, gymnasium and pillow for
the optional GIF."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.runtime.errors import InputError, UsageError
from dlpipe.runtime.files import atomic_output
from dlpipe.runtime.policy import Policy
from dlpipe.runtime.predictors import load
from dlpipe.training.envs import environment_spec, make_env


def check_compatible(policy: Policy, env, env_id: str) -> None:
    """Refuse an environment whose observations or actions the policy was not trained for.

    Raises:
        InputError: naming the model, the environment and what differs.
    """
    spec = environment_spec(env, env_id)
    problems = []
    if spec.observation_shape != policy.observation_shape:
        problems.append(f"observations of shape {list(policy.observation_shape)}, the environment gives "
                        f"{list(spec.observation_shape)}")
    if spec.num_actions != policy.num_actions:
        problems.append(f"{policy.num_actions} actions, the environment has {spec.num_actions}")
    if problems:
        raise InputError(f"'{policy.path}' (trained on {policy.env_id}) does not fit {env_id}: it expects "
                         + "; ".join(problems))


def _save_gif(frames: list[np.ndarray], path: Path, fps: int) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    width = images[0].width
    if width > 320:  # keep the file small
        images = [im.resize((320, round(im.height * 320 / width)), Image.Resampling.BILINEAR) for im in images]
    with atomic_output(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def _render(env, env_id: str) -> np.ndarray:
    from gymnasium.error import DependencyNotInstalled

    try:
        return env.render()
    except DependencyNotInstalled:  # its advice names gymnasium's extra; dlpipe's own is the one to install
        raise InputError(f"recording {env_id} needs pygame, which the base install lacks: "
                         'pip install "dlpipe[render]"') from None


def play(model: str | Path, env_id: str | None = None, *, episodes: int = 10, seed: int = 0, epsilon: float = 0.0,
         max_steps: int | None = None, record: str | Path | None = None, device: str = "cpu",
         record_every: int = 2) -> dict[str, Any]:
    """Play ``episodes`` episodes of the policy in ``model`` and report its returns.

    Args:
        env_id: Environment id; the one in the model's metadata when None.
        seed: Episode ``i`` is reset with seed ``seed + i``; random actions (``epsilon``) use it too.
        max_steps: Cap on an episode's length (the environment's own time limit when None).
        record: Write the first episode as an animated GIF here (every ``record_every``-th frame).

    Raises:
        UsageError: not a DQN policy. InputError / UnknownEnvironmentError: bad environment.
        ModelFileError: a missing or unreadable model file.
    """
    if episodes < 1:
        raise InputError(f"episodes must be at least 1, got {episodes}")
    policy = load(model, device=device)
    if not isinstance(policy, Policy):
        raise UsageError(f"'{model}' is a {policy.info.task} model, not a DQN policy")
    env_id = env_id or policy.env_id
    if record and Path(record).suffix.lower() != ".gif":
        raise InputError(f"--record must name a .gif file, got '{record}'")
    if record:  # classic-control environments draw with pygame; no window, no audio
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    env = make_env(env_id, render_mode="rgb_array" if record else None, max_episode_steps=max_steps)
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    returns, lengths, frames, seconds = [], [], [], 0.0
    try:
        check_compatible(policy, env, env_id)
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            total, length, done = 0.0, 0, False
            while not done:
                if record and episode == 0 and length % record_every == 0:
                    frames.append(_render(env, env_id))
                start = time.perf_counter()
                action = policy.act(obs, epsilon, rng)
                seconds += time.perf_counter() - start
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                length += 1
                done = terminated or truncated
            returns.append(total)
            lengths.append(length)
    finally:
        env.close()
    if record:
        _save_gif(frames, Path(record), fps=max(1, 50 // record_every))
    steps = int(sum(lengths))
    return {"model": str(model), "env": env_id, "precision": policy.info.precision, "episodes": episodes,
            "seed": seed, "epsilon": epsilon, "mean_return": float(np.mean(returns)),
            "std_return": float(np.std(returns)), "min_return": float(np.min(returns)),
            "max_return": float(np.max(returns)), "returns": returns, "lengths": lengths,
            "policy_ms_per_step": round(1000 * seconds / max(steps, 1), 4), "record": str(record) if record else None}
