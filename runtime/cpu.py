"""Which integer instructions this CPU gives onnxruntime's int8 kernels.

The int8 format search (``dlpipe quantize --to int8 --format auto``) keeps the format that runs fastest on the
machine that quantizes, and what runs fastest depends on these instructions: with AVX-512 VNNI onnxruntime
fuses U8S8 QDQ convolutions and leaves S8S8 depthwise ones in float; on an AVX2-only CPU it fuses both (measured on the
two machines of the README's Benchmarks section). A quantized file records the CPU it was tuned on
(``quantization.cpu`` in its metadata) so that a file run on another kind of CPU can say so.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

# Best first: the first of these a CPU has names its int8 kernels' class.
INT8_ISAS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2", "asimddp", "neon", "asimd")


def cpu_info() -> dict[str, Any]:
    """``{"model": "AMD EPYC ...", "int8_isa": "avx2"}``: the CPU's name and the best of :data:`INT8_ISAS` it
    has (``"unknown"`` where /proc/cpuinfo cannot be read, as on macOS or Windows). A new dict each call: callers
    put it in metadata."""
    return dict(_read_cpu())


@lru_cache(maxsize=1)
def _read_cpu() -> dict[str, Any]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {"model": platform.processor() or platform.machine(), "int8_isa": "unknown"}
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    isa = next((name for name in INT8_ISAS if name in flags), "none" if flags else "unknown")
    return {"model": model or platform.machine(), "int8_isa": isa}


def tuned_elsewhere(quantization: dict[str, Any] | None, path: Path | str) -> str:
    """Why an int8 file's format may not be this CPU's fastest ('' when it was tuned on this kind of CPU, either
    CPU is unknown, or the user named the format): the format search ran where ``quantization.cpu`` names other
    integer instructions than this CPU's."""
    quantization = quantization or {}
    if quantization.get("format_requested") != "auto":  # a format the user named was not chosen by timing
        return ""
    tuned = quantization.get("cpu") or {}
    here = cpu_info()["int8_isa"]
    there = tuned.get("int8_isa") if isinstance(tuned, dict) else None
    if not isinstance(there, str) or "unknown" in (there, here) or there == here:
        return ""
    return (f"'{path}' was quantized on a CPU with {there} int8 kernels ({tuned.get('model') or 'model unknown'}), "
            f"this one has {here}: its format ({quantization.get('format') or 'unknown'}) was the fastest "
            "there and may not be here; run dlpipe quantize on this machine to choose again")
