"""Issue 12 (hardening): every command that takes a model takes every kind of model file dlpipe writes
(an ONNX file, a package folder or its manifest); labels meet a model only when they name its outputs one
to one; the messages of evaluate, play and play --record say what the user can really do."""

import json
import sys
import tomllib
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from dlpipe.apps.cli import cli
from dlpipe.runtime.errors import ModelFileError

REPO = Path(__file__).resolve().parents[1]


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def one_line_error(result, exit_code, *fragments):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == exit_code and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("dlpipe: error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def user_module(tmp_path, monkeypatch, name, shape, classes):
    """A module ``name:build`` returning a linear classifier of ``shape`` inputs into ``classes`` logits."""
    c, h, w = shape
    (tmp_path / f"{name}.py").write_text(
        "import torch\n"
        "def build():\n"
        f"    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear({c * h * w}, {classes}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:build"


def labels_in(path):
    model = onnx.load(str(path))
    return json.loads(next(p.value for p in model.metadata_props if p.key == "dlpipe"))["labels"]


# --- labels ------------------------------------------------------------------------------------------------------

def test_a_labels_file_holds_one_label_per_line(tmp_path, monkeypatch):
    builder = user_module(tmp_path, monkeypatch, "mf_net_pianos", (1, 4, 4), 3)
    (tmp_path / "classes.txt").write_text("grand piano\n\n  upright piano  \nharp\n")
    run("export", "--builder", builder, "--input-shape", "1,4,4", "--labels", f"@{tmp_path / 'classes.txt'}",
        "--exporter", "torchscript", "--out", tmp_path / "m.onnx")
    assert labels_in(tmp_path / "m.onnx") == ["grand piano", "upright piano", "harp"]


def test_a_missing_labels_file_is_a_one_line_error(tmp_path, monkeypatch):
    builder = user_module(tmp_path, monkeypatch, "mf_net_missing", (1, 4, 4), 3)
    missing = tmp_path / "no_such_labels.txt"
    one_line_error(run("export", "--builder", builder, "--input-shape", "1,4,4", "--labels", f"@{missing}",
                       "--out", tmp_path / "m.onnx", ok=False), 1, str(missing), "does not exist")
    assert not (tmp_path / "m.onnx").exists()


def test_labels_that_do_not_name_every_class_are_refused_before_writing(tmp_path, monkeypatch):
    builder = user_module(tmp_path, monkeypatch, "mf_net_count", (1, 4, 4), 3)
    out = tmp_path / "never" / "m.onnx"
    one_line_error(run("export", "--builder", builder, "--input-shape", "1,4,4", "--labels", "a,b", "--out", out,
                       ok=False), 1, "2 labels", "3 classes")
    (tmp_path / "five.txt").write_text("grand piano\nupright piano\nharp\nviolin\ncello\n")
    one_line_error(run("export", "--builder", builder, "--input-shape", "1,4,4", "--labels",
                       f"@{tmp_path / 'five.txt'}", "--out", out, ok=False), 1, "5 labels", "3 classes")
    assert not out.parent.exists()


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A CartPole Q-network after 200 steps (well under a second), its checkpoint and its ONNX export."""
    from dlpipe.export.onnx_export import export_checkpoint
    from dlpipe.training.dqn import DQNConfig, train

    out = tmp_path_factory.mktemp("mf_policy")
    result = train(DQNConfig(out=str(out), total_steps=200, learning_starts=100, hidden=(16,), eval_interval=200,
                             eval_episodes=1, seed=0, progress=False))
    export_checkpoint(result["best"], out / "policy.onnx")
    return {"ckpt": result["best"], "onnx": out / "policy.onnx", "out": out}


def test_a_checkpoint_whose_labels_do_not_fit_its_model_is_refused(policy, tmp_path):
    from dlpipe.export.onnx_export import export_checkpoint
    from dlpipe.training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(policy["ckpt"])
    ckpt["dataset"]["labels"] = ["left", "right", "jump"]
    save_checkpoint(ckpt, tmp_path / "edited.pt")
    with pytest.raises(ModelFileError, match="3 labels .* 2 outputs"):
        export_checkpoint(tmp_path / "edited.pt", tmp_path / "edited.onnx")
    assert not (tmp_path / "edited.onnx").exists()


# --- every kind of model file --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A tiny captioner trained for one epoch on 64 scenes (about a second), exported as a package folder."""
    from dlpipe.export.onnx_export import export_checkpoint
    from dlpipe.training.captioning import CaptionOptions, train_captioner
    from dlpipe.training.train import TrainConfig

    out = tmp_path_factory.mktemp("mf_captioner")
    cfg = TrainConfig(model="captioner", out=str(out / "train"), epochs=1, limit=64, test_limit=24, threads=1,
                      progress=False)
    result = train_captioner(cfg, CaptionOptions(image_size=32, embed_dim=16, hidden=32, beam=2))
    export_checkpoint(result["best"], out / "pkg")
    return out / "pkg"


def test_evaluate_bench_and_quantize_take_a_package_folder_or_manifest(package):
    for model in (package, package / "manifest.json"):
        [report] = json.loads(run("evaluate", model, "--limit", "8", "--device", "cpu", "--json").stdout)
        assert report["task"] == "captioning" and report["precision"] == "fp32" and report["images"] == 8
    stats = json.loads(run("bench", package, "--batch", "2", "--iters", "5", "--warmup", "1", "--json").stdout)
    assert sorted(s["name"] for s in stats) == ["pkg:decoder [fp32]", "pkg:encoder [fp32]"]
    assert all(s["batch"] == 2 and s["p50_ms"] > 0 for s in stats)
    quant = json.loads(run("quantize", package, "--to", "fp16", "--min-agreement", "0", "--json").stdout)
    assert quant["path"] == str(package / "manifest.fp16.json")
    assert quant["agreement_name"] == "identical greedy captions"
    [fp16] = json.loads(run("evaluate", package / "manifest.fp16.json", "--limit", "8", "--device", "cpu",
                            "--json").stdout)
    assert fp16["precision"] == "fp16"


def test_a_package_given_to_play_is_a_one_line_usage_error(package):
    one_line_error(run("play", package, ok=False), 2, "captioning model, not a DQN policy")


# --- messages ------------------------------------------------------------------------------------------------------

def test_evaluate_on_missing_data_does_not_advise_an_option_it_lacks(tmp_path, monkeypatch):
    builder = user_module(tmp_path, monkeypatch, "mf_net_digits", (1, 28, 28), 10)
    run("export", "--builder", builder, "--input-shape", "1,28,28", "--labels", ",".join("0123456789"),
        "--exporter", "torchscript", "--out", tmp_path / "digits.onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(run("evaluate", tmp_path / "digits.onnx", "--dataset", "mnist", "--data-dir", empty,
                              ok=False), 1, str(empty / "MNIST" / "raw"),
                          "'dlpipe train MODEL --dataset mnist --download'")
    assert "pass --download" not in line and "download=True" not in line


def test_play_says_1_episode(policy):
    out = run("play", policy["onnx"], "--episodes", "1", "--max-steps", "5").stdout
    assert "1 episode:" in out and "episodes" not in out
    assert "2 episodes:" in run("play", policy["onnx"], "--episodes", "2", "--max-steps", "5").stdout


def test_recording_without_pygame_names_the_render_extra(policy, tmp_path, monkeypatch):
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("pygame") for dep in extras["render"])
    monkeypatch.setitem(sys.modules, "pygame", None)  # `import pygame` now fails as in the base install
    gif = tmp_path / "episode.gif"
    one_line_error(run("play", policy["onnx"], "--episodes", "1", "--max-steps", "5", "--record", gif, ok=False), 1,
                   "needs pygame", 'pip install "dlpipe[render]"')
    assert not gif.exists()
