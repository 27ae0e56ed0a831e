"""Gymnasium environments for the DQN agent (issue 5), made the same way for training, evaluation
and ``dlpipe play``. Torch-free (gymnasium, ale-py and numpy only), so the app can play an ONNX
policy without torch.

Atari games (``ALE/...`` ids, registered by ale-py, whose wheel ships the ROMs) get the standard
DQN preprocessing through gymnasium's own wrappers: up to 30 no-op starts, a frame skip of 4 with
max-pooling over the last two frames, 84x84 grayscale, and the last 4 frames stacked, giving
``(4, 84, 84)`` uint8 observations. Reward clipping and episodic life are training-only and live
in the learner (rewards stored as their sign; a lost life ends the bootstrapped return without
resetting the game), so evaluation always plays full games with true scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dlpipe.runtime.errors import InputError

ATARI_PREFIX = "ALE/"
FRAME_STACK = 4
SCREEN_SIZE = 84
FRAME_SKIP = 4
CLASSIC_ACTION_NAMES = {"CartPole-v1": ["push left", "push right"], "CartPole-v0": ["push left", "push right"]}


class UnknownEnvironmentError(InputError):
    """An environment id gymnasium does not know."""


@dataclass(frozen=True)
class EnvironmentSpec:
    """What a policy must agree with: environment id, observation shape and dtype, actions."""

    id: str
    observation_shape: tuple[int, ...]
    observation_dtype: str
    num_actions: int
    action_names: tuple[str, ...]
    atari: bool

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(observation_shape=list(self.observation_shape), action_names=list(self.action_names))
        if self.atari:
            doc["preprocessing"] = {"frame_skip": FRAME_SKIP, "screen_size": SCREEN_SIZE, "grayscale": True,
                                    "frame_stack": FRAME_STACK, "noop_max": 30}
        return doc


def is_atari(env_id: str) -> bool:
    return env_id.startswith(ATARI_PREFIX)


def _register_atari() -> None:
    import gymnasium
    import ale_py

    gymnasium.register_envs(ale_py)


def make_env(env_id: str, *, render_mode: str | None = None, max_episode_steps: int | None = None):
    """The gymnasium environment ``env_id``, with the DQN Atari preprocessing for ``ALE/...`` games.

    Raises:
        UnknownEnvironmentError: gymnasium (with ale-py) does not know ``env_id``.
        InputError: the environment's actions are not discrete (DQN needs one Q-value per action).
    """
    import gymnasium
    from gymnasium.error import Error as GymError

    atari = is_atari(env_id)
    try:
        if atari:
            _register_atari()
            from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

            # frameskip=1 below: AtariPreprocessing does the skipping (with max-pooling) itself.
            env = gymnasium.make(env_id, frameskip=1, render_mode=render_mode)
            env = AtariPreprocessing(env, noop_max=30, frame_skip=FRAME_SKIP, screen_size=SCREEN_SIZE,
                                     terminal_on_life_loss=False, grayscale_obs=True, scale_obs=False)
            env = FrameStackObservation(env, FRAME_STACK)
            if max_episode_steps:  # in agent steps (4 frames each), not the raw frames gymnasium.make counts
                env = gymnasium.wrappers.TimeLimit(env, max_episode_steps)
        else:
            env = gymnasium.make(env_id, render_mode=render_mode, max_episode_steps=max_episode_steps)
    except GymError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = " (Atari games look like ALE/Pong-v5)" if not atari else ""
        raise UnknownEnvironmentError(f"unknown environment id {env_id!r}: {first}{hint}") from None
    if not isinstance(env.action_space, gymnasium.spaces.Discrete):
        env.close()
        raise InputError(f"environment {env_id!r} has {type(env.action_space).__name__} actions; "
                         "DQN needs a discrete action space")
    return env


def environment_spec(env, env_id: str) -> EnvironmentSpec:
    """The :class:`EnvironmentSpec` of an environment made by :func:`make_env`."""
    n = int(env.action_space.n)
    names = CLASSIC_ACTION_NAMES.get(env_id)
    if names is None and hasattr(env.unwrapped, "get_action_meanings"):
        names = [str(a).lower() for a in env.unwrapped.get_action_meanings()]
    if names is None or len(names) != n:
        names = [str(i) for i in range(n)]
    space = env.observation_space
    return EnvironmentSpec(id=env_id, observation_shape=tuple(int(d) for d in space.shape),
                           observation_dtype=str(np.dtype(space.dtype)), num_actions=n, action_names=tuple(names),
                           atari=is_atari(env_id))


def lives(info: dict[str, Any]) -> int | None:
    """Lives left, for episodic-life training (ALE reports them in ``info``)."""
    value = info.get("lives")
    return int(value) if value is not None else None
