"""The server's ASGI application: the Open Inference Protocol (KServe v2) REST routes, the task endpoints,
``/metrics``, and the batchers' lifetime. ``create_app`` is what ``dlpipe serve`` runs under uvicorn and
what users mount in their own ASGI service."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.middleware.gzip import GZipMiddleware

from dlpipe.apps.serve import protocol
from dlpipe.apps.serve.batcher import BatchTooLarge, Batcher, NotReady, Overloaded
from dlpipe.apps.serve.http import AccessLog, HTTPError, error_response, read_body
from dlpipe.apps.serve.metrics import CONTENT_TYPE, Metrics
from dlpipe.apps.serve.repository import Repository, ServedModel
from dlpipe.apps.serve.routes_v1 import add_task_routes
from dlpipe.apps.serve.triton_repo import model_config
from dlpipe.apps.serve.ui import add_ui_routes
from dlpipe.runtime.errors import DlpipeError

SERVER_NAME = "dlpipe"
EXTENSIONS = ["binary_tensor_data"]
# 503 answers say when to come back: the queue drains within a few batches.
RETRY_AFTER = "1"
# Responses smaller than this go uncompressed even to clients that accept gzip (a classifier's few logits).
GZIP_MIN_BYTES = 1024


@dataclass
class ServerLimits:
    """Limits of the whole server.

    Attributes:
        max_body_bytes: The largest request body (413 beyond).
        max_pixels: Refuse uploaded images of more pixels (None: Pillow's limit, as in the CLI).
        shutdown_wait_s: How long shutdown waits for the queued requests.
    """

    max_body_bytes: int = 64 * 2**20
    max_pixels: int | None = None
    shutdown_wait_s: float = 10.0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dlpipe")
    except PackageNotFoundError:
        return "0"


def model_metadata(model: ServedModel, versions: list[str]) -> dict:
    """A model's OIP metadata: name, versions, platform, inputs and outputs (-1 for dynamic axes)."""
    return {"name": model.name, "versions": versions, "platform": "onnxruntime_onnx",
            "inputs": [protocol.tensor_metadata(i.name, i.type, i.shape) for i in model.engine.inputs],
            "outputs": [protocol.tensor_metadata(o.name, o.type, o.shape) for o in model.engine.outputs]}


def check_inputs(model: ServedModel, request: protocol.InferRequest) -> None:
    """The request's tensors against the model's inputs and outputs: names, datatypes, ranks, fixed sizes.

    Raises:
        ProtocolError: the first mismatch (answered 400).
    """
    specs = {i.name: i for i in model.engine.inputs}
    if set(request.inputs) != set(specs):
        raise protocol.ProtocolError(f"model '{model.name}' takes inputs {sorted(specs)}, got {sorted(request.inputs)}")
    for name, arr in request.inputs.items():
        spec = specs[name]
        want = protocol.ORT_DATATYPES.get(spec.type)
        if protocol.DATATYPE_OF.get(arr.dtype) != want:
            raise protocol.ProtocolError(f"input '{name}' of model '{model.name}' is {want}, "
                                         f"got {protocol.DATATYPE_OF.get(arr.dtype)}")
        dims = protocol.tensor_metadata(name, spec.type, spec.shape)["shape"]
        if len(dims) != arr.ndim or any(d >= 0 and d != n for d, n in zip(dims, arr.shape)):
            raise protocol.ProtocolError(f"input '{name}' of model '{model.name}' has shape {dims} (-1: any), "
                                         f"got {list(arr.shape)}")
    known = model.engine.output_names
    unknown = [o for o in request.outputs or () if o not in known]
    if unknown:
        raise protocol.ProtocolError(f"model '{model.name}' has outputs {known}, not {unknown}")


class Server:
    """The application's state: models, their batchers, metrics and limits."""

    def __init__(self, repository: Repository, limits: ServerLimits):
        self.repository = repository
        self.limits = limits
        self.metrics = Metrics()
        self.batchers: dict[tuple[str, str], Batcher] = {}
        self.ready = False

    async def start(self) -> None:
        self.batchers = {(m.name, m.version): Batcher(m, self.metrics) for m in self.repository if not m.package}
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await asyncio.gather(*(b.close(self.limits.shutdown_wait_s) for b in self.batchers.values()))

    def model(self, name: str, version: str | None) -> ServedModel:
        """The model asked for.

        Raises:
            HTTPError: 404 for an unknown model or version.
        """
        model = self.repository.get(name, version)
        if model is None:
            known = self.repository.versions(name)
            what = f"model '{name}'" + (f" has no version '{version}' (it has {known})" if known else " is not served")
            raise HTTPError(404, what)
        return model

    def tensor_model(self, name: str, version: str | None) -> ServedModel:
        """The model asked for on the tensor (OIP) routes: one ONNX graph.

        Raises:
            HTTPError: 404 for an unknown model or version, 400 for a model package.
        """
        model = self.model(name, version)
        if model.package:
            raise HTTPError(400, f"model '{name}' is a {model.task} package of several graphs run in a loop; it "
                                 f"answers on its task endpoint, POST /v1/models/{name}/predict")
        return model

    async def infer(self, request: Request, name: str, version: str | None) -> Response:
        """One OIP inference request, start to end (see :func:`create_app`)."""
        model = self.tensor_model(name, version)
        if not self.ready:
            raise HTTPError(503, "the server is shutting down", {"retry-after": RETRY_AFTER})
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/"):
            raise HTTPError(415, "inference requests are JSON (optionally with binary tensors); image uploads go "
                                 f"to /v1/models/{name}/predict")
        body = await read_body(request, self.limits.max_body_bytes)
        started = time.perf_counter()
        parsed = protocol.parse_infer_request(body, request.headers.get(protocol.HEADER_LENGTH))
        check_inputs(model, parsed)
        self.metrics.parse_seconds.labels(model.name).observe(time.perf_counter() - started)
        batcher = self.batchers[(model.name, model.version)]
        try:
            arrays = await asyncio.wait_for(batcher.submit(parsed.inputs), model.settings.timeout_s)
        except TimeoutError:
            raise HTTPError(504, f"the request took longer than model '{model.name}''s timeout of "
                                 f"{model.settings.timeout_s} s") from None
        started = time.perf_counter()
        names = parsed.outputs or model.engine.output_names
        chosen = [arrays[model.engine.output_names.index(n)] for n in names]
        body, headers = protocol.encode_infer_response(model.name, model.version, parsed, names, chosen)
        self.metrics.serialize_seconds.labels(model.name).observe(time.perf_counter() - started)
        return Response(body, headers=headers)


OUTCOMES = {400: "bad_request", 404: "not_found", 413: "bad_request", 415: "bad_request", 503: "overloaded",
            504: "timeout"}


def public_message(repository: Repository, message: str) -> str:
    """``message`` with each served model's file or folder path (where the runtime's errors name it) replaced
    by the model's name: clients learn what was wrong with their request, not where the server keeps its files."""
    for model in sorted(repository, key=lambda m: len(str(m.path)), reverse=True):
        message = message.replace(str(model.path), model.name)
    return message


async def _counted(server: Server, name: str, handle) -> Response:
    """``handle()`` with its outcome counted and its errors answered as JSON."""
    started = time.perf_counter()
    server.metrics.in_flight.inc()
    try:
        response = await handle()
    except HTTPError as exc:
        response = error_response(exc.status, str(exc), exc.headers)
    except (protocol.ProtocolError, BatchTooLarge, DlpipeError) as exc:  # DlpipeError: the model's InputError
        response = error_response(400, public_message(server.repository, str(exc)))
    except Overloaded as exc:
        response = error_response(503, str(exc), {"retry-after": RETRY_AFTER})
    except NotReady as exc:
        response = error_response(503, str(exc), {"retry-after": RETRY_AFTER})
    except Exception as exc:  # a bug or a model that cannot run: the client gets a 500, the server carries on
        response = error_response(500, public_message(server.repository,
                                                      f"internal error: {type(exc).__name__}: {exc}"))
    finally:
        server.metrics.in_flight.dec()
    outcome = "success" if response.status_code < 300 else OUTCOMES.get(response.status_code, "error")
    label = name if server.repository.get(name) is not None else ""
    server.metrics.requests.labels(label, outcome).inc()
    if outcome == "success":
        server.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)
    return response


def _add_v2_routes(app: FastAPI, server: Server) -> None:
    @app.get("/v2", summary="Server metadata")
    async def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": _version(), "extensions": EXTENSIONS}

    @app.get("/v2/health/live", summary="Server liveness")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Server readiness", responses={503: {"description": "Not ready"}})
    async def ready() -> Response:
        return JSONResponse({"ready": server.ready}, status_code=200 if server.ready else 503)

    async def metadata(name: str, version: str | None = None) -> Response:
        async def handle():
            model = server.tensor_model(name, version)
            return JSONResponse(model_metadata(model, server.repository.versions(name)))
        return await _guarded(handle)

    async def config(name: str, version: str | None = None) -> Response:
        async def handle():
            model = server.tensor_model(name, version)
            return JSONResponse(model_config(name, model.engine, model.settings, model.engine.device))
        return await _guarded(handle)

    async def model_ready(name: str, version: str | None = None) -> Response:
        async def handle():
            server.model(name, version)
            return JSONResponse({"name": name, "ready": server.ready}, status_code=200 if server.ready else 503)
        return await _guarded(handle)

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        return await _counted(server, name, lambda: server.infer(request, name, version))

    not_found = {404: {"description": "Unknown model or version"}}
    infer_doc = dict(responses={**not_found, 400: {"description": "Bad request"}, 413: {"description": "Body too large"},
                                415: {"description": "Wrong content type"}, 503: {"description": "Overloaded"},
                                504: {"description": "Timed out"}},
                     openapi_extra={"requestBody": {"required": True, "content": {
                         "application/json": {"schema": {"type": "object"}},
                         "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.get(prefix, summary="Model metadata", responses=not_found)(metadata)
        app.get(prefix + "/ready", summary="Model readiness", responses=not_found)(model_ready)
        app.get(prefix + "/config", summary="Model configuration (Triton's ModelConfig as JSON)",
                responses=not_found)(config)
        app.post(prefix + "/infer", summary="Inference (JSON or binary tensors)", **infer_doc)(infer)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)


async def _guarded(handle) -> Response:
    try:
        return await handle()
    except HTTPError as exc:
        return error_response(exc.status, str(exc), exc.headers)


def create_app(repository: Repository, limits: ServerLimits | None = None, ui: bool = False) -> FastAPI:
    """The server as an ASGI application over ``repository`` (see :meth:`Repository.open`); ``ui`` adds the web
    page at ``/`` with the model list and cards it reads (see :mod:`dlpipe.apps.serve.ui`).

    Batchers start with the application's lifespan and, at its end, finish what is queued (at most
    ``limits.shutdown_wait_s``) before the workers stop.
    """
    server = Server(repository, limits or ServerLimits())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="dlpipe serve", version=_version(), lifespan=lifespan,
                  description="Open Inference Protocol (KServe v2) REST with the binary tensor extension, "
                              "task endpoints and Prometheus metrics.")
    app.state.server = server
    _add_v2_routes(app, server)
    add_task_routes(app, server, _counted)
    if ui:
        add_ui_routes(app, server)
    app.add_middleware(GZipMiddleware, minimum_size=GZIP_MIN_BYTES)  # only for clients that accept gzip
    app.add_middleware(AccessLog)
    return app
