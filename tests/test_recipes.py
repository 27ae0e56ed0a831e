"""Training recipes (issue 19): ``dlpipe train MODEL`` with no flag runs the recipe its benchmark measured,
a flag overrides one field only, named recipes (``--recipe quick``) and per-dataset overrides apply, and
the benchmark scripts take their recipe from the registry instead of restating it."""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dlpipe.apps.cli import cli
from dlpipe.runtime.errors import UsageError
from dlpipe.training.loop import TrainConfig, resolve_config
from dlpipe.training.models.spec import RECIPE_FIELDS, TrainRecipe
from dlpipe.training.registry import get_spec, list_models

BENCH = Path(__file__).resolve().parents[1] / "bench"
# the recipe bench/mnist_accuracy.py measured (99.63% ± 0.05 on MNIST, 3 seeds): the plain command must run it
MEASURED_DEEP_CONVNET = dict(optimizer="adam", lr=1e-3, epochs=40, batch_size=128, schedule="cosine",
                             augment="affine", init="he", weight_decay=0.0, label_smoothing=0.1)


def test_no_flag_resolves_to_the_measured_recipe():
    cfg = resolve_config(TrainConfig(model="deep_convnet"))
    assert cfg.dataset == "mnist" and cfg.recipe == "default"
    assert {k: getattr(cfg, k) for k in MEASURED_DEEP_CONVNET} == MEASURED_DEEP_CONVNET
    assert get_spec("deep_convnet").recipe.benchmark == "bench/mnist_accuracy.py"


@pytest.mark.parametrize("field,value", [("lr", 3e-3), ("epochs", 3), ("augment", "none"), ("schedule", "step"),
                                         ("label_smoothing", 0.2), ("batch_size", 64)])
def test_a_flag_overrides_one_field_only(field, value):
    plain = asdict(resolve_config(TrainConfig(model="deep_convnet")))
    flagged = asdict(resolve_config(TrainConfig(model="deep_convnet", **{field: value})))
    assert flagged[field] == value != plain[field]
    assert {k: v for k, v in flagged.items() if k != field} == {k: v for k, v in plain.items() if k != field}


def test_named_recipe_applies_over_the_default_and_under_flags():
    quick = resolve_config(TrainConfig(model="deep_convnet", recipe="quick"))
    assert (quick.epochs, quick.augment, quick.schedule, quick.recipe) == (2, "none", "cosine", "quick")
    assert resolve_config(TrainConfig(model="deep_convnet", recipe="quick", epochs=5)).epochs == 5


def test_dataset_override_and_model_args_merge():
    spec = get_spec("fcn2s")
    assert spec.recipe_for("shapes-scenes")["epochs"] == 6 and spec.recipe_for("mnist-scenes")["epochs"] == 20
    cfg = resolve_config(TrainConfig(model="fcn2s", dataset="mnist-scenes", model_args={"decoder_width": 8}))
    assert cfg.epochs == 20 and cfg.batch_norm is True and cfg.schedule == "onecycle"
    assert cfg.model_args == {"fusion": "conv", "decoder_width": 8}
    assert resolve_config(TrainConfig(model="fcn2s", model_args={"fusion": "sum"})).model_args == {"fusion": "sum"}


@pytest.mark.parametrize("name", list_models())
def test_every_recipe_of_every_model_resolves(name):
    """Every registered model's recipes (each named one, on each overridden dataset) hold valid names."""
    spec = get_spec(name)
    for dataset in (spec.default_dataset, *spec.recipe.datasets):
        for recipe in spec.recipe.names:
            settings = spec.recipe_for(dataset, recipe)
            assert set(RECIPE_FIELDS) <= set(settings)
            if spec.task != "control":  # DQN's step loop has its own recipe (dlpipe.training.dqn.RECIPES)
                cfg = resolve_config(TrainConfig(model=name, dataset=dataset, recipe=recipe))
                assert (cfg.epochs, cfg.lr, cfg.schedule) == (settings["epochs"], settings["lr"],
                                                              settings["schedule"])


def test_unknown_recipe_and_unknown_override_are_refused():
    with pytest.raises(UsageError, match="unknown recipe 'fastest'; choose from default, quick, book, erase"):
        resolve_config(TrainConfig(model="deep_convnet", recipe="fastest"))
    with pytest.raises(ValueError, match="recipe quick sets lr_max"):
        TrainRecipe(variants={"quick": {"lr_max": 1.0}})


def test_unknown_recipe_is_a_one_line_usage_error():
    result = CliRunner().invoke(cli, ["train", "deep_convnet", "--recipe", "fastest", "--limit", "64"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("dlpipe: error: ") and "unknown recipe 'fastest'" in lines[0]
    dqn = CliRunner().invoke(cli, ["train", "dqn-cartpole", "--recipe", "quick", "--total-steps", "10"])
    assert dqn.exit_code == 2 and "unknown recipe 'quick'; choose from default" in dqn.output


def test_quick_recipe_through_the_command(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "deep_convnet", "--dataset", "shapes", "--recipe", "quick",
                                      "--epochs", "1", "--limit", "256", "--test-limit", "64", "--threads", "1",
                                      "--out", str(out), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads(result.stdout)
    assert summary["recipe"] == "quick" and len(summary["history"]) == 1
    config = torch.load(out / "best.pt", map_location="cpu", weights_only=False)["config"]
    # quick's augmentation, the default recipe's schedule and optimizer, the flag's epochs
    assert (config["recipe"], config["epochs"], config["augment"], config["schedule"], config["optimizer"]) == (
        "quick", 1, "none", "cosine", "adam")


# ------------------------------------------------------------------ the benchmarks use the registry's recipe

BENCH_MODELS = {"mnist_accuracy": "deep_convnet", "segmentation": "fcn2s", "detection": "rcnn",
                "captioning": "captioner", "dqn_cartpole": "dqn-cartpole"}


def _bench(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("name", sorted(BENCH_MODELS))
def test_bench_scripts_restate_no_recipe(name):
    """No module-level table of hyper-parameters: a restated recipe could drift from the registry's."""
    module = _bench(name)
    restated = {k for k, v in vars(module).items() if isinstance(v, dict) and {"lr", "epochs", "optimizer",
                                                                               "batch_size"} & set(v)}
    assert not restated, f"bench/{name}.py restates a recipe in {sorted(restated)}"
    assert get_spec(BENCH_MODELS[name]).recipe.benchmark == f"bench/{name}.py"


def test_dqn_bench_takes_the_registered_recipe():
    from dlpipe.training.dqn import DQNConfig, resolve_config as resolve_dqn

    assert _bench("dqn_cartpole").RECIPE == resolve_dqn(DQNConfig(model="dqn-cartpole"))


def test_mnist_bench_trains_what_the_plain_command_trains(monkeypatch, tmp_path):
    module = _bench("mnist_accuracy")
    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        return {"best": "best.pt", "best_val_score": 0.99, "test_acc": 0.99, "history": [{}], "train_seconds": 1.0,
                "train_cpu_seconds": 1.0}

    monkeypatch.setattr(module, "train", fake_train)
    args = module.argparse.Namespace(recipe="default", epochs=None, data_dir=None, threads=1)
    module.train_seed(2, tmp_path, args)
    plain = asdict(resolve_config(TrainConfig(model="deep_convnet", seed=2)))
    bench = asdict(resolve_config(seen[0]))
    assert {k: bench[k] for k in RECIPE_FIELDS} == {k: plain[k] for k in RECIPE_FIELDS}


def test_models_command_lists_recipes_and_shows_one_models_recipes_as_train_resolves_them():
    listed = json.loads(CliRunner().invoke(cli, ["models", "--json"]).output)
    assert {r["name"]: r["recipes"] for r in listed}["deep_convnet"] == ", ".join(get_spec("deep_convnet").recipe.names)
    result = CliRunner().invoke(cli, ["models", "deep_convnet", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["recipes"]
    for name in get_spec("deep_convnet").recipe.names:
        resolved = resolve_config(TrainConfig(model="deep_convnet", recipe=name))
        assert shown[name]["epochs"] == resolved.epochs and shown[name]["augment"] == resolved.augment
    bad = CliRunner().invoke(cli, ["models", "no-such-model"])
    assert bad.exit_code != 0 and "unknown model 'no-such-model'" in bad.output


def test_defaults_bench_reads_the_readme_claims_and_flags_gaps(monkeypatch, tmp_path):
    module = _bench("defaults")
    claim, text = module.readme_claim("deep_convnet", "mnist", "acc")
    assert claim == _bench("mnist_accuracy").README_CLAIM and "%" in text
    table = tmp_path / "README.md"
    table.write_text("| `rcnn` | `shapes-boxes`, `x` | cmd | mAP@0.5 0.905 ± 0.005 over seeds | t | b |\n"
                     "| `fcn2s`, `fcn8s` | `shapes-scenes` | cmd | mean IoU 0.911 (seed 0) | t | b |\n"
                     "| `dmlp` | `mnist` | cmd | not measured 98.0% | t | b |\n"
                     "| `dae` (denoising) | `mnist` | cmd | PSNR 22.92 dB ± 0.02 from noisy inputs; clean 24.85 dB | t | b |\n"
                     "| `rbm` | `mnist` | cmd | reconstruction error 7.31 ± 0.02 per image | t | b |\n")
    monkeypatch.setattr(module, "README", table)
    assert module.readme_claim("rcnn", "shapes-boxes", "map50")[0] == pytest.approx(0.905)
    assert module.readme_claim("fcn8s", "shapes-scenes", "miou")[0] == pytest.approx(0.911)
    assert module.readme_claim("dmlp", "mnist", "acc")[0] is None
    assert module.readme_claim("dae", "mnist", "psnr")[0] == pytest.approx(22.92)
    assert module.readme_claim("ae", "mnist", "psnr")[1] == "no row in the README's model table"  # not `dae`'s
    assert module.readme_claim("lenet5", "mnist", "acc") == (None, "no row in the README's model table")
    # less is better: a reconstruction error above the claim (at its rounding) is the gap
    worse = module.row("rbm", "mnist", "recon_error", {"mean": 7.316, "std": 0.0, "seeds": 1}, "t")
    better = module.row("rbm", "mnist", "recon_error", {"mean": 7.2, "std": 0.0, "seeds": 1}, "t")
    rounds = module.row("rbm", "mnist", "recon_error", {"mean": 7.314, "std": 0.0, "seeds": 1}, "t")
    assert worse["gap"] is True and better["gap"] is False and rounds["gap"] is False
    monkeypatch.undo()
    below = module.row("deep_convnet", "mnist", "acc", {"mean": claim - 0.0002, "std": 0.0, "seeds": 1}, "test")
    same = module.row("deep_convnet", "mnist", "acc", {"mean": claim + 0.00004, "std": 0.0, "seeds": 1}, "test")
    assert below["gap"] is True and same["gap"] is False
    assert module.row("fcn8s", "shapes-scenes", "miou", {"mean": 0.9, "std": 0.0, "seeds": 1}, "t")["gap"] is None
    for r in module.collected():  # every collected benchmark trained with what the plain command trains now
        assert r["recipe_is_registry_default"] in (True, None), (r["model"], r["recipe_differences"])
        assert r["gap"] is False, r
