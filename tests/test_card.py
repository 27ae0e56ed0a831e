"""``dlpipe card`` (issue 18): model cards in the Hugging Face convention, read back as YAML and Markdown.

The fast tests use a hand-made ONNX classifier with dlpipe metadata (no training); the slow ones the shapes
classifier of tests/conftest.py, its fp16 variant, and the JSON that evaluate and bench really wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from dlpipe.apps.card import model_card, write_card
from dlpipe.runtime.errors import InputError, UsageError

TINY_LABELS = ["left", "middle", "right"]


def _tiny_classifier(path: Path, metadata: bool = True) -> Path:
    """A 1x4x4 image -> 3 logits ONNX classifier (Flatten, MatMul) with dlpipe metadata, built by hand."""
    weight = helper.make_tensor("W", TensorProto.FLOAT, [16, 3], np.linspace(-1, 1, 48, dtype=np.float32).tolist())
    graph = helper.make_graph([helper.make_node("Flatten", ["image"], ["flat"]),
                               helper.make_node("MatMul", ["flat", "W"], ["logits"])], "tiny",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        doc = {"format_version": 1, "task": "classification", "model": "tiny", "labels": TINY_LABELS,
               "preprocessing": {"color": "L", "size": [4, 4], "resize": "bilinear", "scale": 1 / 255, "mean": [0.5],
                                 "std": [0.25], "layout": "NCHW"},
               "inputs": ["image"], "outputs": ["logits"], "dynamic_axes": {"image": {"0": "batch"}},
               "dataset": "hand-made", "metrics": {"val_acc": 0.625}, "precision": "fp32",
               "versions": {"dlpipe": "test"}}
        model.metadata_props.add(key="dlpipe", value=json.dumps(doc))
    onnx.save(model, path)
    return path


def _front(card: str) -> dict:
    """The YAML front matter of a card (it must open the file)."""
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _section(card: str, title: str) -> str:
    """The text of one ``## title`` section."""
    return card.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text``, as cells."""
    table = text[text.index("\n|") + 1:].split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


@pytest.fixture()
def tiny(tmp_path) -> Path:
    return _tiny_classifier(tmp_path / "tiny.onnx")


def test_card_without_json_says_not_evaluated(tiny):
    card = model_card(tiny)
    front = _front(card)
    assert front["pipeline_tag"] == "image-classification" and front["library_name"] == "onnx"
    assert front["license"] == "other" and "Licence: not stated" in card
    assert front["tags"] == ["dlpipe", "onnx", "classification", "tiny", "fp32"]
    assert front["datasets"] == ["hand-made"]
    assert "model-index" not in front
    assert "Not evaluated: pass `--eval` with the JSON of `dlpipe evaluate --json`." in _section(card, "Evaluation")
    assert "Not measured" in _section(card, "Latency")
    assert "The training recipe is not recorded in this model's metadata." in _section(card, "Training")
    assert [r[1] for r in _table_rows(_section(card, "Labels"))] == TINY_LABELS
    inputs = _table_rows(_section(card, "Inputs and preprocessing"))
    assert inputs == [["model", "image", "tensor(float)", "batch x 1 x 4 x 4"]]
    assert "dlpipe classify tiny.onnx image.png" in _section(card, "How to use")
    assert "## Quantization" not in card  # neither quantized nor with variants beside it
    assert _front(model_card(tiny, license="apache-2.0"))["license"] == "apache-2.0"


def test_write_card_refuses_to_overwrite(tiny, tmp_path):
    out = tmp_path / "README.md"
    out.write_text("my own notes\n")
    with pytest.raises(UsageError) as caught:
        write_card(tiny, out)
    assert str(out) in str(caught.value) and "\n" not in str(caught.value)
    assert out.read_text() == "my own notes\n"
    assert write_card(tiny, out, overwrite=True) == out
    assert out.read_text() == model_card(tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "tiny.onnx"]  # no temporary file left


def test_card_refuses_json_of_something_else(tiny, tmp_path):
    report = {"model": "other.onnx", "task": "classification", "precision": "fp32", "dataset": "hand-made",
              "split": "test", "metric": "acc", "labels": ["cat", "dog", "bird"], "acc": 0.5}
    with pytest.raises(UsageError, match="another model"):
        model_card(tiny, [[report]])
    ours = {**report, "labels": TINY_LABELS}
    with pytest.raises(UsageError, match="two evaluations"):
        model_card(tiny, [[ours, ours]])
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"p50": 1}))
    with pytest.raises(InputError, match="dlpipe bench"):
        model_card(tiny, benches=[bench])
    with pytest.raises(InputError, match="not a readable JSON"):
        model_card(tiny, [tmp_path / "missing.json"])
    with pytest.raises(Exception, match="no dlpipe metadata"):
        model_card(_tiny_classifier(tmp_path / "raw.onnx", metadata=False))


def test_export_repository_writes_the_card(tiny, tmp_path):
    from dlpipe.apps.serve.repository import ModelSettings
    from dlpipe.apps.serve.triton_repo import export_repository

    raw = _tiny_classifier(tmp_path / "raw.onnx", metadata=False)
    export_repository([tiny, raw], tmp_path / "repo", ModelSettings())
    card = (tmp_path / "repo" / "tiny" / "README.md").read_text()
    assert _front(card)["pipeline_tag"] == "image-classification"
    assert [r[1] for r in _table_rows(_section(card, "Labels"))] == TINY_LABELS
    assert not (tmp_path / "repo" / "raw" / "README.md").exists()  # no metadata, nothing to write a card from


def test_export_repository_overwrite_replaces_whole_folders_and_a_failure_writes_nothing(tiny, tmp_path):
    from dlpipe.apps.serve.repository import ModelSettings
    from dlpipe.apps.serve.triton_repo import export_repository
    from dlpipe.runtime.errors import ModelFileError

    repo = tmp_path / "repo"
    export_repository([tiny], repo, ModelSettings())
    assert {"README.md", "labels.txt"} <= {p.name for p in (repo / "tiny").iterdir()}
    (tmp_path / "other").mkdir()
    raw = _tiny_classifier(tmp_path / "other" / "tiny.onnx", metadata=False)  # same name, no labels, no card
    export_repository([raw], repo, ModelSettings(), overwrite=True)
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1", "config.json", "config.pbtxt"]
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    with pytest.raises(ModelFileError, match="broken.onnx"):
        export_repository([tiny, broken], repo, ModelSettings(), overwrite=True)
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before  # nothing half-written
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]  # no hidden staging folders left


@pytest.fixture(scope="module")
def family(shapes_onnx, tmp_path_factory) -> dict:
    """The shapes classifier with its fp16 variant beside it, and the JSON of evaluate (fp32 and fp16) and bench."""
    from dlpipe.export.evaluate import benchmark, evaluate_onnx
    from dlpipe.export.quantize import QuantizationConfig, quantize
    from dlpipe.runtime.files import write_json

    folder = tmp_path_factory.mktemp("card")
    model = folder / "shapes.onnx"
    shutil.copyfile(shapes_onnx, model)
    fp16 = Path(quantize(model, None, QuantizationConfig("fp16"), check_size=64).path)
    reports = [evaluate_onnx(m, limit=64, device="cpu") for m in (model, fp16)]
    (folder / "eval.json").write_text(json.dumps(reports, indent=2, default=str))  # as `evaluate --json` prints
    stats = [s.as_dict() for s in benchmark([model, fp16], batches=[1, 4], warmup=1, iters=5, rounds=1, attempts=1)]
    write_json(folder / "bench.json", stats)  # as `bench --out` writes
    return {"model": model, "fp16": fp16, "eval": folder / "eval.json", "bench": folder / "bench.json",
            "reports": reports, "stats": stats}


@pytest.mark.slow
def test_classifier_card_from_metadata(family, shapes_checkpoint):
    from dlpipe.runtime import read_metadata
    from dlpipe.training.checkpoint import load_checkpoint

    card = model_card(family["model"])
    front = _front(card)
    info = read_metadata(family["model"])
    assert front["pipeline_tag"] == "image-classification"
    assert front["tags"] == ["dlpipe", "onnx", "classification", "deep_convnet", "fp32", "fp16"]
    assert front["datasets"] == ["shapes"]
    assert [r[1] for r in _table_rows(_section(card, "Labels"))] == list(info.labels)
    recipe = dict(r[:2] for r in _table_rows(_section(card, "Training")))
    config = load_checkpoint(shapes_checkpoint)["config"]
    for key in ("epochs", "batch_size", "optimizer", "limit"):
        assert recipe[key] == str(config[key]), key
    assert float(recipe["lr"]) == config["lr"]
    assert "out" not in recipe  # where the run wrote its files is not part of the recipe
    fp16 = _section(card, "Quantization").split("### fp16 (`shapes.fp16.onnx`)", 1)[1]
    quantized = dict(r[:2] for r in _table_rows(fp16))
    assert quantized["format"] == "fp16"
    gate = read_metadata(family["fp16"]).raw["quantization"]["gate"]  # the gate the variant passed
    assert f"{gate['agreement']:.2%}" in quantized["agreement with fp32 (gate)"]
    assert gate["check_inputs"] == 64 and gate["min_agreement"] == 0.98


@pytest.mark.slow
def test_model_index_is_the_evaluate_json(family):
    card = model_card(family["model"], [family["eval"]])
    results = _front(card)["model-index"][0]["results"]
    assert len(results) == 2  # one per precision
    for result, report in zip(results, family["reports"]):
        assert result["task"] == {"type": "image-classification"}
        assert result["dataset"] == {"name": "shapes", "type": "shapes", "split": "test"}
        assert result["metrics"] == [{"type": "acc", "value": report["acc"],
                                      "name": f"accuracy ({report['precision']})"}]
    assert [r["precision"] for r in family["reports"]] == ["fp32", "fp16"]
    rows = _table_rows(_section(card, "Evaluation"))
    assert [(r[1], r[4], r[5]) for r in rows] == [(p, "64", "accuracy") for p in ("fp32", "fp16")]
    fp32, half = family["reports"]
    assert f"fp16 accuracy on shapes test: {half['acc']:.4g} vs fp32 {fp32['acc']:.4g}" in _section(card, "Limitations")
    assert model_card(family["model"], [family["reports"]]) == card  # loaded JSON gives the same card


@pytest.mark.slow
def test_latency_table_is_the_bench_json(family):
    card = model_card(family["model"], benches=[family["bench"]])
    rows = {(r[0], int(r[1])): r for r in _table_rows(_section(card, "Latency"))}
    assert len(rows) == len(family["stats"]) == 4
    for s in family["stats"]:
        row = rows[(s["name"], s["batch"])]
        assert float(row[2].rstrip("*")) == pytest.approx(s["p50_ms"], abs=5e-5)
        assert float(row[4]) == pytest.approx(s["p99_ms"], abs=5e-5)
    assert "which the JSON does not record" in _section(card, "Limitations")


@pytest.mark.slow
def test_package_card(tmp_path, data_dir):
    """An autoencoder package (a folder of two graphs and a manifest) and its fp16 variant."""
    from dlpipe.export.onnx_export import export_checkpoint
    from dlpipe.export.quantize import QuantizationConfig, quantize
    from dlpipe.training.train import TrainConfig, train

    result = train(TrainConfig(model="ae", out=str(tmp_path / "run"), data_dir=data_dir, epochs=1, limit=128,
                               test_limit=32, batch_size=32, threads=1, progress=False))
    package = tmp_path / "ae_pkg"
    export_checkpoint(result["best"], package)
    quantize(package, None, QuantizationConfig("fp16"), check_size=32, data_dir=data_dir)
    card = model_card(package)
    front = _front(card)
    assert front["pipeline_tag"] == "image-to-image" and front["datasets"] == ["mnist"]
    assert front["tags"] == ["dlpipe", "onnx", "reconstruction", "ae", "fp32", "fp16"]
    graphs = {(r[0], r[1]) for r in _table_rows(_section(card, "Inputs and preprocessing"))}
    assert graphs == {("encoder", "image"), ("decoder", "code")}
    metrics = json.loads((package / "manifest.json").read_text())["metrics"]
    recorded = dict(r[:2] for r in _table_rows(_section(card, "Metrics recorded at training time")))
    assert float(recorded["val_loss"]) == pytest.approx(metrics["val_loss"], rel=1e-4)
    fp16 = _section(card, "Quantization").split("### fp16 (`manifest.fp16.json`)", 1)[1]
    assert sorted(r[:2] for r in _table_rows(fp16)) == [["decoder", "fp16"], ["encoder", "fp16"]]
    gate = json.loads((package / "manifest.fp16.json").read_text())["gate"]  # the package's gate, recorded
    assert gate["check_inputs"] == 32 and gate["min_agreement"] == 0.98 and gate["agreement"] >= 0.98
    assert f"{gate['agreement']:.2%} {gate['agreement_name']} on 32 held-out inputs" in fp16
    assert 'model = load("ae_pkg")  # an Autoencoder' in card


def test_card_command(tiny, tmp_path):
    """``dlpipe card``: printed with ``--out -``, written once, refused (exit 2, the file untouched) again."""
    from click.testing import CliRunner

    from dlpipe.apps.cli import cli

    printed = CliRunner().invoke(cli, ["card", str(tiny), "--out", "-", "--license", "mit"])
    assert printed.exit_code == 0, printed.output
    assert _front(printed.stdout)["license"] == "mit"
    out = tmp_path / "README.md"
    written = CliRunner().invoke(cli, ["card", str(tiny), "--out", str(out), "--json"])
    assert written.exit_code == 0, written.output
    assert json.loads(written.stdout) == {"card": str(out)} and out.read_text().startswith("---\n")
    out.write_text("mine")
    again = CliRunner().invoke(cli, ["card", str(tiny), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output and out.read_text() == "mine"
    missing = CliRunner().invoke(cli, ["card", str(tiny), "--eval", str(tmp_path / "nope.json"), "--out", "-"])
    assert missing.exit_code == 2 and "nope.json" in missing.output
