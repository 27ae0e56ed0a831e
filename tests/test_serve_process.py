"""``dlpipe serve`` and ``dlpipe export-repo`` as processes and files (issue 13), on tiny ONNX graphs built
with onnx.helper (no training, so these run in seconds): the server imports no torch, shuts down
gracefully on SIGTERM with requests in flight, passes schemathesis against its own OpenAPI document, and
the repository writer's config.pbtxt parses with Triton's model-config schema and matches the ONNX file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dlpipe.apps.serve.run import start_server

TIMEOUT = 20.0
DLPIPE = [sys.executable, "-m", "dlpipe.apps.cli"]


def _linear(path: Path, batch: str | int = "batch") -> str:
    """``y = x @ W`` (W fixed, 4 -> 3) with a dynamic (or fixed) first axis."""
    weight = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def linear(tmp_path_factory) -> str:
    return _linear(tmp_path_factory.mktemp("serve_models") / "linear.onnx")


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    return start_server([*args, "--device", "cpu"])


def _body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def test_server_imports_no_torch(linear):
    """Importing the server, loading a repository and answering a request leaves torch and onnx unimported."""
    code = f"""
import sys
from starlette.testclient import TestClient
from dlpipe.apps.serve import Repository, ModelSettings, create_app
app = create_app(Repository.open([{linear!r}], ModelSettings(device="cpu")))
with TestClient(app) as client:
    body = {{"inputs": [{{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 0, 0, 0]}}]}}
    answer = client.post("/v2/models/linear/infer", json=body).json()
    assert answer["outputs"][0]["data"] == [0.0, 1.0, 2.0], answer
heavy = sorted(m for m in ("torch", "torchvision", "onnx") if m in sys.modules)
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def test_graceful_shutdown_answers_requests_in_flight(linear):
    """SIGTERM while 6 requests wait in the queue (a 1.5 s batching delay): every one gets its answer, new
    connections are refused afterwards, and the process exits 0."""
    proc, url = _start([linear, "--no-idle-run", "--max-queue-delay-ms", "1500", "--no-access-log"])
    try:
        def call(i):
            x = np.full((1, 4), float(i), np.float32)
            return httpx.post(f"{url}/v2/models/linear/infer", json=_body(x), timeout=TIMEOUT)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(call, i) for i in range(6)]
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result(timeout=TIMEOUT) for f in futures]
        assert [a.status_code for a in answers] == [200] * 6
        for i, a in enumerate(answers):
            assert a.json()["outputs"][0]["data"] == (np.full((1, 4), float(i)) @ np.arange(12).reshape(4, 3)).ravel().tolist()
        assert proc.wait(timeout=15) == 0
        assert "stopped" in proc.stdout.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/v2/health/live", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_schemathesis_finds_no_server_errors(linear, tmp_path):
    """schemathesis against the served /openapi.json (bounded and seeded): no 5xx, responses as documented."""
    proc, url = _start([linear, "--no-access-log"])
    try:
        out = subprocess.run([str(Path(sys.executable).parent / "st"), "run", f"{url}/openapi.json",
                              "--max-examples", "15", "--seed", "1", "--request-timeout", "10",
                              "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
                              "--workers", "1"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-3000:]
        assert httpx.get(f"{url}/v2/health/live", timeout=TIMEOUT).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)


def test_export_repo_writes_configs_triton_parses(tmp_path, linear):
    """config.pbtxt parses with Triton's own model-config schema and agrees with the ONNX file; a model with
    a fixed first axis gets max_batch_size 0 and no dynamic batching; dlpipe serve reads the folder."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    fixed = _linear(tmp_path / "fixed.onnx", batch=2)
    out = subprocess.run([*DLPIPE, "export-repo", linear, fixed, "--out", str(tmp_path / "repo"),
                          "--max-batch-size", "16", "--instances", "2", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [r["max_batch_size"] for r in json.loads(out.stdout)] == [16, 0]
    for name, batch in (("linear", 16), ("fixed", 0)):
        config = text_format.Parse((tmp_path / "repo" / name / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        graph = onnx.load(tmp_path / "repo" / name / "1" / "model.onnx").graph
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == batch and config.HasField("dynamic_batching") == (batch > 0)
        assert config.instance_group[0].count == 2
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
            assert [t.name for t in declared] == [t.name for t in actual]
            for t, v in zip(declared, actual):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                assert list(t.dims) == (dims[1:] if batch else dims)
                assert t.data_type == model_config_pb2.TYPE_FP32
    again = subprocess.run([*DLPIPE, "export-repo", linear, "--out", str(tmp_path / "repo")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already exists" in again.stderr
    proc, url = _start([str(tmp_path / "repo"), "--no-access-log"])
    try:
        meta = httpx.get(f"{url}/v2/models/fixed", timeout=TIMEOUT).json()
        assert meta["inputs"][0]["shape"] == [2, 4]
        x = np.ones((2, 4), np.float32)
        answer = httpx.post(f"{url}/v2/models/fixed/infer", json=_body(x), timeout=TIMEOUT).json()
        assert answer["outputs"][0]["shape"] == [2, 3]
        # the served configuration, read by Triton's own client, is the message config.pbtxt holds
        import tritonclient.http as triton
        from google.protobuf import json_format

        client = triton.InferenceServerClient(url.removeprefix("http://"))
        for name in ("linear", "fixed"):
            served = json_format.ParseDict(client.get_model_config(name), model_config_pb2.ModelConfig())
            assert served == text_format.Parse((tmp_path / "repo" / name / "config.pbtxt").read_text(),
                                               model_config_pb2.ModelConfig())
        assert httpx.get(f"{url}/v2/models/nope/config", timeout=TIMEOUT).status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)


def test_compressed_bodies_both_ways_and_a_gzip_bomb_is_refused(linear):
    """tritonclient with gzip/deflate request and gzip response compression gets the right tensor back; a body
    that inflates past the limit is 413 (it is never inflated whole), bad data 400, an unknown encoding 415."""
    import gzip
    import zlib

    import tritonclient.http as triton

    proc, url = _start([linear, "--no-access-log", "--max-body-mb", "1"])
    try:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
        for request_algorithm in ("gzip", "deflate"):
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=False)
            result = client.infer("linear", [tensor], request_compression_algorithm=request_algorithm,
                                  response_compression_algorithm="gzip")
            np.testing.assert_allclose(result.as_numpy("y"), x @ np.arange(12, dtype=np.float32).reshape(4, 3),
                                       rtol=1e-5)
        answer = httpx.post(f"{url}/v2/models/linear/infer", json=_body(x), headers={"accept-encoding": "gzip"},
                            timeout=TIMEOUT)
        assert answer.headers.get("content-encoding") == "gzip" and answer.json()["outputs"][0]["shape"] == [64, 3]
        infer = f"{url}/v2/models/linear/infer"
        bomb = gzip.compress(b" " * (64 * 2**20))  # 64 MiB of spaces in about 64 KiB
        assert len(bomb) < 2**20
        for body, encoding, status in ((bomb, "gzip", 413), (b"not gzip at all", "gzip", 400),
                                       (zlib.compress(b"{}")[:-3], "deflate", 400), (b"{}", "br", 415)):
            r = httpx.post(infer, content=body, headers={"content-encoding": encoding,
                                                         "content-type": "application/json"}, timeout=TIMEOUT)
            assert r.status_code == status and r.json()["error"], (encoding, r.status_code, r.text)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)


def test_access_log_lines_and_clients_that_disconnect_mid_request(linear):
    """One JSON access-log line per request with its method, path and status; clients that hang up halfway
    through sending a body, or while their request waits in the batch queue, leave the server answering."""
    import socket

    proc, url = _start([linear, "--no-idle-run", "--max-queue-delay-ms", "300"])
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(_body(np.ones((1, 4), np.float32))).encode()
    try:
        assert httpx.get(f"{url}/v2/health/live", timeout=TIMEOUT).status_code == 200
        assert httpx.post(f"{url}/v2/models/nope/infer", json={}, timeout=TIMEOUT).status_code == 404
        head = (f"POST /v2/models/linear/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        for sent in (head + body[:10], head + body):  # half a body; a whole one, then gone before the answer
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(sent)
                time.sleep(0.05)
        time.sleep(0.5)  # the abandoned request's batch runs
        answer = httpx.post(f"{url}/v2/models/linear/infer", json=_body(np.ones((1, 4), np.float32)), timeout=TIMEOUT)
        assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [18.0, 22.0, 26.0]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    seen = [(r["method"], r["path"], r["status"]) for r in lines]
    assert ("GET", "/v2/health/live", 200) in seen and ("POST", "/v2/models/nope/infer", 404) in seen
    assert seen.count(("POST", "/v2/models/linear/infer", 200)) >= 1
    assert all(r["ms"] >= 0 and r["client"].startswith("127.0.0.1:") for r in lines)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
