"""``dlpipe demo`` end to end through the installed console script, in a reduced mode."""

import json
import subprocess
import sys
from pathlib import Path


def test_demo_quick_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    dlpipe = Path(sys.executable).with_name("dlpipe")  # the console script installed beside this Python
    proc = subprocess.run([str(dlpipe), "demo", "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [v["variant"] for v in summary["variants"]] == ["fp32", "fp16", "int8", "pytorch eager"]
    assert all((out / name).is_file() for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"))
    assert len(summary["samples"]) == 6 and all((out / "samples").glob("*.png"))
    assert "variant" in proc.stdout and "sample classifications" in proc.stdout
    # the other tasks, each through its own app: overlays, drawn boxes, games played, a fine-tuned classifier
    tasks = {t["task"]: t for t in summary["tasks"]}
    assert set(tasks) == {"segmentation", "detection", "captioning", "control", "transfer"}
    assert all(set(tasks[t]["scores"]) == {"fp32", "fp16", "int8"} for t in ("segmentation", "detection", "control"))
    assert len(list((out / "segmentation" / "app").glob("*_overlay.png"))) == 2
    assert len(list((out / "detection" / "app").glob("*_boxes.json"))) == 2
    assert all(0 <= v <= 500 for v in tasks["control"]["scores"].values())
    assert (out / "transfer" / "model.int8.onnx").is_file() and "other tasks" in proc.stdout
    assert set(tasks["captioning"]["scores"]) == {"fp32", "int8"}
    assert (out / "captioning" / "captioner" / "manifest.int8.json").is_file()
