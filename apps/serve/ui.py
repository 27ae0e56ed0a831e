"""The web page over ``dlpipe serve --ui`` (issue 18): ``GET /`` serves one plain HTML page whose script
(``apps/serve/static/``, no build step, nothing fetched from elsewhere) lists the served models, posts image files,
observations or generation settings to the task endpoint and draws each task's answer.

Routes added: ``GET /`` (the page), ``/ui/*`` (its CSS and script), ``GET /v1/models`` (the served models, what
their task endpoint takes, their labels and input size) and ``GET /v1/models/{name}/card`` (the model card
Markdown of :func:`dlpipe.apps.card.model_card`). Every response of the server then carries a
``Server-Timing`` header with the time the application spent on it, which the page shows beside the round trip
it measures itself."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from dlpipe.apps.serve import protocol
from dlpipe.apps.serve.http import error_response
from dlpipe.apps.serve.repository import ServedModel
from dlpipe.apps.serve.tasks import TASK_ENDPOINTS
from dlpipe.runtime.errors import DlpipeError
from dlpipe.runtime.predictors import PALETTE

# Not a folder called ui/ beside this module: setuptools would take it for a package of the same name.
STATIC = Path(__file__).resolve().parent / "static"
LABELS_SHOWN = 20  # labels listed per model; label_count says how many there are
# The page and its files come from this server only; pictures are also data: (answers) and blob: (previews).
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
                           "frame-ancestors 'none'; form-action 'self'")


def model_summary(model: ServedModel, versions: list[str]) -> dict:
    """What the page shows and needs of a served model (its newest version).

    Returns:
        ``name``, ``versions``, ``version``, ``task`` (None for a raw ONNX file), ``request`` (what its task
        endpoint takes: ``images``, ``observations``, ``none``; None without one), ``package``, ``labels`` (the
        first :data:`LABELS_SHOWN`), ``label_count``, ``input_size`` ([height, width]), ``color``,
        ``precision``, ``inputs`` (the OIP tensor metadata; empty for a package) and ``conditional`` (whether a
        generator takes a class).
    """
    info = model.predictor.info if model.predictor is not None else None
    endpoint = TASK_ENDPOINTS.get(model.task) if model.task else None
    labels = list(info.labels) if info is not None else []
    inputs = [] if model.package else [protocol.tensor_metadata(i.name, i.type, i.shape) for i in model.engine.inputs]
    return {"name": model.name, "versions": versions, "version": model.version, "task": model.task,
            "request": endpoint.body if endpoint else None, "package": model.package,
            "labels": labels[:LABELS_SHOWN], "label_count": len(labels),
            "input_size": list(info.preprocessing.size) if info is not None else None,
            "color": info.preprocessing.color if info is not None else None,
            "precision": info.precision if info is not None else None, "inputs": inputs,
            "conditional": bool(getattr(model.predictor, "conditional", False))}


def card_markdown(model: ServedModel) -> Response:
    """The model card of ``model`` as Markdown, or a JSON error: 404 when no card can be made for it (no dlpipe
    metadata), 500 when making it failed."""
    from dlpipe.apps.card import model_card  # here: PyYAML and the card's tables only when a card is asked for

    try:
        text = model_card(model.path)
    except DlpipeError as exc:
        return error_response(404, f"model '{model.name}' has no card: {str(exc).replace(str(model.path), model.name)}")
    except Exception as exc:  # a card that cannot be made must not take the page down
        return error_response(500, f"the card of model '{model.name}' failed: {type(exc).__name__}: {exc}")
    return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")


class ServerTiming:
    """ASGI middleware adding ``Server-Timing: app;dur=<ms>`` (the application's time until its response
    started) to every HTTP response, so a browser can tell server time from network time."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()

        async def sending(message):
            if message["type"] == "http.response.start":
                ms = 1000 * (time.perf_counter() - started)
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"server-timing", f"app;dur={ms:.1f}".encode())]}
            await send(message)

        await self.app(scope, receive, sending)


def add_ui_routes(app: FastAPI, server) -> None:
    """Add the page, its files, the model list and the model cards to ``app`` for ``server``
    (a :class:`dlpipe.apps.serve.app.Server`)."""

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"content-security-policy": CONTENT_SECURITY_POLICY, "cache-control": "no-cache"})

    @app.get("/v1/models", summary="The served models: task, what the task endpoint takes, labels, input size")
    async def models() -> dict:
        names = sorted(server.repository.models)
        summaries = [model_summary(server.repository.get(n), server.repository.versions(n)) for n in names]
        return {"models": summaries, "palette": PALETTE.tolist()}

    @app.get("/v1/models/{name}/card", summary="The model card (Markdown)", response_class=PlainTextResponse,
             responses={404: {"description": "Unknown model, or no card for it"},
                        500: {"description": "The card could not be made"}})
    async def card(name: str) -> Response:
        model = server.repository.get(name)
        if model is None:
            return error_response(404, f"model '{name}' is not served")
        return await run_in_threadpool(card_markdown, model)

    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")
    app.add_middleware(ServerTiming)
