"""HTTP plumbing shared by the routes: JSON errors with the protocol's status codes, a body read with a
size limit, and the structured access log (a pure ASGI middleware, one JSON line per request)."""

from __future__ import annotations

import json
import logging
import time
import zlib

from starlette.requests import Request
from starlette.responses import JSONResponse

ACCESS_LOG = logging.getLogger("dlpipe.serve.access")
# A body over the limit is still read (and dropped) up to this many bytes, so the client, still sending,
# receives the 413 instead of a reset connection; past it the connection is closed.
DRAIN_LIMIT = 256 * 2**20
# Request bodies the protocol lets clients compress (tritonclient's request_compression_algorithm): zlib's
# window bits for each Content-Encoding.
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS, "identity": None}


class HTTPError(Exception):
    """An error answered as ``{"error": message}`` with ``status`` (and extra headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes.

    Raises:
        HTTPError: 413 for a larger body, 400 for one that ends early (a truncated upload).
    """
    declared = request.headers.get("content-length")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                chunks = []
                if size > DRAIN_LIMIT:
                    break
                continue
            chunks.append(chunk)
    except Exception as exc:  # starlette's ClientDisconnect: the client went away mid-body
        raise HTTPError(400, f"the request body ended early ({type(exc).__name__})") from None
    if size > limit:
        raise HTTPError(413, f"the request body has more than {limit:,} bytes, the server's limit "
                             "(dlpipe serve --max-body-mb)", {"connection": "close"})
    if declared is not None and declared.isdigit() and int(declared) != size:
        raise HTTPError(400, f"the request body has {size} bytes, Content-Length says {declared}")
    return _decoded(b"".join(chunks), request.headers.get("content-encoding", "identity").strip().lower(), limit)


def _decoded(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body inflated, to at most ``limit`` bytes (a small compressed body must not expand
    into gigabytes).

    Raises:
        HTTPError: 415 for another encoding, 400 for data that does not inflate, 413 past the limit.
    """
    if encoding not in ENCODINGS:
        raise HTTPError(415, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or identity")
    if ENCODINGS[encoding] is None:
        return body
    inflater = zlib.decompressobj(ENCODINGS[encoding])
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HTTPError(400, f"the {encoding} request body does not inflate: {exc}") from None
    if len(out) > limit:
        raise HTTPError(413, f"the {encoding} request body inflates to more than {limit:,} bytes, the server's limit "
                             "(dlpipe serve --max-body-mb)")
    if not inflater.eof:
        raise HTTPError(400, f"the {encoding} request body is truncated")
    return out


class AccessLog:
    """ASGI middleware writing one JSON line per HTTP request to the ``dlpipe.serve.access`` logger."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not ACCESS_LOG.isEnabledFor(logging.INFO):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("", 0)
            ACCESS_LOG.info(json.dumps({"client": f"{client[0]}:{client[1]}", "method": scope["method"],
                                        "path": scope["path"], "status": status["code"],
                                        "ms": round(1000 * (time.perf_counter() - started), 3)}))
