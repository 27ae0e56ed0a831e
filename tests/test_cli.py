"""The dlpipe command line through click's CliRunner: the chain train -> export -> quantize ->
evaluate -> bench -> classify, and bad inputs that must give one line and a non-zero exit code."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dlpipe.apps.cli import cli


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dlpipe: error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_help_does_not_import_torch():
    code = "import sys; from dlpipe.apps.cli import cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_models_lists_the_registry():
    out = json.loads(run("models", "--json").stdout)
    assert {"dmlp", "lenet5", "deep_convnet", "resnet_small"} <= {m["name"] for m in out}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("cli")
    # --recipe plain: a constant learning rate, so one short epoch learns enough (cosine would decay it to 0)
    train = json.loads(run("train", "dmlp", "--recipe", "plain", "--dataset", "mnist", "--data-dir", data_dir,
                           "--epochs", "1", "--limit", "6000", "--model-arg", "hidden=[256, 128]", "--out", d / "run", "--no-progress",
                           "--json").stdout)
    export = json.loads(run("export", train["best"], "--out", d / "m.onnx", "--json").stdout)
    quant = json.loads(run("quantize", d / "m.onnx", "--to", "int8", "--data-dir", data_dir, "--json").stdout)
    return {"dir": d, "train": train, "export": export, "quant": quant, "data_dir": data_dir}


def test_train_export_quantize(chain):
    from dlpipe.training.checkpoint import load_checkpoint

    assert chain["train"]["test_acc"] > 0.85
    assert load_checkpoint(chain["train"]["best"])["model_args"]["hidden"] == [256, 128]  # --model-arg, JSON value
    assert (chain["dir"] / "run" / "metrics.jsonl").read_text().count("\n") == 1
    assert [p["batch"] for p in chain["export"]["parity"]] == [1, 16]
    assert chain["quant"]["path"].endswith("m.int8.onnx") and chain["quant"]["agreement"] >= 0.97


def test_evaluate_and_bench(chain):
    d = chain["dir"]
    rows = json.loads(run("evaluate", d / "m.onnx", d / "m.int8.onnx", "--limit", "500", "--data-dir",
                          chain["data_dir"], "--json").stdout)
    assert [r["precision"] for r in rows] == ["fp32", "int8"]
    assert abs(rows[0]["accuracy"] - rows[1]["accuracy"]) < 0.03 and rows[0]["accuracy"] > 0.85
    assert np.array(rows[0]["confusion"]).sum() == 500
    table = run("evaluate", d / "m.onnx", "--limit", "100", "--confusion", "--data-dir", chain["data_dir"]).output
    assert "confusion matrix" in table
    bench = json.loads(run("bench", d / "m.onnx", d / "m.int8.onnx", "--vs-torch", chain["train"]["best"],
                           "--batch", "1,8", "--iters", "10", "--warmup", "2", "--json").stdout)
    assert {(b["name"].split(" [")[1], b["batch"]) for b in bench} == {
        (p, b) for p in ("fp32]", "int8]") for b in (1, 8)}
    assert all(b["p50_ms"] > 0 and b["p99_ms"] >= b["p50_ms"] for b in bench)


def test_classify(chain, tmp_path):
    from dlpipe.training.data import load_split

    images, labels = load_split("mnist", "test", chain["data_dir"], limit=4)
    files = []
    for i, img in enumerate(images):
        f = tmp_path / f"digit{i}.png"
        Image.fromarray(img).resize((100, 100)).convert("RGB").save(f)  # bigger, colour: the runtime adapts
        files.append(f)
    out = json.loads(run("classify", chain["dir"] / "m.int8.onnx", *files, "--top-k", "2", "--json").stdout)
    assert len(out) == 4 and all(len(r["top_k"]) == 2 for r in out)
    assert sum(r["label"] == str(t) for r, t in zip(out, labels)) >= 3
    table = run("classify", chain["dir"] / "m.onnx", files[0]).output
    assert "digit0.png" in table and "label" in table


def test_bad_inputs_give_one_line(chain, tmp_path):
    d = chain["dir"]
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_one_line_error(run("classify", d / "m.onnx", tmp_path / "nope.png", ok=False), "nope.png", "does not exist")
    assert_one_line_error(run("classify", d / "m.onnx", text, ok=False), "notes.txt", "not an image")
    assert_one_line_error(run("classify", text, text, ok=False), "notes.txt", "not a loadable ONNX model")
    assert_one_line_error(run("export", text, "--out", tmp_path / "o.onnx", ok=False), "notes.txt")
    assert_one_line_error(run("train", "nonet", ok=False), "unknown model 'nonet'")
    assert_one_line_error(run("train", "dmlp", "--dataset", "mnist", "--data-dir", tmp_path, "--out",
                              tmp_path / "r", ok=False), str(tmp_path / "MNIST" / "raw"))
    assert_one_line_error(run("quantize", d / "m.int8.onnx", "--to", "fp16", ok=False), "already a int8 model")
    assert_one_line_error(run("classify", d / "m.onnx", text, "--device", "cuda", ok=False), "cuda")
    assert not (tmp_path / "o.onnx").exists()
    assert run("quantize", d / "m.onnx", "--to", "int4", ok=False).exit_code == 2  # click's usage error
    assert_one_line_error(run("train", "dmlp", "--model-arg", "widths=[8]", "--out", tmp_path / "r", ok=False),
                          "dmlp takes no model argument 'widths'")
    usage = run("train", "dmlp", "--model-arg", "hidden", "--out", tmp_path / "r", ok=False)
    assert usage.exit_code == 2 and "'hidden' is not KEY=VALUE" in usage.output


def test_export_users_module_through_the_cli(tmp_path, monkeypatch):
    (tmp_path / "netdef.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = json.loads(run("export", "--builder", "netdef:build", "--input-shape", "3,8,8", "--labels", "r,g,b",
                         "--out", tmp_path / "u.onnx", "--json").stdout)
    assert out["model"] == "netdef:build"
    usage = run("export", "--builder", "netdef:build", "--out", tmp_path / "v.onnx", ok=False)
    assert usage.exit_code == 2 and "--builder needs --input-shape" in usage.output
    assert "Traceback" not in usage.output and not (tmp_path / "v.onnx").exists()
