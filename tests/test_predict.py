"""``dlpipe predict`` (issue 14): a model over a folder tree, a list file or a Parquet table, rows written
incrementally to JSON lines or Parquet, resumed after a kill; the local engine and Ray Data give the same rows,
equal to ``dlpipe classify --json``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image

from dlpipe.apps.batch import predict_batch, read_results
from dlpipe.apps.cli import cli

N_DIGITS = 300


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> str:
    """A randomly initialised MNIST-shaped classifier (conv 5x5 -> ReLU -> linear, 10 digits) built with
    onnx.helper and carrying dlpipe's metadata: a real model file for the runtime, made in milliseconds
    (training one costs seconds to a minute on a busy machine, and the rows' equality does not need it)."""
    rng = np.random.default_rng(0)
    conv = helper.make_tensor("k", TensorProto.FLOAT, [4, 1, 5, 5], rng.normal(0, 0.3, (4, 1, 5, 5)).ravel())
    dense = helper.make_tensor("w", TensorProto.FLOAT, [4 * 24 * 24, 10], rng.normal(0, 0.05, (2304, 10)).ravel())
    nodes = [helper.make_node("Conv", ["image", "k"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                           ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              [conv, dense])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"task": "classification", "model": "tiny", "labels": [str(d) for d in range(10)],
            "preprocessing": {"color": "L", "size": [28, 28], "scale": 1 / 255, "mean": [0.1307], "std": [0.3081]},
            "inputs": ["image"], "outputs": ["logits"]}
    helper.set_model_props(model, {"dlpipe": json.dumps(meta)})
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def digits(tmp_path_factory, data_dir) -> Path:
    """300 MNIST test digits as PNG files in three sub-folders, plus two unreadable files."""
    root = tmp_path_factory.mktemp("digits")
    raw = np.fromfile(Path(data_dir) / "MNIST" / "raw" / "t10k-images-idx3-ubyte", dtype=np.uint8)[16:]
    for i, image in enumerate(raw.reshape(-1, 28, 28)[:N_DIGITS]):
        folder = root / f"part{i % 3}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    (root / "not-an-image.png").write_bytes(b"this is text")
    (root / "truncated.png").write_bytes((root / "part0" / "00000.png").read_bytes()[:60])
    (root / "notes.txt").write_text("not an image suffix: not an input")
    return root


def _files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.png"))


def _by_name(rows: list[dict]) -> dict[str, dict]:
    names = [r["image"] for r in rows]
    assert len(names) == len(set(names)), "duplicate rows"
    return dict(zip(names, rows))


def _classify_json(model: str, files: list[str]) -> dict[str, dict]:
    result = CliRunner().invoke(cli, ["classify", model, *files, "--json"])
    assert result.exit_code == 1, result.output  # the two unreadable files
    return _by_name(json.loads(result.stdout))


def test_local_rows_equal_classify_and_errors_are_rows(classifier, digits, tmp_path):
    out = tmp_path / "rows.jsonl"
    summary = predict_batch(classifier, digits, out, batch_size=32, workers=2, progress=False)
    assert summary["inputs"] == N_DIGITS + 2 and summary["written"] == N_DIGITS + 2 and summary["errors"] == 2
    rows = _by_name(read_results(out))
    assert rows == _classify_json(classifier, _files(digits))
    assert "damaged" in rows[str(digits / "truncated.png")]["error"]
    assert str(digits / "not-an-image.png") in rows[str(digits / "not-an-image.png")]["error"]
    assert len({r["label"] for r in rows.values() if "label" in r}) > 3  # answers that depend on the image


def test_parquet_output_is_one_table_and_equals_jsonl(classifier, digits, tmp_path):
    predict_batch(classifier, digits, tmp_path / "a.jsonl", progress=False)
    out = tmp_path / "a.parquet"
    predict_batch(classifier, digits, out, chunk_size=100, progress=False)
    assert len(list(out.glob("part-*.parquet"))) > 1
    assert _by_name(read_results(out)) == _by_name(read_results(tmp_path / "a.jsonl"))
    table = pq.read_table(out)  # the folder as one dataset, schema from its first part
    assert table.num_rows == N_DIGITS + 2 and table.column("error").null_count == N_DIGITS


def test_stopped_run_resumes_without_redoing_or_losing_rows(classifier, digits, tmp_path):
    out = tmp_path / "r.parquet"
    first = predict_batch(classifier, digits, out, chunk_size=50, batch_size=10, stop_after_chunks=2, progress=False)
    assert first["written"] == 100 and not first["complete"]
    (out / ".part-00002.parquet.tmp").write_bytes(b"half a part")  # what a kill during a write leaves
    second = predict_batch(classifier, digits, out, chunk_size=50, progress=False)
    assert second["skipped"] == 100 and second["written"] == N_DIGITS + 2 - 100 and second["complete"]
    assert len(_by_name(read_results(out))) == N_DIGITS + 2
    assert not list(out.glob(".*.tmp"))
    third = predict_batch(classifier, digits, out, progress=False)
    assert third["written"] == 0 and third["skipped"] == N_DIGITS + 2


def test_killed_process_resumes(classifier, digits, tmp_path):
    """SIGKILL a real run part-way (a folder of 3,000 links to the digits, written 4 rows at a time); the
    re-run completes it with every input once, a partial last line cut off and redone."""
    many = tmp_path / "many"
    many.mkdir()
    files = _files(digits)
    for i in range(3000):
        (many / f"{i:05d}.png").symlink_to(files[i % len(files)])
    out = tmp_path / "killed.jsonl"
    command = [sys.executable, "-c", "from dlpipe.apps.cli import main; main()", "predict", classifier, str(many),
               "--out", str(out), "--batch-size", "4", "--chunk-size", "4", "--workers", "1", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.stat().st_size < 20_000) and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = out.read_bytes().count(b"\n")
    assert 0 < before < 3000, f"the run was not stopped part-way ({before} rows)"
    with open(out, "ab") as f:
        f.write(b'{"image": "half a li')  # as a kill in the middle of a write would leave it
    summary = predict_batch(classifier, many, out, progress=False)
    assert summary["skipped"] == before and summary["written"] == 3000 - before
    rows = _by_name(read_results(out))
    assert sorted(rows) == sorted(str(p) for p in many.iterdir())
    unreadable = sum("not-an-image" in files[i % len(files)] or "truncated" in files[i % len(files)]
                     for i in range(3000))
    assert sum("error" in r for r in rows.values()) == unreadable


def test_parquet_inputs_bytes_and_paths(classifier, digits, tmp_path):
    files = [f for f in _files(digits) if "/part" in f][:20]
    table = pa.table({"png": [Path(f).read_bytes() for f in files] + [b"garbage", None],
                      "file": [os.path.relpath(f, tmp_path) for f in files] + ["missing.png", "gone.png"]})
    pq.write_table(table, tmp_path / "inputs.parquet")
    by_bytes = read_results(predict_batch(classifier, tmp_path / "inputs.parquet", tmp_path / "b.jsonl",
                                          column="png", progress=False)["out"])
    by_path = read_results(predict_batch(classifier, tmp_path / "inputs.parquet", tmp_path / "p.jsonl",
                                         column="file", progress=False)["out"])
    assert [r["image"] for r in by_bytes] == [f"{tmp_path / 'inputs.parquet'}#{i}" for i in range(22)]
    assert [r["image"] for r in by_path] == list(table.column("file").to_pylist())
    for a, b in zip(by_bytes[:20], by_path[:20]):
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
        assert "error" not in a
    assert all("error" in r for r in by_bytes[20:] + by_path[20:])
    assert "does not exist" in by_path[20]["error"]
    pq.write_table(pa.table({"image": [{"bytes": Path(f).read_bytes(), "path": f} for f in files]}),
                   tmp_path / "hf.parquet")  # Hugging Face datasets' Image feature
    by_struct = read_results(predict_batch(classifier, tmp_path / "hf.parquet", tmp_path / "s.jsonl",
                                           progress=False)["out"])
    assert [r["label"] for r in by_struct] == [r["label"] for r in by_bytes[:20]]


def test_list_file_of_paths(classifier, digits, tmp_path):
    files = [f for f in _files(digits) if "/part" in f][:5]
    listing = tmp_path / "inputs.txt"
    listing.write_text("# digits, one per line\n" + "\n".join(os.path.relpath(f, tmp_path) for f in files)
                       + "\n\nmissing.png\n")
    rows = read_results(predict_batch(classifier, listing, tmp_path / "l.jsonl", progress=False)["out"])
    assert [r["image"] for r in rows] == [os.path.relpath(f, tmp_path) for f in files] + ["missing.png"]
    direct = _by_name(read_results(predict_batch(classifier, digits, tmp_path / "d.jsonl", progress=False)["out"]))
    assert [r["label"] for r in rows[:5]] == [direct[f]["label"] for f in files]
    assert "does not exist" in rows[5]["error"]


@pytest.mark.parametrize("args, code, words", [
    (["{model}", "{tmp}/nowhere", "--out", "{tmp}/r.jsonl"], 1, "do not exist"),
    (["{model}", "{digits}", "--out", "{tmp}/r.csv"], 2, "must end in .parquet"),
    (["{model}", "{digits}", "--out", "{tmp}/r.jsonl", "--column", "png"], 2, "--column applies"),
    (["{model}", "{tmp}/t.parquet", "--out", "{tmp}/r.jsonl", "--column", "nope"], 2, "no column 'nope'"),
    (["{model}", "{tmp}/t.parquet", "--out", "{tmp}/r.jsonl", "--column", "n"], 2, "expected image bytes"),
    (["{model}", "{digits}", "--out", "{tmp}/file.parquet"], 2, "is a file"),
    (["{model}", "{digits}", "--out", "{tmp}/foreign.parquet"], 2, "did not write"),
    (["{model}", "{digits}", "--out", "{tmp}/r.jsonl", "--address", "ray://h:1"], 2, "--engine ray"),
    (["{tmp}/none.onnx", "{digits}", "--out", "{tmp}/r.jsonl"], 1, "does not exist"),
])
def test_bad_inputs_are_one_line(classifier, digits, tmp_path, args, code, words):
    pq.write_table(pa.table({"png": [b"x"], "n": [1]}), tmp_path / "t.parquet")
    (tmp_path / "file.parquet").write_text("a user's file")
    (tmp_path / "foreign.parquet").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "foreign.parquet" / "data_0.parquet")
    argv = [a.format(model=classifier, tmp=tmp_path, digits=digits) for a in args]
    result = CliRunner().invoke(cli, ["predict", *argv, "--no-progress"])
    assert result.exit_code == code, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("dlpipe: error:") and words in result.output
    assert (tmp_path / "file.parquet").read_text() == "a user's file"
    assert not (tmp_path / "r.jsonl").exists()


def test_ray_engine_without_ray_is_one_line(classifier, digits, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = CliRunner().invoke(cli, ["predict", classifier, str(digits), "--out", str(tmp_path / "r.jsonl"),
                                      "--engine", "ray", "--no-progress"])
    assert result.exit_code == 2 and "pip install 'dlpipe[ray]'" in result.output, result.output
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.slow
def test_ray_rows_equal_local_rows(classifier, digits, tmp_path):
    """Ray Data (a local Ray, two actors) over the same files as the local engine: the same rows."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'dlpipe[ray]' (CI installs it with .[dev])")
    local = predict_batch(classifier, digits, tmp_path / "local.jsonl", progress=False)
    ray_run = predict_batch(classifier, digits, tmp_path / "ray.parquet", engine="ray", workers=2, batch_size=50,
                            chunk_size=100, progress=False)
    assert ray_run["written"] == local["written"] == N_DIGITS + 2 and ray_run["errors"] == 2
    assert _by_name(read_results(tmp_path / "ray.parquet")) == _by_name(read_results(tmp_path / "local.jsonl"))


@pytest.mark.slow
def test_ray_reads_a_parquet_bytes_column_as_local_does(classifier, digits, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'dlpipe[ray]' (CI installs it with .[dev])")
    files = _files(digits)[:40]
    pq.write_table(pa.table({"image": [Path(f).read_bytes() for f in files] + [b"junk"]}), tmp_path / "in.parquet")
    runs = [read_results(predict_batch(classifier, tmp_path / "in.parquet", tmp_path / f"{engine}.jsonl",
                                       engine=engine, workers=2, batch_size=8, progress=False)["out"])
            for engine in ("local", "ray")]
    assert _by_name(runs[0]) == _by_name(runs[1]) and len(runs[0]) == 41 and "error" in _by_name(runs[1])[
        f"{tmp_path / 'in.parquet'}#40"]


def _segmenter(path: Path) -> str:
    """A randomly initialised 3-class segmenter of any image size (a 1x1 convolution over RGB), built with
    onnx.helper with dlpipe's metadata."""
    weights = np.random.default_rng(1).normal(0, 1, (3, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["image", "k"], ["logits"])], "seg",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
                              [helper.make_tensor("k", TensorProto.FLOAT, [3, 3, 1, 1], weights.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"task": "segmentation", "model": "tiny-seg", "labels": ["background", "square", "circle"],
            "preprocessing": {"color": "RGB", "size": [32, 32], "resize": "none", "scale": 1 / 255,
                              "mean": [0.5], "std": [0.25]}, "inputs": ["image"], "outputs": ["logits"]}
    helper.set_model_props(model, {"dlpipe": json.dumps(meta)})
    onnx.save(model, path)
    return str(path)


def test_segmenter_rows_equal_segment(tmp_path):
    """A segmentation model's rows are `dlpipe segment --json`'s, less the files it writes."""
    model = _segmenter(tmp_path / "seg.onnx")
    rng = np.random.default_rng(0)
    files = []
    for i, size in enumerate([(40, 56), (64, 64), (33, 47)]):
        path = tmp_path / "scenes" / f"s{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    rows = _by_name(read_results(predict_batch(model, tmp_path / "scenes", tmp_path / "s.parquet",
                                               progress=False)["out"]))
    result = CliRunner().invoke(cli, ["segment", model, *files, "--out", str(tmp_path / "masks"), "--json"])
    assert result.exit_code == 0, result.output
    expected = {r["image"]: {"image": r["image"], "shares": r["shares"]} for r in json.loads(result.stdout)}
    assert rows == expected and len({r["shares"]["circle"] for r in rows.values()}) == 3
