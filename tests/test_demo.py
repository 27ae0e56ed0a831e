"""``dlpipe demo`` end to end through the installed console script, in a reduced mode: run once, then the
summary it wrote, the files it names and the tables it printed are checked."""

import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from dlpipe.runtime import read_metadata
from dlpipe.runtime.benchmark import SPREAD_FOOTNOTE, SPREAD_LIMIT

slow = pytest.mark.slow

VARIANTS = ["fp32", "fp16", "int8", "pytorch eager"]
OTHER_TASKS = {"segmentation", "detection", "captioning", "control", "transfer"}
# The three tables `dlpipe demo` prints: their header rows, as apps/cli.py lays them out.
TABLES = [["variant", "KiB", "accuracy", "agrees w/ fp32", "p50 ms (b=1)", "img/s (b=64)"],
          ["image", "truth", "predicted", "prob"],
          ["task", "model", "metric", "results", "app"]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    dlpipe = Path(sys.executable).with_name("dlpipe")  # the console script installed beside this Python
    proc = subprocess.run([str(dlpipe), "demo", "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"out": out, "stdout": proc.stdout, "summary": json.loads((out / "summary.json").read_text())}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@slow
def test_variants_are_measured(demo):
    out, variants = demo["out"], demo["summary"]["variants"]
    assert [v["variant"] for v in variants] == VARIANTS
    assert all((out / name).is_file() for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"))
    for v in variants:
        assert Path(v["path"]).is_file(), v
        assert _number(v["accuracy"]) and 0 < v["accuracy"] <= 1, v
        assert _number(v["p50_ms_b1"]) and v["p50_ms_b1"] > 0, v
        assert _number(v["throughput_b64"]) and v["throughput_b64"] > 0, v
        for batch in ("b1", "b64"):  # issue 12: each timing says how far to trust it
            assert _number(v[f"spread_{batch}"]) and v[f"spread_{batch}"] >= 1, v
            assert v[f"spread_too_wide_{batch}"] is (v[f"spread_{batch}"] > SPREAD_LIMIT), v


@slow
def test_samples_are_classified_files(demo):
    out, samples = demo["out"], demo["summary"]["samples"]
    labels = set(read_metadata(out / "model.int8.onnx").labels)  # the samples go through the int8 model
    assert len(labels) > 1, labels
    assert len(samples) == 6
    for s in samples:
        assert Path(s["image"]).is_file(), s
        assert s["label"] in labels and s["truth"] in labels, (s, labels)
        assert _number(s["score"]) and 0 < s["score"] <= 1, s
    written = sorted((out / "samples").glob("*.png"))
    assert len(written) == len(samples) == 6
    assert {Path(s["image"]).resolve() for s in samples} == {p.resolve() for p in written}


@slow
def test_every_other_task_reports_a_score_per_variant(demo):
    out, rows = demo["out"], demo["summary"]["tasks"]
    tasks = {t["task"]: t for t in rows}
    assert len(rows) == len(tasks) and set(tasks) == OTHER_TASKS
    for name, row in tasks.items():
        assert all(isinstance(row[k], str) and row[k] for k in ("model", "dataset", "metric", "sample")), row
        assert row["scores"] and all(_number(v) for v in row["scores"].values()), row
    assert all(set(tasks[t]["scores"]) == {"fp32", "fp16", "int8"} for t in ("segmentation", "detection", "control"))
    assert set(tasks["captioning"]["scores"]) == {"fp32", "int8"}
    assert {"fp32 held-out", "int8 held-out"} <= set(tasks["transfer"]["scores"])
    # control: each variant played its episodes (a return, not a missing 0) -- CartPole's own limits bound it
    assert all(v > 0 for v in tasks["control"]["scores"].values()), tasks["control"]
    # what each task's app wrote
    assert len(list((out / "segmentation" / "app").glob("*_overlay.png"))) == 2
    assert len(list((out / "detection" / "app").glob("*_boxes.json"))) == 2
    assert (out / "transfer" / "model.int8.onnx").is_file()
    assert (out / "captioning" / "captioner" / "manifest.int8.json").is_file()


@slow
def test_stdout_prints_the_tables(demo):
    lines = demo["stdout"].splitlines()
    for headers in TABLES:
        header = re.compile(r"\s{2,}".join(map(re.escape, headers)) + r"\s*$")
        assert any(header.match(line) for line in lines), (headers, demo["stdout"][-3000:])
    assert "sample classifications" in demo["stdout"] and "other tasks" in demo["stdout"]
    busy = any(v["spread_too_wide_b1"] or v["spread_too_wide_b64"] for v in demo["summary"]["variants"])
    assert (SPREAD_FOOTNOTE in demo["stdout"]) is busy
    for row in demo["summary"]["tasks"]:  # one row per task in the last table
        assert any(line.split()[:1] == [row["task"]] for line in lines), row["task"]


def _variant(name: str, p50: float, throughput: float, wide_b1: bool, wide_b64: bool) -> dict:
    return {"variant": name, "path": f"{name}.onnx", "size_kib": 100.0, "accuracy": 0.9, "agreement": "-",
            "p50_ms_b1": p50, "spread_b1": 3.0 if wide_b1 else 1.1, "spread_too_wide_b1": wide_b1,
            "throughput_b64": throughput, "spread_b64": 3.0 if wide_b64 else 1.1, "spread_too_wide_b64": wide_b64}


@pytest.mark.parametrize("busy", [False, True])
def test_demo_table_marks_timings_too_wide_to_trust(monkeypatch, busy):
    from dlpipe.apps.cli import cli

    variants = [_variant("fp32", 0.025, 79000.0, False, False), _variant("int8", 0.31, 44800.0, busy, False),
                _variant("pytorch eager", 0.19, 35368.4, False, busy)]
    summary = {"out": "runs/demo", "variants": variants, "samples": [], "tasks": []}
    fake = types.ModuleType("dlpipe.apps.demo")  # the table only, without training anything
    fake.run_demo = lambda **kwargs: summary
    monkeypatch.setitem(sys.modules, "dlpipe.apps.demo", fake)
    result = CliRunner().invoke(cli, ["demo", "--quick"])
    assert result.exit_code == 0, result.output
    rows = {line.split("  ")[0]: line.split() for line in result.output.splitlines()
            if line.split("  ")[0] in ("fp32", "int8", "pytorch eager")}
    assert rows["fp32"][-2:] == ["0.0250", "79000"]
    assert rows["int8"][-2:] == ["0.3100*" if busy else "0.3100", "44800"]
    assert rows["pytorch eager"][-2:] == ["0.1900", "35368*" if busy else "35368"]
    assert (SPREAD_FOOTNOTE in result.output) is busy
