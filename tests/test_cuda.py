"""The CUDA path for real: onnxruntime's CUDA provider, IO binding with tensors left in the GPU's memory,
fp16 and int8 variants on the GPU, and the CLI's ``--device cuda``.

Runs where a GPU, its driver and onnxruntime-gpu's CUDA libraries really work; skipped elsewhere (CI has no
GPU). Every test compares the GPU's answers with the CPU provider's on the same inputs.
"""

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from dlpipe.apps.cli import cli
from dlpipe.runtime import DeviceUnavailableError, Engine, load
from dlpipe.training.data import load_split

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="this onnxruntime build has no CUDA provider")


@pytest.fixture(scope="module")
def gpu(shapes_onnx) -> Engine:
    try:
        return Engine(shapes_onnx, device="cuda")
    except DeviceUnavailableError as exc:
        pytest.skip(f"no usable CUDA provider here: {exc}")


@pytest.fixture(scope="module")
def mnist_test(data_dir):
    images, labels = load_split("mnist", "test", data_dir, limit=2000)
    return np.asarray(images), np.asarray(labels)


def _placement(path, feeds, tmp_path) -> dict[str, set[str]]:
    """Which provider ran each operator type, read from onnxruntime's own profile of one run."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    session.run(None, feeds)
    events = json.loads(open(session.end_profiling()).read())
    placed: dict[str, set[str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            placed.setdefault(args["op_name"], set()).add(args["provider"])
    return placed


def test_cuda_engine_is_on_the_gpu_and_matches_the_cpu_at_two_batch_sizes(gpu, shapes_onnx):
    assert gpu.device == "cuda" and gpu.providers[0] == "CUDAExecutionProvider"
    assert gpu.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "1"  # onnxruntime's default
    exact = Engine(shapes_onnx, device="cuda", tf32=False)
    assert exact.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"
    cpu = Engine(shapes_onnx, device="cpu")
    rng = np.random.default_rng(0)
    for batch in (1, 64):
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        np.testing.assert_allclose(exact.run(x)[0], cpu.run(x)[0], rtol=1e-3, atol=1e-4)  # float32 as on the CPU
        np.testing.assert_allclose(gpu.run(x)[0], cpu.run(x)[0], rtol=0.05, atol=0.05)  # TF32: close, not exact
        assert (gpu.run(x)[0].argmax(1) == cpu.run(x)[0].argmax(1)).mean() >= 0.95


def test_io_binding_keeps_tensors_in_gpu_memory(gpu, shapes_onnx):
    gpu = Engine(shapes_onnx, device="cuda", tf32=False)  # exact float32: compared with the CPU below
    x = np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32)
    (expected,) = Engine(shapes_onnx, device="cpu").run(x)
    resident = gpu.to_device(x)
    assert resident.device_name().lower() == "cuda"
    for _ in range(3):  # the same device buffer, read again by each call
        (out,) = gpu.run_bound(resident, on_device=True)
        assert out.device_name().lower() == "cuda" and out.shape() == list(expected.shape)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gpu.run_bound(x)[0], expected, rtol=1e-3, atol=1e-4)  # numpy in, numpy out


def test_fp16_runs_on_the_gpu_and_agrees_with_fp32(gpu, mnist_onnx, mnist_test, data_dir, tmp_path):
    from dlpipe.export.quantize import QuantizationConfig, quantize

    fp16 = quantize(mnist_onnx, tmp_path / "m.fp16.onnx", QuantizationConfig("fp16"), data_dir=data_dir,
                    check_size=256).path
    images, labels = mnist_test
    reference = load(mnist_onnx, device="cpu").logits(images).argmax(1)
    half = load(fp16, device="cuda")
    assert half.engine.providers[0] == "CUDAExecutionProvider"
    predicted = half.logits(images).argmax(1)
    assert (predicted == reference).mean() >= 0.995
    assert abs((predicted == labels).mean() - (reference == labels).mean()) <= 0.003
    x = np.asarray(half.engine.run(np.zeros((1, 1, 28, 28), np.float32))[0])
    assert x.dtype == np.float32  # float32 in and out, float16 inside
    placed = _placement(fp16, {half.engine.input_names[0]: np.zeros((8, 1, 28, 28), np.float32)}, tmp_path)
    compute = {op: providers for op, providers in placed.items() if op in ("Conv", "Gemm", "MatMul", "FusedConv")}
    assert compute and all(p == {"CUDAExecutionProvider"} for p in compute.values()), placed


def test_int8_runs_on_the_gpu_and_agrees_with_the_cpu(gpu, mnist_onnx, mnist_test, data_dir, tmp_path):
    from dlpipe.export.quantize import QuantizationConfig, quantize

    int8 = quantize(mnist_onnx, tmp_path / "m.int8.onnx", QuantizationConfig("int8", format="qdq-s8s8",
                    calibration_size=128), data_dir=data_dir, check_size=256).path
    images, _ = mnist_test
    on_cpu = load(int8, device="cpu").logits(images).argmax(1)
    from dlpipe.runtime.engine import PrecisionWarning

    with pytest.warns(PrecisionWarning, match="fp16 variant"):  # it runs, as float emulation: the user is told
        on_gpu = load(int8, device="cuda")
    assert on_gpu.engine.providers[0] == "CUDAExecutionProvider"
    assert (on_gpu.logits(images).argmax(1) == on_cpu).mean() >= 0.99


def test_cli_device_cuda(gpu, mnist_onnx, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", mnist_onnx, "--device", "cuda", "--limit", "500", "--json"])
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.output)
    assert report["providers"][0] == "CUDAExecutionProvider" and report["accuracy"] > 0.85
    result = runner.invoke(cli, ["bench", mnist_onnx, "--device", "cuda", "--batch", "1,16", "--iters", "20",
                                 "--warmup", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    rows = rows["results"] if isinstance(rows, dict) else rows
    names = {r["name"] for r in rows}
    assert any("io-binding" in n for n in names) and len(names) == 2
    assert all(r["p50_ms"] > 0 for r in rows)
