"""``dlpipe serve`` (issue 13) with real clients on real sockets: tritonclient.http in JSON and binary mode,
httpx for raw requests and the task endpoint, against uvicorn on 127.0.0.1. Results must equal
``Engine.run`` and the CLI's; batching is read from the server's own metrics."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from dlpipe.apps.serve import ModelSettings, Repository, ServerLimits, create_app
from dlpipe.runtime import Engine
from serve_helpers import ServerThread, metric_samples

pytestmark = pytest.mark.slow  # the session fixtures train and export two small models (about 20 s)
TIMEOUT = 20.0
# Extra names for the classifier, each with its own config.json: batching, a tiny queue, a tiny timeout.
VARIANTS = {
    "batched": {"idle_run": False, "max_queue_delay_ms": 300, "max_batch_size": 8},
    "tiny_queue": {"idle_run": False, "max_queue_delay_ms": 400, "max_queue": 2},
    "slow": {"idle_run": False, "max_queue_delay_ms": 2000, "timeout_s": 0.2},
}


@pytest.fixture(scope="module")
def repository(shapes_onnx, fcn_onnx, tmp_path_factory) -> Path:
    """A Triton-layout repository: the classifier (versions 1 and 2), the segmenter, and the variants."""
    root = tmp_path_factory.mktemp("serve_repo")
    for name, source, versions in (("shapes", shapes_onnx, ("1", "2")), ("fcn", fcn_onnx, ("1",)),
                                   *((v, shapes_onnx, ("1",)) for v in VARIANTS)):
        for version in versions:
            (root / name / version).mkdir(parents=True)
            shutil.copyfile(source, root / name / version / "model.onnx")
        if name in VARIANTS:
            (root / name / "config.json").write_text(json.dumps(VARIANTS[name]))
    return root


@pytest.fixture(scope="module")
def server(repository):
    app = create_app(Repository.open([repository], ModelSettings(device="cpu")),
                     ServerLimits(max_body_bytes=8 * 2**20))
    with ServerThread(app) as running:
        yield running


@pytest.fixture()
def client(server):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), connection_timeout=TIMEOUT,
                                     network_timeout=TIMEOUT)
    yield c
    c.close()


def _infer(client, model, x, binary, version=""):
    tensor = triton.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("logits", binary_data=binary)
    return client.infer(model, [tensor], outputs=[out], model_version=version).as_numpy("logits")


def test_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("shapes")
    assert meta["versions"] == ["1", "2"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"][0]["shape"][0] == -1 and meta["outputs"][0]["datatype"] == "FP32"
    assert client.get_model_metadata("fcn")["inputs"][0]["shape"] == [-1, 3, -1, -1]
    assert client.is_model_ready("shapes", "2") and client.is_model_ready("fcn")
    for path in ("/v2/models/nope", "/v2/models/shapes/versions/7", "/v2/models/nope/ready"):
        response = httpx.get(server.url + path, timeout=TIMEOUT)
        assert response.status_code == 404 and "error" in response.json(), path


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_engine(client, shapes_onnx, fcn_onnx, binary):
    rng = np.random.default_rng(0)
    x = rng.random((3, 3, 32, 32), dtype=np.float32)
    assert np.array_equal(_infer(client, "shapes", x, binary), Engine(shapes_onnx, device="cpu").run(x)[0])
    assert np.array_equal(_infer(client, "shapes", x[:1], binary, version="1"),
                          Engine(shapes_onnx, device="cpu").run(x[:1])[0])
    image = rng.random((1, 3, 64, 96), dtype=np.float32)
    assert np.array_equal(_infer(client, "fcn", image, binary), Engine(fcn_onnx, device="cpu").run(image)[0])


def test_default_outputs_come_back_binary(server, client, shapes_onnx):
    """tritonclient asks for every output in binary when it names none (binary_data_output)."""
    x = np.ones((1, 3, 32, 32), np.float32)
    tensor = triton.InferInput("image", [1, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("shapes", [tensor], request_id="r-7")
    assert result.get_response()["id"] == "r-7"
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 4 * result.as_numpy("logits").size
    assert np.array_equal(result.as_numpy("logits"), Engine(shapes_onnx, device="cpu").run(x)[0])


def _post(server, model, body, headers=None):
    return httpx.post(f"{server.url}/v2/models/{model}/infer", content=body, headers=headers or {}, timeout=TIMEOUT)


def _json_request(shape, datatype="FP32", data=None):
    return json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": datatype,
                                   "data": data if data is not None else [0.5] * int(np.prod(shape))}]}).encode()


def test_bad_requests_get_their_errors_and_the_server_keeps_serving(server, client, repository):
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 12288}}]}).encode()
    cases = [
        (_json_request([1, 3, 32, 32], "INT64", [1] * 3072), {}, 400, "FP32"),  # wrong datatype
        (_json_request([1, 3, 31, 32]), {}, 400, "shape"),  # wrong shape
        (_json_request([1, 3, 32, 32], data=[0.5] * 10), {}, 400, "values"),  # data of the wrong size
        (_json_request([1, 3, 32, 32], data=["a"] * 3072), {}, 400, "FP32"),  # strings for numbers
        (b'{"inputs": [', {}, 400, "JSON"),  # malformed JSON
        (header + bytes(100), {"Inference-Header-Content-Length": str(len(header))}, 400, "ends before"),  # truncated
        (header + bytes(12288), {"Inference-Header-Content-Length": "x"}, 400, "integer"),
        (b"--b\r\n", {"content-type": "multipart/form-data; boundary=b"}, 415, "/v1/models"),
        (_json_request([65, 3, 32, 32]), {}, 400, "at most 64"),  # more rows than max_batch_size
    ]
    for body, headers, status, words in cases:
        response = _post(server, "shapes", body, headers)
        assert response.status_code == status, (words, response.text)
        assert words in response.json()["error"], response.json()
    tiny = _post(server, "fcn", _json_request([1, 3, 2, 2], data=[0.5] * 12))  # too small for the FCN's kernels
    assert tiny.status_code == 400 and "fcn" in tiny.json()["error"], tiny.text
    assert str(repository) not in tiny.text  # the model is named, its path on the server is not
    big = _post(server, "shapes", bytes(100 * 2**20))  # over the 8 MB limit of the fixture
    assert big.status_code == 413 and "limit" in big.json()["error"]
    assert _post(server, "nope", _json_request([1, 3, 32, 32])).status_code == 404
    assert _post(server, "shapes", _json_request([1, 3, 32, 32]), ).status_code == 200
    assert _infer(client, "shapes", np.zeros((1, 3, 32, 32), np.float32), True).shape[0] == 1


def test_dynamic_batching_forms_batches_without_mixing_requests(server, shapes_onnx):
    """16 single-row requests in flight at once reach the model as full batches of 8 (the server's own
    batch-size metric says so), and every answer is its own request's."""
    rng = np.random.default_rng(1)
    inputs = [rng.random((1, 3, 32, 32), dtype=np.float32) for _ in range(16)]
    engine = Engine(shapes_onnx, device="cpu")
    before = metric_samples(server.url, "dlpipe_batch_size", "batched")

    def call(x):
        c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=TIMEOUT)
        try:
            return _infer(c, "batched", x, True)
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, inputs))
    for x, answer in zip(inputs, answers):
        np.testing.assert_allclose(answer, engine.run(x)[0], rtol=1e-4, atol=1e-5)
    after = metric_samples(server.url, "dlpipe_batch_size", "batched")
    executions = after["dlpipe_batch_size_count"] - before.get("dlpipe_batch_size_count", 0)
    rows = after["dlpipe_batch_size_sum"] - before.get("dlpipe_batch_size_sum", 0)
    assert rows == 16 and executions <= 4, (rows, executions)


def test_overload_answers_503_at_once_then_recovers(server):
    """A queue of 2: of 12 requests at once, the ones that find it full get 503 with Retry-After well before
    the queued ones are run (400 ms delay), and the server answers everything afterwards."""
    body = _json_request([1, 3, 32, 32])

    def call(_):
        started = time.perf_counter()
        response = _post(server, "tiny_queue", body)
        return response.status_code, response.headers.get("retry-after"), time.perf_counter() - started

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(12)))
    refused = [r for r in results if r[0] == 503]
    assert len(refused) >= 6 and all(r[1] for r in refused), results
    assert all(r[0] in (200, 503) for r in results)
    # at once: the first refusal comes back before any queued request is answered (each waits its 400 ms delay);
    # relative, not a wall-clock bound, so a busy 2-core machine slowing both does not fail it
    accepted = [r for r in results if r[0] == 200]
    assert accepted and min(r[2] for r in refused) < min(r[2] for r in accepted), results
    assert all(_post(server, "tiny_queue", body).status_code == 200 for _ in range(3))
    counts = metric_samples(server.url, "dlpipe_requests", "tiny_queue")
    assert counts  # outcomes are counted by model


def test_timeout_answers_504_and_the_server_carries_on(server):
    started = time.perf_counter()
    response = _post(server, "slow", _json_request([1, 3, 32, 32]))
    assert response.status_code == 504 and "timeout" in response.json()["error"]
    assert time.perf_counter() - started < 1.5  # answered at the 0.2 s timeout, not after the 2 s delay
    assert _post(server, "shapes", _json_request([1, 3, 32, 32])).status_code == 200


def test_metrics_and_openapi(server, client):
    _infer(client, "shapes", np.zeros((2, 3, 32, 32), np.float32), True)
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    for name in ("dlpipe_requests_total", "dlpipe_queue_duration_seconds_bucket", "dlpipe_compute_duration_seconds",
                 "dlpipe_parse_duration_seconds", "dlpipe_serialize_duration_seconds", "dlpipe_batch_size_bucket",
                 "dlpipe_queue_depth", "dlpipe_requests_in_flight", "dlpipe_inference_rows_total"):
        assert name in text, name
    paths = httpx.get(f"{server.url}/openapi.json", timeout=TIMEOUT).json()["paths"]
    for path in ("/v2", "/v2/health/ready", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer",
                 "/v1/models/{name}/predict", "/metrics"):
        assert path in paths, path


def _pictures(folder: Path) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(2)
    paths = [str(Path(__file__).parent / "data" / "chelsea.jpg")]
    for i, size in enumerate([(32, 32), (50, 70)]):
        path = folder / f"pic{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _predict(server, model, paths, params=None):
    files = [("files", (Path(p).name, Path(p).read_bytes(), "application/octet-stream")) for p in paths]
    return httpx.post(f"{server.url}/v1/models/{model}/predict", files=files, params=params or {}, timeout=TIMEOUT)


def test_task_endpoint_equals_the_cli(server, shapes_onnx, fcn_onnx, tmp_path):
    from dlpipe.apps.classify import classify_images
    from dlpipe.apps.segment import segment_images

    paths = _pictures(tmp_path)
    response = _predict(server, "shapes", paths, {"top_k": 3})
    assert response.status_code == 200, response.text
    cli_rows = classify_images(shapes_onnx, paths, top_k=3, device="cpu")
    served = response.json()["results"]
    assert [{**r, "image": ""} for r in served] == [{**r, "image": ""} for r in cli_rows]
    assert [r["image"] for r in served] == [Path(p).name for p in paths]

    response = _predict(server, "fcn", paths[1:], {"mask": "true"})
    assert response.status_code == 200, response.text
    cli_rows = segment_images(fcn_onnx, paths[1:], tmp_path / "out", device="cpu")
    assert [r["shares"] for r in response.json()["results"]] == [r["shares"] for r in cli_rows]
    assert all(r["mask_png"] for r in response.json()["results"])

    raw = httpx.post(f"{server.url}/v1/models/shapes/predict", content=Path(paths[0]).read_bytes(),
                     headers={"content-type": "image/jpeg"}, timeout=TIMEOUT)
    assert raw.json()["results"][0]["label"] == classify_images(shapes_onnx, paths[:1], device="cpu")[0]["label"]


def test_task_endpoint_errors(server, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = _pictures(tmp_path)[1]
    mixed = _predict(server, "shapes", [good, str(bad)])
    assert mixed.status_code == 200 and "not an image" in mixed.json()["results"][1]["error"]
    assert "upload-" not in mixed.json()["results"][1]["error"]  # named by the client's file name
    only_bad = _predict(server, "shapes", [str(bad)])
    assert only_bad.status_code == 400 and "bad.png" in only_bad.json()["error"]
    assert _predict(server, "shapes", [good], {"top_k": "0"}).status_code == 400
    wrong_type = httpx.post(f"{server.url}/v1/models/shapes/predict", json={"a": 1}, timeout=TIMEOUT)
    assert wrong_type.status_code == 415
    assert _predict(server, "nope", [good]).status_code == 404
    assert _predict(server, "shapes", [good]).status_code == 200
