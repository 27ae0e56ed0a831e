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
