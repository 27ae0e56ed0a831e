"""Helpers shared by the benchmark scripts: JSON results with the command that made them, and tables."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    from dlpipe.runtime.cpu import cpu_info

    cpu = cpu_info()
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": str(torch.__version__), "onnxruntime": onnxruntime.__version__, "cpu": cpu["model"],
            "int8_isa": cpu["int8_isa"], "avx512_vnni": cpu["int8_isa"] in ("avx512_vnni", "amx_int8"),
            "torch_threads": torch.get_num_threads()}


def write_result(name: str, payload: dict[str, Any], out: str | None = None) -> Path:
    """Write ``payload`` (plus the command line, time and machine) as JSON and return the path."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": machine(), **payload}
    path.write_text(json.dumps(doc, indent=2))
    return path
