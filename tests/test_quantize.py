"""fp16 and int8 variants: structure (node counts) and numbers (agreement with fp32 on real images)."""

import numpy as np
import onnx
import pytest

from dlpipe.export.quantize import QuantizationConfig, QuantizationError, load_images_for, quantize
from dlpipe.runtime import Engine, load
from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.training.data import load_split


def _ops(path):
    model = onnx.load(str(path))
    return [n.op_type for n in model.graph.node], model


@pytest.fixture(scope="module")
def variants(mnist_onnx, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    made = {}
    for name, cfg in {"fp16": QuantizationConfig("fp16"), "int8": QuantizationConfig("int8", calibration_size=128),
                      "int8-dynamic": QuantizationConfig("int8", method="dynamic")}.items():
        made[name] = quantize(mnist_onnx, out / f"{name}.onnx", cfg, data_dir=data_dir, check_size=256)
    return made


def test_fp16_structure(variants):
    ops, model = _ops(variants["fp16"].path)
    assert ops.count("Cast") == 2  # float32 in, float32 out, float16 inside
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    init_types = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in init_types and onnx.TensorProto.FLOAT not in init_types


def test_int8_static_structure(variants):
    ops, model = _ops(variants["int8"].path)
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    # per-channel: C3's weight scale has one entry per output channel
    scales = [t for t in model.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1 and t.dims[0] == 16]
    assert scales, "expected a per-channel weight scale of length 16 (LeNet-5's C3)"
    # the 1-channel stem convolution stays in float32 and the report says so
    assert ops.count("Conv") == 3 and len(variants["int8"].kept_fp32) == 1
    conv_inputs = [n.input[0] for n in model.graph.node if n.op_type == "Conv"]
    assert conv_inputs[0] == "image"  # C1 reads the float input directly
    assert {"ConvInteger", "MatMulInteger"} & set(_ops(variants["int8-dynamic"].path)[0])


def test_variants_agree_with_fp32_on_real_test_images(variants, mnist_onnx, data_dir):
    images, labels = load_split("mnist", "test", data_dir, limit=1000)
    fp32 = load(mnist_onnx).logits(images).argmax(1)
    for name, report in variants.items():
        pred = load(report.path).logits(images).argmax(1)
        agreement = (pred == fp32).mean()
        assert agreement >= (0.995 if name == "fp16" else 0.97), (name, agreement)
        assert abs((pred == labels).mean() - (fp32 == labels).mean()) < 0.02
        assert report.agreement >= 0.97


def test_metadata_records_what_was_done(variants):
    for name, report in variants.items():
        info = Engine(report.path, device="cpu").info
        assert info.precision == ("fp16" if name == "fp16" else "int8")
        q = info.raw["quantization"]
        assert q["source"] == "lenet5.onnx"
        if name == "int8":
            assert q["method"] == "static" and q["calibration"]["images"] == 128
        assert info.labels == tuple(str(i) for i in range(10))


def test_quantized_files_are_smaller(variants):
    assert variants["int8"].size_bytes < 0.4 * variants["int8"].fp32_size_bytes
    assert variants["fp16"].size_bytes < 0.6 * variants["fp16"].fp32_size_bytes


def test_config_is_validated():
    with pytest.raises(InputError, match="unknown precision"):
        QuantizationConfig("int4")
    with pytest.raises(InputError, match="unknown int8 method"):
        QuantizationConfig("int8", method="magic")
    with pytest.raises(InputError):
        QuantizationConfig("int8", calibration_size=0)


def test_calibration_from_an_image_folder(mnist_onnx, data_dir, tmp_path):
    from PIL import Image

    images, _ = load_split("mnist", "train", data_dir, limit=40)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
    info = Engine(mnist_onnx, device="cpu").info
    arr = load_images_for(info, str(folder), "train", 16)
    assert arr.shape == (16, 1, 28, 28) and arr.dtype == np.float32
    report = quantize(mnist_onnx, tmp_path / "q.onnx", QuantizationConfig("int8", calibration_size=32, min_agreement=0.9),
                      calibration=str(folder))
    assert report.check_images == 8  # the folder's images not used for calibration


def test_bad_inputs(mnist_onnx, variants, tmp_path):
    with pytest.raises(ModelFileError, match="already a fp16 model"):
        quantize(variants["fp16"].path, tmp_path / "x.onnx", QuantizationConfig("int8"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no PNG/JPEG"):
        quantize(mnist_onnx, tmp_path / "x.onnx", QuantizationConfig("int8"), calibration=str(tmp_path / "empty"))
    with pytest.raises(InputError, match="does not exist"):
        quantize(mnist_onnx, tmp_path / "x.onnx", QuantizationConfig("int8"), calibration=str(tmp_path / "nope.d/x"))
    assert not (tmp_path / "x.onnx").exists()


def test_disagreement_fails_and_writes_nothing(mnist_onnx, data_dir, tmp_path):
    # Calibrating on blank inputs collapses every activation range, so int8 predictions become
    # constant; the agreement check on real test digits must refuse the result.
    np.save(tmp_path / "blank.npy", np.zeros((16, 1, 28, 28), np.float32))
    cfg = QuantizationConfig("int8", calibration_size=16, per_channel=False)
    with pytest.raises(QuantizationError, match="agrees with fp32 on only"):
        quantize(mnist_onnx, tmp_path / "q.onnx", cfg, calibration=str(tmp_path / "blank.npy"), check="mnist",
                 data_dir=data_dir)
    assert not (tmp_path / "q.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["blank.npy"]
