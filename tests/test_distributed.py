"""Distributed data-parallel training (DDP, gloo on the CPU, launched by torch's elastic launcher) and
mixed-precision training (issue 14): two ranks stay identical, the two-process run is a single process
with the same global batch, a two-"node" run meets at a rendezvous on 127.0.0.1, a killed rank stops the
run with one line, and the checkpoints are the single-process format that exports unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from dlpipe.apps.cli import cli
from dlpipe.training import distributed

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import the helpers by module name
import ddp_helpers  # noqa: E402

DLPIPE = [sys.executable, "-m", "dlpipe.apps.cli"]
# a two-process step and a single-process step over the same 2 x 16 images differ only by the order of
# float sums (gloo's all-reduce of the two half-batch gradients): far below this
TOLERANCE = 1e-5


def dlpipe(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*DLPIPE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(result, *fragments: str) -> str:
    """The one error line of a failed command (the epochs it finished may be reported before it)."""
    assert result.returncode != 0 if hasattr(result, "returncode") else result.exit_code != 0
    text = result.stderr if hasattr(result, "stderr") else result.output
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("epoch ")]
    assert len(lines) == 1 and lines[0].startswith("dlpipe: error: ") and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def replay_single_process(ranks: dict, model: str, dataset: str, limit: int, batch: int, steps: int):
    """One process taking the same global batches (rank 0's half then rank 1's) with plain SGD."""
    torch.set_num_threads(1)
    cfg = ddp_helpers.config(model, dataset, limit, batch * 2)
    run, net = ddp_helpers.fresh_model(cfg, dense=False)
    dataset_ = run.train_loader.dataset
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    net.train()
    losses = []
    for step in range(steps):
        idx = [i for r in sorted(ranks) for i in ranks[r]["indices"][step * batch:(step + 1) * batch]]
        images, labels = dataset_.__getitems__(idx)
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, list(net.parameters())


def test_two_ranks_match_each_other_and_one_process_with_the_global_batch():
    steps, batch = 3, 16
    ranks = distributed.launch(ddp_helpers.ddp_steps, "lenet5", "shapes", 200, batch, steps, nproc=2,
                               every_rank=True)
    assert sorted(ranks) == [0, 1] and ranks[0]["world"] == 2
    assert not set(ranks[0]["indices"]) & set(ranks[1]["indices"])  # DistributedSampler: disjoint shards
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)  # DDP: after every step the ranks hold the same weights, bit for bit
    losses, params = replay_single_process(ranks, "lenet5", "shapes", 200, batch, steps)
    mean_of_ranks = [(x + y) / 2 for x, y in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean_of_ranks == pytest.approx(losses, abs=TOLERANCE)
    assert max((a - b).abs().max().item() for a, b in zip(ranks[0]["params"], params)) < TOLERANCE
    assert losses[-1] != losses[0]  # the steps did move the weights


def test_bf16_run_lowers_the_loss_and_writes_an_fp32_checkpoint_that_exports(tmp_path):
    from dlpipe.export.onnx_export import export_checkpoint
    from dlpipe.training.checkpoint import load_checkpoint
    from dlpipe.training.train import TrainConfig, train

    result = train(TrainConfig(model="lenet5", dataset="shapes", limit=600, test_limit=64, epochs=2, amp="bf16",
                               threads=1, optimizer="adam", lr=3e-3, schedule="none", out=str(tmp_path / "run"),
                               progress=False))
    history = result["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["train_acc"] > 0.2  # 6 classes
    ckpt = load_checkpoint(result["best"])
    assert ckpt["config"]["amp"] == "bf16"
    assert {t.dtype for t in ckpt["state_dict"].values() if t.is_floating_point()} == {torch.float32}
    export_checkpoint(result["best"], tmp_path / "m.onnx")  # raises unless ONNX matches PyTorch
    assert (tmp_path / "m.onnx").is_file()


def test_single_process_tasks_and_cpu_only_options_are_refused_in_one_line(tmp_path):
    runner = CliRunner()
    line = one_line_error(runner.invoke(cli, ["train", "dqn-cartpole", "--nproc", "2", "--out", str(tmp_path)]),
                          "dqn-cartpole", "single process", "--nproc")
    assert "shared loop" in line
    one_line_error(runner.invoke(cli, ["train", "dqn-cartpole", "--amp", "bf16", "--out", str(tmp_path)]), "--amp")
    one_line_error(runner.invoke(cli, ["train", "lenet5", "--sync-bn", "--out", str(tmp_path)]), "--sync-bn", "GPU")
    assert not any(tmp_path.iterdir())


def test_fp16_steps_through_the_gradient_scaler_and_bad_modes_are_refused():
    from dlpipe.runtime.errors import UsageError
    from dlpipe.training.precision import Precision

    torch.manual_seed(0)
    model, x = torch.nn.Linear(8, 1), torch.randn(64, 8)
    y = x @ torch.arange(8.0).unsqueeze(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    precision = Precision("fp16")
    assert precision.scaler is not None  # fp16 scales the loss
    losses = []
    for _ in range(20):
        with precision.autocast():
            out = model(x)
            assert out.dtype == torch.float16
            loss = F.mse_loss(out.float(), y)
        precision.step(loss, optimizer, clip=model.parameters(), max_norm=100.0)
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2 and model.weight.dtype == torch.float32
    with pytest.raises(UsageError, match="fp8"):
        Precision("fp8")


# ------------------------------------------------------------------------------------- end to end (slow)

@pytest.mark.slow
def test_fcn8s_ranks_stay_identical():
    ranks = distributed.launch(ddp_helpers.ddp_steps, "fcn8s", "shapes-scenes", 48, 4, 2, True, nproc=2,
                               every_rank=True)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks.values())


@pytest.mark.slow
def test_two_process_cli_run_resumes_and_exports_unchanged(tmp_path):
    from dlpipe.training.checkpoint import load_checkpoint

    out = tmp_path / "run"
    common = ["lenet5", "--dataset", "shapes", "--limit", "96", "--test-limit", "16", "--batch-size", "16",
              "--threads", "1", "--nproc", "2", "--no-progress", "--out", out, "--json"]
    first = dlpipe("train", *common, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["processes"] == 2
    second = dlpipe("train", *common, "--epochs", "2", "--resume", out / "last.pt")
    assert second.returncode == 0, second.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # rank 0 alone wrote, and the resumed run appended
    ckpt = load_checkpoint(out / "best.pt")
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    exported = dlpipe("export", out / "best.pt", "--out", tmp_path / "m.onnx")
    assert exported.returncode == 0, exported.stderr


@pytest.mark.slow
def test_two_nodes_meet_at_a_rendezvous_on_localhost(tmp_path):
    endpoint = f"127.0.0.1:{distributed.free_port()}"
    args = ["train", "lenet5", "--dataset", "shapes", "--limit", "96", "--test-limit", "16", "--epochs", "1",
            "--batch-size", "16", "--threads", "1", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint,
            "--rdzv-id", "two-nodes", "--no-progress", "--out"]
    nodes = [subprocess.Popen([*DLPIPE, *map(str, args), str(tmp_path / f"node{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs
    wrote = [i for i in range(2) if (tmp_path / f"node{i}" / "best.pt").is_file()]
    assert len(wrote) == 1  # rank 0's node alone writes
    assert any("rank 0 (on another node)" in out for out, _ in outputs)


@pytest.mark.slow
def test_a_killed_rank_stops_both_nodes_with_one_line(tmp_path):
    """Node 1's rank dies as epoch 2 starts: its launcher reports it; node 0, waiting in the gradient
    all-reduce, loses its peer and stops too, within the collective timeout, no hang."""
    endpoint, timeout = f"127.0.0.1:{distributed.free_port()}", 30
    args = ["train", "lenet5", "--dataset", "shapes", "--limit", "96", "--epochs", "3", "--batch-size", "16",
            "--threads", "1", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", "killed",
            "--ddp-timeout", str(timeout), "--no-progress", "--out"]
    started = time.perf_counter()
    nodes = [subprocess.Popen([*DLPIPE, *args, str(tmp_path / f"node{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **({distributed.FAULT_ENV: "1:1"} if i else {})}) for i in range(2)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    results = [subprocess.CompletedProcess(node.args, node.returncode, out, err)
               for node, (out, err) in zip(nodes, outputs)]
    one_line_error(results[1], "distributed training stopped: rank 1", "exited with code 3")
    # node 0 stops as its rank loses its peer in the all-reduce, or as its launcher loses the rendezvous
    # store when node 1's launcher hosted it (whichever binds the port first hosts it)
    line = one_line_error(results[0], "distributed training stopped: ")
    assert "rank 0" in line or "rendezvous at 127.0.0.1" in line, line
    assert time.perf_counter() - started < 240
    assert len((tmp_path / "node0" / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 2 never finished


@pytest.mark.slow
def test_finetune_trains_data_parallel_and_writes_the_usual_checkpoint(tmp_path):
    from dlpipe.training.checkpoint import load_checkpoint
    from dlpipe.training.train import TrainConfig, train

    source = train(TrainConfig(model="lenet5", dataset="shapes", limit=300, test_limit=32, epochs=1, threads=1,
                               out=str(tmp_path / "source"), progress=False))
    result = dlpipe("finetune", "--from", source["best"], "--data", "shapes", "--per-class", "10", "--head-epochs", "1",
                    "--epochs", "1", "--batch-size", "8", "--threads", "1", "--nproc", "2", "--test-limit", "32",
                    "--no-progress", "--out", tmp_path / "ft", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [r["stage"] for r in summary["history"]] == ["head", "finetune"]
    ckpt = load_checkpoint(tmp_path / "ft" / "best.pt")
    assert ckpt["task"] == "classification" and not any(k.startswith("module.") for k in ckpt["state_dict"])
