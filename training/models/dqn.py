"""Q-networks for the DQN agent (issue 5): one value per action from an observation.

``dqn-cartpole`` is an MLP over a vector observation (the rl-baselines3-zoo CartPole recipe's
``[256, 256]``); ``dqn-atari`` is the Nature DQN CNN (Mnih et al., 2015) over the last four 84x84
grayscale frames. Both take float32 observations exactly as the environment gives them (Atari
frames as 0-255 values, scaled inside the network) so the ONNX policy needs no preprocessing.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dlpipe.training.models.spec import ModelSpec, OnnxContract, TrainRecipe, register_model

CONTRACT = OnnxContract(inputs={"observation": {0: "batch"}}, outputs={"q_values": {0: "batch"}})


class QNetwork(nn.Module):
    """MLP Q-network: observation vector -> one Q-value per action."""

    def __init__(self, obs_size: int, num_actions: int, hidden: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class NatureQNetwork(nn.Module):
    """The Nature DQN CNN: conv 32x8x8/4, 64x4x4/2, 64x3x3/1, FC 512, one output per action."""

    def __init__(self, in_channels: int, size: int, num_actions: int, scale: float):
        super().__init__()
        self.scale = scale
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, size, size)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, 512), nn.ReLU(), nn.Linear(512, num_actions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * self.scale))


def dqn_mlp(*, observation_shape: Sequence[int], num_actions: int, hidden: Sequence[int] = (256, 256)) -> nn.Module:
    """MLP Q-network for a vector observation of ``observation_shape``."""
    size = 1
    for d in observation_shape:
        size *= int(d)
    return QNetwork(size, num_actions, tuple(hidden))


def dqn_nature_cnn(*, observation_shape: Sequence[int], num_actions: int, scale: float = 1 / 255) -> nn.Module:
    """Nature DQN CNN for stacked square frames ``(frames, size, size)`` of 0-255 values."""
    if len(observation_shape) != 3 or observation_shape[1] != observation_shape[2]:
        raise ValueError(f"dqn-atari needs (frames, size, size) observations, got {list(observation_shape)}")
    return NatureQNetwork(int(observation_shape[0]), int(observation_shape[1]), num_actions, scale)


register_model(ModelSpec(
    name="dqn-cartpole", task="control", builder=dqn_mlp, default_dataset="CartPole-v1", contract=CONTRACT,
    # the step loop's settings (environment, steps, replay...) are dlpipe.training.dqn.RECIPES'
    recipe=TrainRecipe(optimizer="adam", lr=2.3e-3, epochs=1, batch_size=64, init="default",
                       benchmark="bench/dqn_cartpole.py"),
    description="DQN MLP Q-network (256-256) for vector observations, CartPole-v1 by default"))

register_model(ModelSpec(
    name="dqn-atari", task="control", builder=dqn_nature_cnn, default_dataset="ALE/Pong-v5", contract=CONTRACT,
    recipe=TrainRecipe(optimizer="adam", lr=1e-4, epochs=1, batch_size=32, init="default"),
    description="Nature DQN CNN over 4 stacked 84x84 grayscale Atari frames (ALE/Pong-v5 by default)"))
