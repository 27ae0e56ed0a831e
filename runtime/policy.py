"""The torch-free DQN policy (issue 5): observations in, greedy actions and Q-values out.

Loaded by :func:`dlpipe.runtime.load` for models whose task is ``control``; the environment it
was trained in (id, observation shape, actions) comes from the file's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.runtime.metadata import ModelInfo


@dataclass(frozen=True)
class PolicyOutput:
    """Actions (one per observation) and the Q-values they were chosen from (N x actions)."""

    actions: np.ndarray
    q_values: np.ndarray


class Policy:
    """A DQN Q-network as a policy.

    Args:
        engine: An :class:`Engine` over a dlpipe ``control`` model.

    Raises:
        ModelFileError: no dlpipe metadata, or no environment description in it.
    """

    task = "control"

    def __init__(self, engine: Engine):
        if engine.info is None:
            raise ModelFileError(f"'{engine.path}' has no dlpipe metadata; use dlpipe.runtime.Engine to run it raw")
        self.engine = engine
        self.info: ModelInfo = engine.info
        env: dict[str, Any] = self.info.raw.get("environment") or {}
        try:
            self.observation_shape: tuple[int, ...] = tuple(int(d) for d in env["observation_shape"])
            self.num_actions = int(env["num_actions"])
            self.action_names: tuple[str, ...] = tuple(str(a) for a in env.get("action_names") or self.info.labels)
            if self.num_actions < 1:
                raise ValueError("no actions")
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            raise ModelFileError(f"'{engine.path}' does not describe its environment (observation shape and "
                                 "actions); export it from a DQN checkpoint") from None
        self.env_id: str = str(env.get("id", self.info.raw.get("dataset", "")))

    @property
    def path(self) -> Path:
        return self.engine.path

    def _array(self, observations: Any) -> np.ndarray:
        try:
            return np.asarray(observations)
        except (ValueError, TypeError) as exc:  # ragged nested lists
            raise InputError(f"observations for '{self.path}' must be numeric arrays ({exc})") from None

    def _batch(self, observations: Any) -> tuple[np.ndarray, bool]:
        """``observations`` as a float32 batch, and whether a single observation was given."""
        arr = self._array(observations)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise InputError(f"observations must be numeric arrays, got {arr.dtype}")
        single = arr.shape == self.observation_shape
        if single:
            arr = arr[None]
        if arr.shape[1:] != self.observation_shape or arr.shape[0] < 1:
            raise InputError(f"'{self.path}' takes observations of shape {list(self.observation_shape)} (or a batch "
                             f"N x {list(self.observation_shape)}), got {list(arr.shape)}")
        return np.ascontiguousarray(arr, dtype=np.float32), single

    def q_values(self, observations: Any) -> np.ndarray:
        """Q-values, ``N x actions`` for a batch (``actions`` for one observation)."""
        batch, single = self._batch(observations)
        q = self.engine.run({self.engine.input_names[0]: batch})[0].astype(np.float32)
        return q[0] if single else q

    def predict(self, observations: Any, epsilon: float = 0.0,
                rng: np.random.Generator | None = None) -> PolicyOutput:
        """Greedy actions for a batch of observations (each replaced by a random action with
        probability ``epsilon``), with their Q-values."""
        if not 0 <= epsilon <= 1:
            raise InputError(f"epsilon must be between 0 and 1, got {epsilon}")
        batch, _ = self._batch(observations)
        q = self.engine.run({self.engine.input_names[0]: batch})[0].astype(np.float32)
        actions = q.argmax(1)
        if epsilon > 0:
            rng = rng or np.random.default_rng()
            explore = rng.random(len(actions)) < epsilon
            actions = np.where(explore, rng.integers(0, self.num_actions, len(actions)), actions)
        return PolicyOutput(actions=actions.astype(np.int64), q_values=q)

    def act(self, observation: Any, epsilon: float = 0.0, rng: np.random.Generator | None = None) -> int:
        """The action for one observation."""
        arr = self._array(observation)
        if arr.shape != self.observation_shape:
            raise InputError(f"'{self.path}' takes one observation of shape {list(self.observation_shape)}, "
                             f"got {list(arr.shape)}")
        return int(self.predict(arr, epsilon, rng).actions[0])

    def __repr__(self) -> str:
        return (f"Policy('{self.path}', env={self.env_id!r}, observation_shape={list(self.observation_shape)}, "
                f"actions={self.num_actions})")
