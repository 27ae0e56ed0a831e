"""Helpers for the server tests: a real uvicorn server on a free 127.0.0.1 port in a thread, and reading
the server's own Prometheus metrics."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from dlpipe.apps.serve.run import free_port


class ServerThread:
    """``app`` served by uvicorn on 127.0.0.1 in a daemon thread, for a ``with`` block."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def metric_samples(url: str, name: str, model: str) -> dict[str, float]:
    """The samples of metric ``name`` for ``model`` from ``url``/metrics, by sample name (suffix included)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.name: s.value for family in text_string_to_metric_families(text) if family.name == name
            for s in family.samples if s.labels.get("model") == model and s.labels.get("le") in (None, "+Inf")}
