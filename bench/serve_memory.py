"""Memory of ``dlpipe serve`` under a long run (issue 13): N requests (100,000 by default) from a few clients,
the server's resident memory (``VmRSS`` from /proc) sampled as they go. A leak of even a few hundred bytes a
request shows as steady growth after warm-up; the JSON gives the RSS after warm-up, at the end and the slope.

Usage:
    python bench/serve_memory.py --model deep_convnet.onnx --shape 1,1,28,28 [--requests 100000] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _drive(url: str, requests: int, clients: int, shape: list[int], pid: int, samples: list) -> dict:
    """``requests`` binary-tensor and JSON requests (alternating per client) from ``clients`` loops; RSS
    sampled every 2,000 requests."""
    import httpx
    from serve import _request

    bodies = [_request(shape, "binary"), _request(shape, "json")]
    done, failures = 0, 0
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        async def loop(k: int):
            nonlocal done, failures
            while done < requests:
                done += 1
                body, headers = bodies[(done + k) % 2]
                response = await client.post("/v2/models/model/infer", content=body, headers=headers)
                failures += response.status_code != 200
                if done % 2000 == 0:
                    samples.append((done, round(_rss_mib(pid), 1)))

        started = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(clients)))
        seconds = time.perf_counter() - started
    return {"requests": done, "failures": failures, "seconds": round(seconds, 1),
            "throughput_rps": round(done / seconds, 1)}


def main() -> None:
    from common import write_result
    from dlpipe.apps.serve.run import start_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--shape", default="1,1,28,28")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shape = [int(v) for v in args.shape.split(",")]
    served = Path(f"/tmp/dlpipe-memory-{time.time_ns()}") / "model.onnx"
    served.parent.mkdir(parents=True)
    served.write_bytes(Path(args.model).read_bytes())
    proc, url = start_server([str(served), "--device", "cpu", "--threads", str(args.threads), "--no-access-log"],
                             stdout=subprocess.DEVNULL)
    samples: list[tuple[int, float]] = [(0, round(_rss_mib(proc.pid), 1))]
    try:
        load = asyncio.run(_drive(url, args.requests, args.clients, shape, proc.pid, samples))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    warm = [s for s in samples if s[0] >= min(10_000, args.requests // 5)]
    slope = float(np.polyfit([s[0] for s in warm], [s[1] for s in warm], 1)[0]) if len(warm) > 2 else None
    payload = {"model": args.model, "shape": shape, "clients": args.clients, **load,
               "rss_start_mib": samples[0][1], "rss_after_warmup_mib": warm[0][1] if warm else None,
               "rss_end_mib": samples[-1][1], "rss_max_mib": max(s[1] for s in samples),
               "growth_after_warmup_bytes_per_request": round(slope * 2**20, 1) if slope is not None else None,
               "samples": samples}
    print(json.dumps({k: v for k, v in payload.items() if k != "samples"}))
    print(write_result("serve_memory", payload, args.out))


if __name__ == "__main__":
    main()
