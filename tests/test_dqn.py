"""DQN (issue 5): replay buffer, target network schedule, a short CartPole run that beats a random
policy, ONNX export parity and the torch-free Policy, quantized policies, ``dlpipe play``, Atari
preprocessing shapes and clear errors for bad environments."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dlpipe.apps.cli import cli
from dlpipe.export.onnx_export import export_checkpoint
from dlpipe.export.quantize import QuantizationConfig, quantize
from dlpipe.runtime import InputError, Policy, load
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint
from dlpipe.training.dqn import (DQNConfig, ReplayBuffer, linear_schedule, record_observations, run_episodes,
                                 td_loss, train, update_target)
from dlpipe.training.envs import UnknownEnvironmentError, environment_spec, make_env
from dlpipe.training.registry import get_spec


# Seconds of training: every test that uses it is marked slow.
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small CartPole agent (64-64 MLP, 4,000 steps), exported to ONNX."""
    out = tmp_path_factory.mktemp("dqn")
    torch.set_num_threads(1)
    cfg = DQNConfig(out=str(out), total_steps=4000, learning_starts=500, hidden=(64, 64), eval_interval=2000,
                    eval_episodes=3, seed=0, progress=False)
    result = train(cfg)
    export = export_checkpoint(result["best"], out / "policy.onnx")
    return {"result": result, "export": export, "onnx": out / "policy.onnx", "out": out}


def test_replay_buffer_wraps_around_and_samples_what_was_added():
    buf = ReplayBuffer(5, (2,), np.dtype(np.float32), seed=0)
    for i in range(7):
        buf.add(np.full(2, i, np.float32), i % 2, float(i), np.full(2, i + 1, np.float32), i == 6)
    assert len(buf) == 5 and buf.pos == 2
    # the two oldest transitions (0 and 1) were overwritten by 5 and 6, in place
    assert sorted(buf.obs[:, 0].tolist()) == [2, 3, 4, 5, 6] and buf.obs[0, 0] == 5 and buf.obs[1, 0] == 6
    obs, actions, rewards, next_obs, dones = buf.sample(256)
    assert obs.dtype == torch.float32 and actions.dtype == torch.int64 and obs.shape == (256, 2)
    assert set(obs[:, 0].tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0}  # uniform over what is stored
    assert torch.equal(next_obs[:, 0], obs[:, 0] + 1) and torch.equal(rewards, obs[:, 0])
    assert torch.equal(dones, (obs[:, 0] == 6).float()) and torch.equal(actions, obs[:, 0].long() % 2)
    frames = ReplayBuffer(3, (4, 84, 84), np.dtype(np.uint8))
    assert frames.obs.dtype == np.uint8  # Atari frames stay uint8 in memory


def test_epsilon_schedule_is_linear_then_flat():
    assert linear_schedule(1.0, 0.04, 100, 0) == 1.0
    assert linear_schedule(1.0, 0.04, 100, 50) == pytest.approx(0.52)
    assert linear_schedule(1.0, 0.04, 100, 100) == pytest.approx(0.04)
    assert linear_schedule(1.0, 0.04, 100, 10_000) == pytest.approx(0.04)


def test_target_network_updates_on_schedule():
    q_net = get_spec("dqn-cartpole").build(observation_shape=[4], num_actions=2, hidden=[8])
    target = get_spec("dqn-cartpole").build(observation_shape=[4], num_actions=2, hidden=[8])
    optimizer = torch.optim.SGD(q_net.parameters(), lr=0.1)
    synced = []
    for step in range(1, 31):
        optimizer.zero_grad()
        q_net(torch.randn(4, 4)).pow(2).mean().backward()
        optimizer.step()
        updated = update_target(q_net, target, step, 10)
        same = all(torch.equal(a, b) for a, b in zip(q_net.state_dict().values(), target.state_dict().values()))
        assert updated == same  # equal to the online network exactly when (and only when) it was updated
        synced += [step] if updated else []
    assert synced == [10, 20, 30]


def test_td_target_plain_and_double_dqn():
    class Fixed(torch.nn.Module):  # the same Q-values for every observation
        def __init__(self, q):
            super().__init__()
            self.q = torch.tensor([q])

        def forward(self, x):
            return self.q.expand(len(x), -1)

    online, target = Fixed([0.0, 5.0, 1.0]), Fixed([3.0, 2.0, 4.0])
    obs = torch.zeros(2, 1)
    batch = (obs, torch.tensor([0, 2]), torch.tensor([1.0, 1.0]), obs, torch.tensor([0.0, 1.0]))
    # Q(s, a) = 0 and 1; targets 1 + 0.5 * max target (4) = 3, and 1 (terminal) -> Huber of (3, 0)
    loss, q_mean = td_loss(online, target, batch, 0.5, double_dqn=False)
    assert loss.item() == pytest.approx((2.5 + 0.0) / 2) and q_mean.item() == pytest.approx(0.5)
    # Double DQN: the online network picks action 1, the target values it at 2 -> target 2
    loss, _ = td_loss(online, target, batch, 0.5, double_dqn=True)
    assert loss.item() == pytest.approx((1.5 + 0.0) / 2)


@pytest.mark.slow
def test_short_cartpole_run_beats_a_random_policy(trained):
    result = trained["result"]
    random_returns = run_episodes(lambda o: 0, "CartPole-v1", 10, seed=123, epsilon=1.0)
    assert np.mean(random_returns) < 40  # a random policy drops the pole after ~20 steps
    assert result["best_eval_return"] > 3 * np.mean(random_returns)
    assert result["target_updates"] == 4000 // 10
    rows = [json.loads(line) for line in Path(result["log"]).read_text().splitlines()]
    episodes = [r for r in rows if "episode_return" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert episodes and losses and all(np.isfinite(losses))
    assert {r["step"] for r in rows if "eval_mean_return" in r} == {2000, 4000}
    ckpt = load_checkpoint(result["best"])
    assert ckpt["model_args"] == {"observation_shape": [4], "num_actions": 2, "hidden": [64, 64]}
    assert ckpt["environment"]["id"] == "CartPole-v1" and ckpt["examples"].shape[1:] == (4,)


def test_runs_are_seeded(tmp_path):
    def run(out):
        cfg = DQNConfig(out=str(out), total_steps=700, learning_starts=200, train_freq=64, gradient_steps=8,
                        hidden=(16,), eval_interval=0, eval_episodes=1, seed=3, progress=False)
        r = train(cfg)
        return r, load_checkpoint(r["last"])["state_dict"]

    (r1, s1), (r2, s2) = run(tmp_path / "a"), run(tmp_path / "b")
    assert r1["episodes"] == r2["episodes"] and r1["final_eval_return"] == r2["final_eval_return"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.slow
def test_export_parity_and_policy_match_pytorch(trained):
    assert sorted(p.batch for p in trained["export"].parity) == [1, 16]
    policy = load(trained["onnx"])
    assert isinstance(policy, Policy)
    assert policy.env_id == "CartPole-v1" and policy.observation_shape == (4,) and policy.num_actions == 2
    assert policy.action_names == ("push left", "push right")
    module = model_from_checkpoint(load_checkpoint(trained["result"]["best"]))
    obs = record_observations(policy.act, "CartPole-v1", 1000, seed=5)
    with torch.no_grad():
        ref = module(torch.from_numpy(obs)).numpy()
    out = policy.predict(obs)
    np.testing.assert_allclose(out.q_values, ref, atol=1e-4, rtol=1e-3)
    assert (out.actions == ref.argmax(1)).mean() >= 0.999
    assert policy.q_values(obs[0]).shape == (2,) and policy.act(obs[0]) == int(ref[0].argmax())
    explored = policy.predict(np.repeat(obs[:1], 400, 0), epsilon=1.0, rng=np.random.default_rng(0)).actions
    assert set(explored.tolist()) == {0, 1}
    with pytest.raises(InputError, match=r"shape \[4\]"):
        policy.predict(np.zeros((3, 5), np.float32))


@pytest.mark.slow
def test_quantized_policies_play_like_fp32(trained):
    fp32 = run_episodes(load(trained["onnx"]).act, "CartPole-v1", 3, seed=50)
    for precision in ("fp16", "int8"):  # the default gate: the same action wherever fp32 is not indifferent
        out = trained["out"] / f"policy.{precision}.onnx"
        report = quantize(trained["onnx"], out, QuantizationConfig(precision))
        assert report.agreement >= 0.98
        got = run_episodes(load(out).act, "CartPole-v1", 3, seed=50)
        assert np.mean(got) >= 0.9 * np.mean(fp32), (precision, report.agreement, got, fp32)
        if precision == "int8":  # the hidden layer is int8; the first layer and the Q-value head stay fp32
            assert report.op_counts.get("QuantizeLinear", 0) >= 1 and len(report.kept_fp32) == 2
            correction = load(out).info.raw["bias_correction"]  # the head's bias absorbed int8's mean Q error
            assert correction["node"] in report.kept_fp32 and len(correction["subtracted"]) == 2


@pytest.mark.slow
def test_play_through_the_cli(trained):
    res = CliRunner().invoke(cli, ["play", str(trained["onnx"]), "--env", "CartPole-v1", "--episodes", "2",
                                   "--seed", "7", "--max-steps", "120", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["episodes"] == 2 and len(doc["returns"]) == 2 and max(doc["lengths"]) <= 120
    assert doc["mean_return"] == pytest.approx(np.mean(doc["returns"]))
    expected = run_episodes(load(trained["onnx"]).act, "CartPole-v1", 2, seed=7, max_steps=120)
    assert doc["returns"] == expected
    human = CliRunner().invoke(cli, ["play", str(trained["onnx"]), "--episodes", "1", "--max-steps", "50"])
    assert human.exit_code == 0 and "return" in human.stdout and "±" in human.stdout


@pytest.mark.slow
def test_play_records_a_gif(trained, tmp_path):
    pytest.importorskip("pygame", reason="CartPole draws with pygame (pip install 'dlpipe[render]')")
    from PIL import Image

    gif = tmp_path / "episode.gif"
    res = CliRunner().invoke(cli, ["play", str(trained["onnx"]), "--episodes", "1", "--max-steps", "40",
                                   "--record", str(gif)])
    assert res.exit_code == 0, res.output
    with Image.open(gif) as im:
        assert im.n_frames > 5 and im.width == 320  # every 2nd frame (PIL merges repeats), 320 px wide
    res = CliRunner().invoke(cli, ["play", str(trained["onnx"]), "--episodes", "1", "--record", str(tmp_path / "x.mp4")])
    assert res.exit_code != 0 and "must name a .gif" in res.output


@pytest.mark.slow
def test_bad_environments_are_clear_errors(trained):
    runner = CliRunner()
    res = runner.invoke(cli, ["play", str(trained["onnx"]), "--env", "NoSuchGame-v9"])
    assert res.exit_code != 0 and "unknown environment id 'NoSuchGame-v9'" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(cli, ["play", str(trained["onnx"]), "--env", "Acrobot-v1"])  # 6 observations, 3 actions
    assert res.exit_code != 0 and "does not fit Acrobot-v1" in res.output
    assert "observations of shape [4], the environment gives [6]" in res.output and "the environment has 3" in res.output
    res = runner.invoke(cli, ["play", str(trained["onnx"]), "--env", "MountainCar-v0"])  # 2 observations, 3 actions
    assert res.exit_code != 0 and "2 actions, the environment has 3" in res.output
    with pytest.raises(UnknownEnvironmentError):
        make_env("ALE/NoSuchGame-v5")


def test_train_command_dispatches_to_dqn(tmp_path):
    res = CliRunner().invoke(cli, ["train", "dqn-cartpole", "--total-steps", "300", "--buffer-size", "1000",
                                   "--seed", "1", "--no-progress", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["steps"] == 300 and Path(doc["best"]).is_file()
    assert load_checkpoint(doc["best"])["config"]["buffer_size"] == 1000
    res = CliRunner().invoke(cli, ["train", "dqn-cartpole", "--epochs", "3", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "--epochs does not apply" in res.output
    res = CliRunner().invoke(cli, ["train", "dqn-cartpole", "--model-arg", "hidden=[8]", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "--model-arg does not apply" in res.output
    res = CliRunner().invoke(cli, ["train", "dqn-cartpole", "--env", "Nope-v0", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "unknown environment id 'Nope-v0'" in res.output


def test_atari_preprocessing_shapes_and_nature_cnn():
    env = make_env("ALE/Pong-v5")
    try:
        obs, _ = env.reset(seed=0)
        spec = environment_spec(env, "ALE/Pong-v5")
        assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
        obs, *_ = env.step(0)
        assert obs.shape == (4, 84, 84)
    finally:
        env.close()
    assert spec.observation_shape == (4, 84, 84) and spec.num_actions == 6 and spec.action_names[:2] == ("noop", "fire")
    net = get_spec("dqn-atari").build(observation_shape=[4, 84, 84], num_actions=6)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [(32, 8, 4), (64, 4, 2), (64, 3, 1)]
    assert net(torch.from_numpy(obs[None].astype(np.float32))).shape == (1, 6)


def test_atari_policy_exports_and_plays_through_the_app(tmp_path):
    from dlpipe.training.dqn import untrained_checkpoint

    ckpt = untrained_checkpoint(tmp_path / "pong.pt", "dqn-atari", "ALE/Pong-v5")
    export_checkpoint(ckpt, tmp_path / "pong.onnx")
    policy = load(tmp_path / "pong.onnx")
    assert policy.observation_shape == (4, 84, 84) and policy.num_actions == 6 and policy.env_id == "ALE/Pong-v5"
    res = CliRunner().invoke(cli, ["play", str(tmp_path / "pong.onnx"), "--episodes", "1", "--max-steps", "30",
                                   "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{"):])
    assert doc["env"] == "ALE/Pong-v5" and doc["lengths"] == [30]
    res = CliRunner().invoke(cli, ["play", str(tmp_path / "pong.onnx"), "--env", "ALE/Breakout-v5", "--max-steps", "5"])
    assert res.exit_code != 0 and "6 actions, the environment has 4" in res.output
