"""Running the server: uvicorn on the application, SIGINT/SIGTERM handled by uvicorn (it stops accepting,
lets the requests in flight finish, then the application's lifespan drains the batchers)."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time

from dlpipe.apps.serve.app import ServerLimits, create_app
from dlpipe.apps.serve.repository import ModelSettings, Repository


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, exiting normally after a graceful shutdown: uvicorn itself re-raises the signal
        once it has shut down, which ends the process by that signal instead of with status 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def serve(sources: list[str], host: str, port: int, settings: ModelSettings, limits: ServerLimits,
          access_log: bool = True, ui: bool = False) -> None:
    """Load the models under ``sources`` and serve them until SIGINT or SIGTERM (``ui``: with the web page at
    ``/``)."""
    import uvicorn

    repository = Repository.open(sources, settings)
    app = create_app(repository, limits, ui=ui)
    handler = logging.StreamHandler(sys.stderr)
    access = logging.getLogger("dlpipe.serve.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    access.propagate = False
    for m in repository:
        kind = f"dynamic batching up to {m.settings.max_batch_size}" if m.batchable else "one request at a time"
        if m.package:
            print(f"dlpipe serve: model '{m.name}' version {m.version} ({m.task} package, task endpoint only) from "
                  f"'{m.path}'", flush=True)
            continue
        print(f"dlpipe serve: model '{m.name}' version {m.version} ({m.task or 'raw'}"
              f", {m.engine.device}, {m.settings.instances} instance(s), {kind}) from '{m.path}'", flush=True)
    print(f"dlpipe serve: listening on http://{host}:{port} (Open Inference Protocol under /v2, "
          f"task endpoints under /v1, metrics at /metrics); Ctrl-C stops", flush=True)
    if ui:
        page = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # where a browser on this machine finds it
        page = f"[{page}]" if ":" in page else page
        print(f"dlpipe serve: web page at http://{page}:{port}/", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=limits.shutdown_wait_s, lifespan="on")
    _server_class()(config).run()
    print("dlpipe serve: stopped", flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], seconds: float = 30.0, **popen) -> tuple[subprocess.Popen, str]:
    """``dlpipe serve ARGS`` in a subprocess on a free port of 127.0.0.1, once it answers ready.

    Returns:
        The process and its base URL (for tests, benchmarks and scripts that drive a real server).

    Raises:
        RuntimeError: the server exited or was not ready within ``seconds`` (its output attached).
    """
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "dlpipe.apps.cli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(command, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"dlpipe serve did not start: {proc.communicate(timeout=10)}")
