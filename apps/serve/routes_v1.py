"""``POST /v1/models/{name}/predict``: the task endpoint (see :mod:`dlpipe.apps.serve.tasks`) over HTTP.

Image tasks take image files as ``multipart/form-data`` (any field names, several files at once) or one
image as the raw body (``image/*`` or ``application/octet-stream``); query parameters: ``top_k``
(classification), ``threshold`` (detection), ``mask`` and ``overlay`` (segmentation: base64 PNGs in the
answer), ``beam`` (captioning), ``size`` (stylization). Policies take JSON observations or a ``.npy`` file;
generators take only ``n``, ``seed``, ``class`` and ``columns``. Requests run in a worker thread at most
``max_queue`` at a time per model; more are refused with 503."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from dlpipe.apps.serve.http import HTTPError, read_body
from dlpipe.apps.serve.tasks import MAX_IMAGES, Request as TaskRequest, Upload, endpoint, parse_document

RETRY_AFTER = "1"


async def _uploads(request: Request, body: bytes, content_type: str) -> list[Upload]:
    """The files of a request: multipart files, or the raw body as one file."""
    if not content_type.startswith("multipart/form-data"):
        return [Upload("image", body)] if body else []

    async def chunks():
        yield body

    try:
        form = await MultiPartParser(request.headers, chunks(), max_files=MAX_IMAGES + 1, max_fields=100).parse()
    except MultiPartException as exc:
        raise HTTPError(400, f"malformed multipart body: {exc.message}") from None
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        return [Upload(f.filename or f"file #{i}", await f.read()) for i, f in enumerate(files)]
    finally:
        await form.close()


async def _task_request(request: Request, kind: str, limit: int) -> TaskRequest:
    """What the request carries, read as the endpoint ``kind`` expects (see :class:`Endpoint`)."""
    content_type = request.headers.get("content-type", "")
    body = await read_body(request, limit)
    params = dict(request.query_params)
    if kind == "none":
        return TaskRequest([], params)
    if content_type.startswith("application/json"):
        if kind != "observations":
            raise HTTPError(415, f"expected image files (multipart/form-data) or image bytes, got {content_type!r}")
        return TaskRequest([], params, parse_document(body))
    if content_type.startswith(("text/", "application/x-www-form-urlencoded")):
        wanted = "image files (multipart/form-data) or image bytes" if kind == "images" else \
            "JSON observations or a .npy file"
        raise HTTPError(415, f"expected {wanted}, got {content_type!r}")
    return TaskRequest(await _uploads(request, body, content_type), params)


def add_task_routes(app: FastAPI, server, counted) -> None:
    """Add the task endpoint to ``app`` for ``server`` (``counted`` counts outcomes and answers errors)."""
    running: dict[str, int] = {}

    async def handle(request: Request, name: str) -> Response:
        model = server.model(name, None)
        if model.predictor is None:
            raise HTTPError(400, f"model '{name}' has no dlpipe metadata, so no task; use /v2/models/{name}/infer")
        if not server.ready:
            raise HTTPError(503, "the server is shutting down", {"retry-after": RETRY_AFTER})
        if running.get(name, 0) >= model.settings.max_queue:
            raise HTTPError(503, f"model '{name}' has {running[name]} task requests running, its limit",
                            {"retry-after": RETRY_AFTER})
        task = endpoint(model.task)
        running[name] = running.get(name, 0) + 1
        try:
            asked = await _task_request(request, task.body, server.limits.max_body_bytes)
            work = run_in_threadpool(task.answer, model.predictor, asked, server.limits.max_pixels)
            try:
                rows = await asyncio.wait_for(work, model.settings.timeout_s)
            except TimeoutError:
                raise HTTPError(504, f"the request took longer than {model.settings.timeout_s} s") from None
        finally:
            running[name] -= 1
        failed = [r for r in rows if "error" in r]
        if failed and len(failed) == len(rows):
            return JSONResponse({"error": failed[0]["error"], "results": rows}, status_code=400)
        return JSONResponse({"model_name": name, "task": model.task, "results": rows})

    @app.post("/v1/models/{name}/predict", summary="Task prediction: images, observations or generation",
              responses={400: {"description": "Bad request"}, 404: {"description": "Unknown model"},
                         413: {"description": "Body too large"}, 415: {"description": "Wrong content type"},
                         503: {"description": "Overloaded"}},
              openapi_extra={"requestBody": {"required": False, "content": {
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "string", "format": "binary"}}}},
                  "image/png": {"schema": {"type": "string", "format": "binary"}},
                  "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                  "application/json": {"schema": {"type": "object", "properties": {
                      "observations": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}},
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def predict_route(request: Request, name: str) -> Response:
        return await counted(server, name, lambda: handle(request, name))
