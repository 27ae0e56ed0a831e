"""The torch-free runtime: engine and providers, predictors on every kind of input, and bad inputs."""

import json
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
from PIL import Image

from dlpipe.runtime import (Classifier, DeviceUnavailableError, Engine, InputError, ModelFileError, load,
                            read_metadata)
from dlpipe.runtime.benchmark import measure_interleaved, random_input
from dlpipe.training.data import load_split


def test_runtime_never_imports_torch_torchvision_or_onnx(shapes_onnx, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(image)
    code = f"""
import sys, json
from dlpipe.runtime import load
from dlpipe.runtime.benchmark import measure_interleaved
clf = load({shapes_onnx!r})
res = clf.predict([{str(image)!r}])
print(json.dumps({{"label": res[0].label, "loaded": [m for m in ("torch", "torchvision", "onnx") if m in sys.modules]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["label"] in ("circle", "square", "triangle", "diamond", "star", "cross")


def test_engine_reports_the_providers_in_use(shapes_onnx):
    engine = Engine(shapes_onnx, device="cpu")
    assert engine.providers == ["CPUExecutionProvider"] and engine.device == "cpu"
    auto = Engine(shapes_onnx, device="auto")
    assert auto.device in ("cpu", "cuda") and auto.providers[0] in ("CPUExecutionProvider", "CUDAExecutionProvider")


def test_cuda_that_cannot_run_is_an_error_not_a_fallback(shapes_onnx, capfd):
    auto = Engine(shapes_onnx, device="auto")
    if auto.device == "cuda":
        pytest.skip("this machine really has a usable CUDA provider")
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        Engine(shapes_onnx, device="cuda")
    err = capfd.readouterr().err
    assert "Failed to load" not in err and "EP Error" not in err  # no onnxruntime error spam


def test_session_options(shapes_onnx):
    e = Engine(shapes_onnx, device="cpu", threads=1, graph_optimization="basic")
    assert e.run(random_input(e, 2))[0].shape == (2, 6)
    with pytest.raises(InputError, match="graph optimization"):
        Engine(shapes_onnx, graph_optimization="max")
    with pytest.raises(InputError, match="unknown device"):
        Engine(shapes_onnx, device="tpu")


def test_a_server_session_does_not_spin(shapes_onnx):
    """The server's sessions (spinning=False) let idle threads sleep; the answers are the same."""
    spinning, sleeping = Engine(shapes_onnx, device="cpu"), Engine(shapes_onnx, device="cpu", spinning=False)
    options = sleeping.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    x = random_input(spinning, 3)
    np.testing.assert_array_equal(spinning.run(x)[0], sleeping.run(x)[0])


def test_load_returns_a_classifier_with_metadata(shapes_onnx):
    clf = load(shapes_onnx)
    assert isinstance(clf, Classifier) and clf.info.preprocessing.size == (32, 32)
    assert clf.info.labels[0] == "circle"


def test_predict_accepts_paths_pil_and_arrays_of_any_size_and_mode(shapes_onnx, tmp_path):
    clf = load(shapes_onnx)
    rgb = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    paths = []
    for mode, ext in [("RGB", "png"), ("L", "jpg"), ("RGBA", "png"), ("P", "png")]:
        p = tmp_path / f"img_{mode}.{ext}"
        Image.fromarray(rgb).convert(mode).save(p)
        paths.append(p)
    items = [*paths, str(paths[0]), Image.fromarray(rgb), rgb, rgb[..., 0], rgb.astype(np.float32) / 255]
    results = clf.predict(items, top_k=3)
    assert len(results) == len(items)
    for r in results:
        assert len(r.top_k) == 3 and r.top_k[0][0] == r.label
        assert 0 < r.score <= 1 and r.top_k[0][1] >= r.top_k[1][1] >= r.top_k[2][1]
    # the same picture as a file and as a PIL image gives the same answer
    assert results[0].top_k == results[5].top_k


def test_batched_predict_equals_one_by_one(shapes_onnx):
    images, _ = load_split("shapes", "test", limit=10)
    # The CPU provider: on a GPU, TF32 convolutions (onnxruntime's default) differ by ~1e-3 between batch
    # compositions (bench/results/gpu.json); tests/test_cuda.py checks the GPU with its own tolerance.
    clf = load(shapes_onnx, device="cpu")
    batch = clf.logits(images, batch_size=4)
    single = np.concatenate([clf.logits(img) for img in images])
    np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-5)


def test_predict_from_several_threads(shapes_onnx):
    images, _ = load_split("shapes", "test", limit=32)
    clf = load(shapes_onnx, device="cpu")  # exact equality, as above
    expected = clf.logits(images)
    results, errors = {}, []

    def work(i):
        try:
            results[i] = clf.logits(images[i::4])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        np.testing.assert_allclose(results[i], expected[i::4], rtol=1e-5, atol=1e-5)


def test_mnist_accuracy_through_the_runtime(mnist_onnx, data_dir):
    images, labels = load_split("mnist", "test", data_dir, limit=500)
    pred = np.array([r.index for r in load(mnist_onnx).predict(images)])
    assert (pred == labels).mean() > 0.85


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.png", "does not exist"),
    (lambda d: (d / "notes.png").write_text("hello") and d / "notes.png", "not an image file"),
    (lambda d: d, "is a folder"),
])
def test_bad_image_files(shapes_onnx, tmp_path, make, match):
    with pytest.raises(InputError, match=match):
        load(shapes_onnx).predict([make(tmp_path)])


def test_truncated_image(shapes_onnx, tmp_path):
    p = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(InputError, match=r"cut.png' is a truncated or damaged image"):
        load(shapes_onnx).predict(p)


@pytest.mark.parametrize("array,match", [
    (np.zeros((4, 4, 4, 4, 4), np.uint8), "image arrays must be"),
    (np.zeros((10, 10, 2), np.uint8), "image arrays must be"),
    (np.zeros((10, 10), np.complex64), "must be uint8"),
    (np.full((10, 10), np.nan, np.float32), "NaN"),
])
def test_bad_arrays(shapes_onnx, array, match):
    with pytest.raises(InputError, match=match):
        load(shapes_onnx).predict([array])


def test_engine_checks_raw_inputs(shapes_onnx):
    e = Engine(shapes_onnx, device="cpu")
    with pytest.raises(InputError, match="must be a float32 array"):
        e.run(np.zeros((1, 3, 32, 32), np.float64))
    with pytest.raises(InputError, match=r"must have shape \['batch', 3, 32, 32\]"):
        e.run(np.zeros((1, 3, 28, 28), np.float32))
    with pytest.raises(InputError, match="expects inputs"):
        e.run({"x": np.zeros((1, 3, 32, 32), np.float32)})


def test_io_binding_gives_run_s_outputs_and_can_leave_them_on_the_device(shapes_onnx):
    engine = Engine(shapes_onnx, device="cpu")
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (expected,) = engine.run(x)
    (bound,) = engine.run_bound(x)
    np.testing.assert_allclose(bound, expected, rtol=1e-5, atol=1e-5)
    resident = engine.to_device(x)  # copied once, read by every later call
    for _ in range(2):
        (out,) = engine.run_bound({engine.input_names[0]: resident}, on_device=True)
        assert out.device_name().lower() == engine.device and out.shape() == list(expected.shape)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(engine.run(resident)[0], expected, rtol=1e-5, atol=1e-5)  # run() takes it too
    with pytest.raises(InputError, match="float32"):
        engine.run_bound(engine.to_device(x.astype(np.float64)))
    with pytest.raises(InputError, match="shape"):
        engine.run_bound(engine.to_device(x[:, :1]))
    with pytest.raises(InputError, match="outputs"):
        engine.run_bound(resident, outputs=["nope"])
    with pytest.raises(InputError, match="numpy array"):
        engine.to_device([1, 2, 3])


def test_onnx_without_dlpipe_metadata_runs_raw_but_does_not_load(shapes_onnx, tmp_path):
    model = onnx.load(shapes_onnx)
    del model.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(model, plain)
    with pytest.raises(ModelFileError, match="no dlpipe metadata"):
        load(plain)
    with pytest.raises(ModelFileError, match="no dlpipe metadata"):
        read_metadata(plain)
    assert read_metadata(shapes_onnx).task == "classification"
    engine = Engine(plain, device="cpu")
    assert engine.info is None
    assert engine.run(np.zeros((2, 3, 32, 32), np.float32))[0].shape == (2, 6)


def test_corrupt_and_missing_model_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelFileError, match="not a loadable ONNX model"):
        load(bad)
    with pytest.raises(ModelFileError, match="does not exist"):
        load(tmp_path / "nope.onnx")


def test_malformed_metadata_is_a_clear_error(shapes_onnx, tmp_path):
    model = onnx.load(shapes_onnx)
    for p in model.metadata_props:
        if p.key == "dlpipe":
            p.value = "__import__('os').system('echo pwned')"
    evil = tmp_path / "evil.onnx"
    onnx.save(model, evil)
    with pytest.raises(ModelFileError, match="malformed dlpipe metadata"):
        load(evil)


def test_measure_interleaved_reports_percentiles():
    stats = measure_interleaved({"a": lambda: sum(range(100)), "b": lambda: sum(range(1000))}, batch=4,
                                warmup=2, iters=20)
    assert set(stats) == {"a", "b"}
    for s in stats.values():
        assert s.iters == 20 and 0 < s.p50_ms <= s.p90_ms <= s.p99_ms
        assert s.throughput == pytest.approx(4 / (s.p50_ms / 1000))


class FakeMachine:
    """A clock that only moves when a fake runner runs: each call costs ``cost(name, call)`` ms, where
    ``call`` counts that runner's calls; every call and rest is logged in order (issue 12)."""

    def __init__(self, cost):
        self.now, self.log, self.calls, self.cost = 0.0, [], {}, cost

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.log.append("rest")

    def runner(self, name: str):
        def run():
            self.calls[name] = self.calls.get(name, 0) + 1
            self.now += self.cost(name, self.calls[name]) / 1000
            self.log.append(name)
        return run


def test_measure_interleaved_runs_rounds_round_robin_with_rests():
    m = FakeMachine(lambda name, call: 1.0)
    stats = measure_interleaved({n: m.runner(n) for n in "abc"}, batch=1, warmup=1, iters=4, rounds=2,
                                clock=m.clock, sleep=m.sleep)

    def block(n):  # a rest, the untimed wake-up call, two timed calls
        return ["rest", n, n, n]

    assert m.log == ["a", "b", "c", *block("a"), *block("b"), *block("c"), *block("a"), *block("b"), *block("c")]
    assert all(s.iters == 4 and s.p50_ms == pytest.approx(1.0) and not s.spread_too_wide for s in stats.values())


def test_spread_flags_a_runner_disturbed_by_a_busy_machine():
    from dlpipe.runtime.benchmark import SPREAD_LIMIT

    # "busy" is slowed 20x in every other round (another job came and went); "steady" is not
    m = FakeMachine(lambda name, call: 20.0 if name == "busy" and (call - 1) // 11 % 2 else 1.0 + call % 3 / 100)
    stats = measure_interleaved({"steady": m.runner("steady"), "busy": m.runner("busy")}, batch=1, warmup=0,
                                iters=40, rounds=4, clock=m.clock, sleep=m.sleep)
    assert stats["steady"].spread < 1.1 and not stats["steady"].spread_too_wide
    assert stats["busy"].spread > SPREAD_LIMIT and stats["busy"].spread_too_wide
    assert stats["busy"].as_dict()["spread_too_wide"] is True and stats["busy"].as_dict()["spread"] > SPREAD_LIMIT


def test_a_wide_spread_is_measured_again_and_the_calmer_pass_kept():
    # the other job leaves after the first pass (each runner: 2 rounds of one untimed and two timed calls)
    m = FakeMachine(lambda name, call: (30.0 if call % 2 else 1.0) if call <= 6 else 1.0)
    runners = {n: m.runner(n) for n in ("a", "b")}
    once = measure_interleaved(runners, batch=1, warmup=0, iters=4, rounds=2, clock=m.clock, sleep=m.sleep)
    assert once["a"].spread_too_wide
    m = FakeMachine(lambda name, call: (30.0 if call % 2 else 1.0) if call <= 6 else 1.0)
    runners = {n: m.runner(n) for n in ("a", "b")}
    twice = measure_interleaved(runners, batch=1, warmup=0, iters=4, rounds=2, attempts=3, clock=m.clock,
                                sleep=m.sleep)
    assert m.calls == {"a": 12, "b": 12}  # a second pass of both runners, no third once the spread is narrow
    assert not any(s.spread_too_wide for s in twice.values()) and twice["a"].p50_ms == pytest.approx(1.0)
