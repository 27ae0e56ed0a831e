"""Fuzzing (issue 12): whatever a user feeds dlpipe, the only exceptions that escape are dlpipe's own
(:class:`~dlpipe.runtime.errors.DlpipeError`), naming the file, and nothing is written on failure.

Each target in ``TARGETS`` is a hypothesis strategy and a check: random bytes, truncations and bit flips of
PNG/JPEG/GIF/BMP/TIFF files; every PIL mode at any size; random arrays of any shape and dtype into
``Engine.run`` and every predictor; damaged ONNX files and checkpoints; random and malformed metadata and
package manifests. Here each runs a bounded, seeded number of examples (a few hundred in all);
``bench/fuzz.py`` runs the same targets for longer and counts the inputs.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dlpipe.runtime import DlpipeError, Engine, InputError, ModelFileError, load, read_metadata
from dlpipe.runtime.captioner import Captioner
from dlpipe.runtime.images import open_image
from dlpipe.runtime.metadata import ModelInfo
from dlpipe.runtime.policy import Policy

WEIGHTS_ONLY_ADVICE = "weights_only"  # torch's "re-run with weights_only=False" must never reach the user
OUTCOMES: Counter[str] = Counter()  # calls checked by expect(): "ok" or the dlpipe error's type (bench/fuzz.py)


# The tiny models of every task (the captioner is a package folder), by name in the models' folder.
MODEL_FILES = {"classifier": "classifier.onnx", "segmenter": "segmenter.onnx", "detector": "detector.onnx",
               "captioner": "captioner", "policy": "policy.onnx", "checkpoint": "policy.pt"}


@dataclass
class FuzzModels:
    """Tiny exported models of every task, and a folder for the fuzzed files."""

    folder: Path
    files: dict[str, Path]
    _loaded: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def at(cls, folder: Path) -> "FuzzModels":
        """The models :func:`build_models` made in ``folder``."""
        return cls(folder / "fuzzed", {name: folder / file for name, file in MODEL_FILES.items()})

    def predictor(self, name: str):
        """The loaded predictor of ``name`` (loaded once)."""
        if name not in self._loaded:
            self._loaded[name] = load(self.files[name], device="cpu", threads=1)
        return self._loaded[name]


def build_models(folder: Path) -> FuzzModels:
    """Train each task's smallest model for one short epoch (seconds in all) and export it."""
    import torch

    from dlpipe.export.onnx_export import export_checkpoint
    from dlpipe.training.dqn import untrained_checkpoint
    from dlpipe.training.train import TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, model, dataset in [("classifier", "dmlp", "shapes"), ("segmenter", "fcn32s", "shapes-scenes"),
                                     ("detector", "rcnn", "shapes-boxes"),
                                     ("captioner", "captioner", "shapes-captions")]:
            result = train(TrainConfig(model=model, dataset=dataset, out=str(folder / f"train_{name}"), epochs=1,
                                       limit=60, test_limit=8, threads=1, progress=False))
            export_checkpoint(result["best"], folder / MODEL_FILES[name])
        untrained_checkpoint(folder / MODEL_FILES["checkpoint"], "dqn-cartpole", "CartPole-v1")
        export_checkpoint(folder / MODEL_FILES["checkpoint"], folder / MODEL_FILES["policy"])
    finally:
        torch.set_num_threads(threads)
    (folder / "fuzzed").mkdir()
    return FuzzModels.at(folder)


def expect(call: Callable[[], Any], *names: object) -> Any:
    """``call()``'s result, or None when it raised a dlpipe error that names one of ``names``.

    Any other exception escapes, and hypothesis reports (and shrinks) the input that raised it.
    """
    try:
        result = call()
    except DlpipeError as exc:
        OUTCOMES[type(exc).__name__] += 1
        message = str(exc)
        assert not names or any(str(n) in message for n in names), f"the error names none of {names}: {message}"
        assert WEIGHTS_ONLY_ADVICE not in message, message
        return None
    OUTCOMES["ok"] += 1
    return result


def mutations() -> st.SearchStrategy:
    """How to damage a file, independent of its length: random bytes (after its magic number or not),
    a truncation, bit flips (mostly in the first or last 4 kB: headers, and the graph's metadata at the end
    of an ONNX file), or bytes overwritten."""
    position = st.one_of(st.integers(0, 4095), st.integers(-4096 * 8, -1), st.integers(0, 2**31))
    return st.one_of(
        st.tuples(st.just("random"), st.binary(max_size=600)),
        st.tuples(st.just("magic"), st.binary(max_size=600)),
        st.tuples(st.just("truncate"), st.integers(0, 2**31)),
        st.tuples(st.just("flip"), st.lists(position, min_size=1, max_size=8)),
        st.tuples(st.just("overwrite"), position, st.binary(min_size=1, max_size=8)),
    )


def mutate(data: bytes, mutation: tuple) -> bytes:
    """``data`` damaged as ``mutation`` (from :func:`mutations`) says."""
    kind, *args = mutation
    if kind == "random":
        return args[0]
    if kind == "magic":
        return data[:8] + args[0]
    if kind == "truncate":
        return data[:args[0] % len(data)]
    out = bytearray(data)
    if kind == "flip":
        for bit in args[0]:
            bit %= 8 * len(out)
            out[bit // 8] ^= 1 << (bit % 8)
    else:  # overwrite
        start = args[0] % len(out)
        out[start:start + len(args[1])] = args[1]
    return bytes(out)


def _picture(mode: str = "RGB", size: tuple[int, int] = (40, 24), seed: int = 0) -> Image.Image:
    """A random picture in any PIL mode (wide value ranges for the 16-bit, integer and float modes)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-2**31, 2**31 - 1, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray((rng.standard_normal((h, w)) * 1e4).astype(np.float32))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


# Valid files to damage: each format, some in several flavours (palette, 16 bits, progressive, animated,
# compressed TIFF), made by PIL.
SEED_FILES: dict[str, tuple[str, str, dict]] = {
    "png": ("RGB", "PNG", {}), "png-palette": ("P", "PNG", {}), "png-16bit": ("I;16", "PNG", {}),
    "png-rgba": ("RGBA", "PNG", {}), "jpeg": ("RGB", "JPEG", {}), "jpeg-cmyk": ("CMYK", "JPEG", {}),
    "jpeg-progressive": ("RGB", "JPEG", {"progressive": True}), "gif": ("P", "GIF", {}),
    "gif-animated": ("P", "GIF", {"save_all": True}), "bmp": ("RGB", "BMP", {}), "bmp-1bit": ("1", "BMP", {}),
    "tiff": ("RGB", "TIFF", {}), "tiff-lzw": ("RGB", "TIFF", {"compression": "tiff_lzw"}),
    "tiff-deflate": ("LA", "TIFF", {"compression": "tiff_adobe_deflate"}), "tiff-float": ("F", "TIFF", {}),
    "tiff-packbits": ("CMYK", "TIFF", {"compression": "packbits"}),
}
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
# Which formats PIL writes each mode in (as a file, the mode may come back as another one).
MODE_FORMATS = {"1": ("PNG", "BMP", "TIFF"), "L": ("PNG", "JPEG", "BMP", "TIFF"), "LA": ("PNG", "TIFF"),
                "P": ("PNG", "GIF", "TIFF"), "PA": ("TIFF",), "RGB": ("PNG", "JPEG", "GIF", "BMP", "TIFF"),
                "RGBA": ("PNG", "TIFF"), "CMYK": ("JPEG", "TIFF"), "YCbCr": ("JPEG", "TIFF"), "I": ("TIFF",),
                "I;16": ("PNG", "TIFF"), "F": ("TIFF",)}
MODES = tuple(MODE_FORMATS)
IMAGE_PREDICTORS = ("classifier", "segmenter", "detector", "captioner")
# The segmenter and detector run on images up to this many pixels (a decoded 8000x8000 would take minutes
# through the network); the classifier and captioner resize everything to their small input.
SMALL_IMAGE = 512 * 512


@cache
def seed_file(name: str) -> bytes:
    """The valid file ``name`` of :data:`SEED_FILES`."""
    mode, fmt, options = SEED_FILES[name]
    buffer = io.BytesIO()
    picture = _picture(mode)
    if options.get("save_all"):
        options = {**options, "append_images": [_picture(mode, seed=1)]}
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _predict_image(models: FuzzModels, name: str, image: Any, *files: object) -> Any:
    """``name``'s predictions for ``image``, or None for a dlpipe error naming one of ``files`` or the model
    (an image the graph cannot take, e.g. one so elongated that the detector resizes it to no rows)."""
    predictor = models.predictor(name)
    names = (*files, models.files[name]) if files else ()
    if name == "captioner":
        return expect(lambda: predictor.predict(image, beam=2, max_len=3), *names)
    return expect(lambda: predictor.predict(image), *names)


def check_image_file(models: FuzzModels, example: tuple) -> None:
    """A damaged image file opens or gives InputError naming it; so does predicting on it."""
    seed, mutation, predictor = example
    path = models.folder / f"fuzzed{EXTENSIONS[SEED_FILES[seed][1]]}"
    path.write_bytes(mutate(seed_file(seed), mutation))
    image = expect(lambda: open_image(path), path)
    if image is None or (predictor in ("segmenter", "detector") and image.width * image.height > SMALL_IMAGE):
        return
    _predict_image(models, predictor, path, path)


image_files = st.tuples(st.sampled_from(sorted(SEED_FILES)), mutations(), st.sampled_from(IMAGE_PREDICTORS))


def check_image_mode(models: FuzzModels, example: tuple) -> None:
    """Every PIL mode at any size, as a PIL image or saved in each format that takes it, predicts or gives
    a dlpipe error."""
    mode, size, seed, fmt, predictor = example
    picture = _picture(mode, size, seed)
    fmt = MODE_FORMATS[mode][fmt % len(MODE_FORMATS[mode])] if fmt is not None else None
    if fmt is None:
        _predict_image(models, predictor, picture)
        return
    path = models.folder / f"mode{EXTENSIONS[fmt]}"
    try:
        picture.save(path, format=fmt)
    except (OSError, ValueError):  # a mode and size this format cannot hold (a GIF wider than 65535)
        return
    _predict_image(models, predictor, path, path)


image_modes = st.tuples(st.sampled_from(MODES),
                        st.one_of(st.sampled_from([(1, 1), (2, 1), (1, 3)]),
                                  st.tuples(st.integers(1, 96), st.integers(1, 96))),
                        st.integers(0, 2**16), st.one_of(st.none(), st.integers(0, 4)),
                        st.sampled_from(IMAGE_PREDICTORS))


DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "int64", "uint64", "float16", "float32",
          "float64", "complex64", "datetime64[s]", "U3", "object")
SPECIALS = (None, "nan", "inf", "-inf", "huge", "tiny")


def make_array(shape: tuple[int, ...], dtype: str, seed: int, special: str | None) -> np.ndarray:
    """An array of any dtype, random values in a wide range, some NaN/inf/huge when ``special`` says."""
    if dtype == "object":
        return np.full(shape, None, dtype=object)
    if dtype == "U3":
        return np.full(shape, "ab", dtype="U3")
    if dtype.startswith("datetime"):
        return np.zeros(shape, dtype=dtype)
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) * 300
    if special and values.size:
        values.flat[rng.integers(0, values.size)] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 1e300,
                                                     "tiny": 1e-300}[special]
    with np.errstate(all="ignore"):
        return values.astype(dtype)


def shapes(rank_max: int = 5) -> st.SearchStrategy:
    """Array shapes: mostly small sides, some 0 and 1, and a few long ones."""
    side = st.one_of(st.integers(0, 6), st.integers(7, 70), st.sampled_from([1000, 4096]))
    return st.lists(side, max_size=rank_max).map(tuple).filter(lambda s: int(np.prod(s)) <= 2**20)


arrays = st.builds(make_array, shapes(), st.sampled_from(DTYPES), st.integers(0, 2**16), st.sampled_from(SPECIALS))
# Arrays near an engine's contract: (sizes by axis, None keeping the contract's, a symbolic one as 2; dtype,
# None: the engine's; seed; special values).
near_contract = st.tuples(st.lists(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 80)), max_size=5),
                          st.one_of(st.none(), st.sampled_from(DTYPES[:12])), st.integers(0, 2**16),
                          st.sampled_from(SPECIALS))
ENGINES = ("classifier", "segmenter", "detector", "policy", "encoder", "decoder")


def _engine(models: FuzzModels, name: str) -> Engine:
    if name in ("encoder", "decoder"):
        return getattr(models.predictor("captioner"), name)
    return models.predictor(name).engine


def _near(engine: Engine, spec: tuple, index: int) -> np.ndarray:
    """An array for input ``index`` of ``engine`` whose shape follows the contract where ``spec`` says None."""
    sizes, dtype, seed, special = spec
    contract = engine.inputs[index].shape
    shape = [sizes[i] if i < len(sizes) and sizes[i] is not None else d if isinstance(d, int) else 2
             for i, d in enumerate(contract)]
    shape += [s for s in sizes[len(contract):] if s is not None]  # more axes than the contract has
    dtype = engine.input_dtype(index).name if dtype is None else dtype
    return make_array(tuple(shape), dtype, seed, special)


junk = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=20), st.binary(max_size=20),
                 st.lists(st.integers(), max_size=3), st.lists(st.lists(st.floats(), max_size=3), max_size=3),
                 st.dictionaries(st.integers(), st.integers(), max_size=2))


def check_engine_run(models: FuzzModels, example: tuple) -> None:
    """``Engine.run`` on any feeds (arrays of any shape and dtype, wrong names, not arrays at all, unknown
    outputs) runs or gives InputError naming the model."""
    name, kind, specs, extra, outputs = example
    engine = _engine(models, name)
    if kind == "array":
        feeds = _near(engine, specs[0], 0)
    elif kind == "random-array":
        feeds = extra
    elif kind == "junk":
        feeds = {engine.input_names[0]: extra} if specs[0][2] % 2 else extra
    else:  # a dict with the right names, maybe one more or one renamed
        feeds = {n: _near(engine, specs[i % len(specs)], i) for i, n in enumerate(engine.input_names)}
        if kind == "dict+":
            feeds["extra" if specs[0][2] % 2 else engine.input_names[0] + "_"] = _near(engine, specs[0], 0)
    wanted = None if outputs is None else [engine.output_names[i] if i < len(engine.output_names) else f"out{i}"
                                           for i in outputs]
    expect(lambda: engine.run(feeds, wanted), engine.path)


engine_feeds = st.tuples(st.sampled_from(ENGINES), st.sampled_from(["array", "random-array", "junk", "dict", "dict+"]),
                         st.lists(near_contract, min_size=1, max_size=3),
                         st.one_of(arrays, junk), st.one_of(st.none(), st.lists(st.integers(0, 3), max_size=3)))


def check_predictor_arrays(models: FuzzModels, example: tuple) -> None:
    """Every predictor on arrays of any shape and dtype, lists of them, and things that are not images,
    with any option values, predicts or gives a dlpipe error."""
    name, images, option = example
    predictor = models.predictor(name)
    if name == "classifier":
        expect(lambda: predictor.predict(images, top_k=option, batch_size=option))
    elif name == "segmenter":
        expect(lambda: predictor.predict(images))
    elif name == "detector":
        expect(lambda: predictor.predict(images, threshold=option / 4))
    elif name == "captioner":
        expect(lambda: predictor.predict(images, beam=option, max_len=min(option, 4), batch_size=option,
                                         length_penalty=option / 2))
    else:
        expect(lambda: predictor.predict(images, epsilon=option / 4, rng=np.random.default_rng(0)))
        expect(lambda: predictor.q_values(images))
        expect(lambda: predictor.act(images))


def _predictor_inputs() -> st.SearchStrategy:
    side = st.integers(1, 96)
    image_shapes = st.one_of(shapes(4), st.tuples(side, side), st.tuples(side, side, st.sampled_from([1, 3, 4])),
                             st.tuples(st.integers(0, 3), side, side, st.sampled_from([1, 3])),
                             st.tuples(st.integers(0, 3), st.just(4)), st.just((4,)),  # CartPole observations
                             st.sampled_from([(1, 100000), (100000, 1, 3), (1, 1, 3), (24, 3, 4)]))
    dtypes = st.one_of(st.sampled_from(["uint8", "float32", "uint16"]), st.sampled_from(DTYPES))
    image_arrays = st.builds(make_array, image_shapes, dtypes, st.integers(0, 2**16), st.sampled_from(SPECIALS))
    return st.one_of(image_arrays, st.lists(image_arrays, max_size=3), junk,
                     st.lists(st.one_of(image_arrays, junk), min_size=1, max_size=3))


predictor_arrays = st.tuples(st.sampled_from(IMAGE_PREDICTORS + ("policy",)), _predictor_inputs(),
                             st.one_of(st.integers(1, 4), st.integers(-2, 5)))  # top_k, beam, batch size, ...


def check_onnx_file(models: FuzzModels, example: tuple) -> None:
    """A damaged ONNX file loads or gives ModelFileError naming it; one that loads runs or gives InputError."""
    mutation, batch = example
    path = models.folder / "fuzzed.onnx"
    path.write_bytes(mutate(models.files["policy"].read_bytes(), mutation))
    expect(lambda: read_metadata(path), path)
    policy = expect(lambda: load(path, device="cpu", threads=1), path)
    if policy is not None and isinstance(policy, Policy):
        expect(lambda: policy.predict(np.zeros((batch, *policy.observation_shape), np.float32)), path)


onnx_files = st.tuples(mutations(), st.integers(1, 3))


def check_checkpoint_file(models: FuzzModels, mutation: tuple) -> None:
    """A damaged checkpoint loads or gives ModelFileError naming it (never torch's weights_only advice);
    one that loads rebuilds its model or gives ModelFileError."""
    from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint

    path = models.folder / "fuzzed.pt"
    path.write_bytes(mutate(models.files["checkpoint"].read_bytes(), mutation))
    ckpt = expect(lambda: load_checkpoint(path), path)
    if ckpt is not None:
        expect(lambda: model_from_checkpoint(ckpt, source=path), path)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4),
                           max_leaves=10)
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)  # ONNX strings are UTF-8


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON document (the document itself first)."""
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += _paths(value, (*prefix, i))
    return found


def edit_document(doc: Any, edit: tuple) -> str:
    """``doc`` with one edit (``edit`` from :data:`document_edits`), as the text a file would hold."""
    kind, where, value = edit
    if kind == "text":
        return value
    if kind == "nested":
        return "[" * where + "]" * (where % 3)
    if kind == "truncate":
        text = json.dumps(doc)
        return text[:where % (len(text) + 1)]
    doc = json.loads(json.dumps(doc))
    path = _paths(doc)[where % len(_paths(doc))]
    if not path:
        return json.dumps(value)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return json.dumps(doc)


document_edits = st.one_of(st.tuples(st.sampled_from(["replace", "replace", "delete"]), st.integers(0, 2**16),
                                     json_values),
                           st.tuples(st.just("truncate"), st.integers(0, 2**16), st.none()),
                           st.tuples(st.just("text"), st.none(), _text),
                           st.tuples(st.just("nested"), st.sampled_from([10, 5000, 200000]), st.none()))
METADATA_MODELS = ("classifier", "segmenter", "policy")


@cache
def _onnx_model(path: Path):
    import onnx  # the tests may use onnx; the runtime never does

    return onnx.load(str(path))


def check_metadata(models: FuzzModels, example: tuple) -> None:
    """Malformed metadata gives ModelFileError naming the file, from the parser and from ``load``; metadata
    that loads predicts or gives a dlpipe error."""
    name, edit = example
    model = _onnx_model(models.files[name])
    prop = next(p for p in model.metadata_props if p.key == "dlpipe")
    text = edit_document(json.loads(prop.value), edit)
    expect(lambda: ModelInfo.from_json(text, "'m.onnx'"), "'m.onnx'")
    original, prop.value = prop.value, text
    try:
        path = models.folder / "metadata.onnx"
        path.write_bytes(model.SerializeToString())
    finally:
        prop.value = original
    predictor = expect(lambda: load(path, device="cpu", threads=1), path)
    if predictor is None:
        return
    if isinstance(predictor, Policy):
        expect(lambda: predictor.predict(np.zeros((2, 4), np.float32)))
    else:
        expect(lambda: predictor.predict(_picture("RGB", (20, 12)).convert("RGB")))


metadata_docs = st.tuples(st.sampled_from(METADATA_MODELS), document_edits)


def check_manifest(models: FuzzModels, edit: tuple) -> None:
    """A malformed captioner manifest gives ModelFileError naming it; one that loads captions or gives a
    dlpipe error."""
    package = models.folder / "package"
    if not package.is_dir():
        shutil.copytree(models.files["captioner"], package)
        (package / "original.json").write_text((package / "manifest.json").read_text())
    text = edit_document(json.loads((package / "original.json").read_text()), edit)
    (package / "manifest.json").write_text(text)
    captioner = expect(lambda: Captioner(package, device="cpu", threads=1), package)
    if captioner is not None:
        expect(lambda: captioner.predict(np.zeros((20, 12, 3), np.uint8), beam=2, max_len=3), package)


@dataclass(frozen=True)
class Target:
    """One thing to fuzz: a strategy, the check of each example, and how many examples the suite runs."""

    strategy: st.SearchStrategy
    check: Callable[[FuzzModels, Any], None]
    examples: int


TARGETS: dict[str, Target] = {
    "image_file": Target(image_files, check_image_file, 80),
    "image_mode": Target(image_modes, check_image_mode, 40),
    "engine_run": Target(engine_feeds, check_engine_run, 60),
    "predictor_arrays": Target(predictor_arrays, check_predictor_arrays, 60),
    "onnx_file": Target(onnx_files, check_onnx_file, 30),
    "checkpoint_file": Target(mutations(), check_checkpoint_file, 40),
    "metadata": Target(metadata_docs, check_metadata, 30),
    "manifest": Target(document_edits, check_manifest, 25),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> FuzzModels:
    return build_models(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("name", list(TARGETS))
def test_only_dlpipe_errors_escape(models, name):
    target = TARGETS[name]

    @settings(max_examples=target.examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(target.strategy)
    def fuzz(example):
        target.check(models, example)

    fuzz()


@pytest.mark.parametrize("size", [(1, 1), (1, 100000), (100000, 1)])
@pytest.mark.parametrize("predictor", IMAGE_PREDICTORS)
def test_extreme_sizes(models, predictor, size):
    path = models.folder / f"extreme_{predictor}.png"
    _picture("RGB", size).save(path)
    _predict_image(models, predictor, path, path)


def test_every_mode_in_every_format_it_saves_in(models):
    for mode, formats in MODE_FORMATS.items():
        for fmt in formats:
            path = models.folder / f"every_{mode.replace(';', '_')}{EXTENSIONS[fmt]}"
            _picture(mode, (30, 20)).save(path, format=fmt)
            assert expect(lambda: open_image(path), path) is not None, (mode, fmt)
            for predictor in IMAGE_PREDICTORS:
                _predict_image(models, predictor, path, path)


def _failing_image(models: FuzzModels, mutation: tuple) -> Path:
    path = models.folder / "bad.png"
    path.write_bytes(mutate(seed_file("png"), mutation))
    return path


@pytest.mark.parametrize("app", ["segment", "detect"])
def test_nothing_is_written_for_a_failing_image(models, app, tmp_path_factory):
    """A damaged image after a good one: when the command stops (``fail_fast``) the output folder stays
    empty; when it goes on, nothing is written for the damaged image (and no temporary file is left)."""
    import inspect

    from dlpipe.apps.detect import detect_images
    from dlpipe.apps.segment import segment_images

    run = segment_images if app == "segment" else detect_images
    modes = [{"fail_fast": True}, {}] if "fail_fast" in inspect.signature(run).parameters else [{}]
    model = models.files["segmenter" if app == "segment" else "detector"]
    good = models.folder / "good.png"
    _picture("RGB", (48, 40)).save(good)
    out = tmp_path_factory.mktemp(f"{app}_out") / "out"

    @settings(max_examples=12, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(mutations())
    def fuzz(mutation):
        bad = _failing_image(models, mutation)
        for options in modes:
            rows = expect(lambda: run(model, [str(good), str(bad)], out, device="cpu", **options), bad)
            written = sorted(f.name for f in out.iterdir()) if out.exists() else []
            shutil.rmtree(out, ignore_errors=True)
            assert not [name for name in written if name.endswith(".tmp")], written
            if rows is None:
                assert not written, (options, written)
            elif any("error" in row for row in rows):
                assert not [name for name in written if name.startswith("bad")], (options, written)

    fuzz()


def test_a_decoded_bomb_is_an_input_error(tmp_path):
    """A PNG declaring 20000x20000 pixels (400 MB decoded, 400 kB on disk)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(20000, 20000))
    with pytest.raises(InputError, match="bomb.png"):
        open_image(path)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid grayscale PNG of zeros, compressed a row at a time."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte, then the pixels
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.mark.parametrize("content", ["pickle", "text", "onnx", "random", "empty", "list"])
def test_a_file_that_is_not_a_checkpoint_says_so(models, tmp_path, content):
    """Never torch's advice to load it with ``weights_only=False`` (that would run code from the file)."""
    import argparse

    import torch

    from dlpipe.training.checkpoint import load_checkpoint

    path = tmp_path / "model.pt"
    if content == "pickle":  # a checkpoint holding an object that weights_only refuses
        torch.save({"format": "dlpipe.checkpoint", "args": argparse.Namespace(lr=0.1)}, path)
    elif content == "text":
        path.write_text("not a checkpoint\n")
    elif content == "onnx":
        path.write_bytes(models.files["policy"].read_bytes())
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif content == "empty":
        path.write_bytes(b"")
    else:  # a plain pickle of a list
        path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ModelFileError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert f"'{path}' is not a dlpipe checkpoint" in message
    assert "weights_only" not in message and "\x1b[" not in message and "\n" not in message


# Each escape the fuzzing found, as its minimal input, so that it stays fixed without the luck of the draw.
def test_engine_run_found_by_fuzzing(models):
    engine = models.predictor("classifier").engine
    image = np.zeros((1, 3, 32, 32), np.float32)
    for feeds in (None, "image", [image], {0: image}):  # were TypeError / AttributeError
        with pytest.raises(InputError, match=str(engine.path)):
            engine.run(feeds)
    with pytest.raises(InputError, match="has outputs"):
        engine.run(image, ["probabilities"])
    detector = models.predictor("detector").engine
    with pytest.raises(InputError, match=r"detector.onnx' cannot run on inputs of shape \{'image': \[3, 1, 100000\]"):
        detector.run(np.zeros((3, 1, 100000), np.float32))  # was onnxruntime's Fail (a resize to no rows)


def test_ragged_observations_found_by_fuzzing(models):
    policy = models.predictor("policy")
    for call in (policy.predict, policy.q_values, policy.act):  # were numpy's ValueError
        with pytest.raises(InputError, match="must be numeric arrays"):
            call([[0.0, 0.0, 0.0, 0.0], [0.0]])


def _with_metadata(models: FuzzModels, name: str, change: Callable[[dict], None]) -> Path:
    model = _onnx_model(models.files[name])
    prop = next(p for p in model.metadata_props if p.key == "dlpipe")
    doc, original = json.loads(prop.value), prop.value
    change(doc)
    prop.value = json.dumps(doc)
    path = models.folder / f"edited_{name}.onnx"
    try:
        path.write_bytes(model.SerializeToString())
    finally:
        prop.value = original
    return path


@pytest.mark.parametrize("name,change,match", [
    ("classifier", lambda d: d["preprocessing"].update(mean=[0.5, 0.5]), "mean must be"),  # was a broadcast error
    ("classifier", lambda d: d["preprocessing"].update(std=[1e400]), "std must be"),
    ("segmenter", lambda d: d["preprocessing"].update(size_multiple=0), "size_multiple"),  # was ZeroDivisionError
    ("classifier", lambda d: d["preprocessing"].update(size=[0, 32]), "size must be"),
    ("classifier", lambda d: d["preprocessing"].update(scale=10**400), "OverflowError"),
    ("classifier", lambda d: d["preprocessing"].update(color="CMYK"), "color must be"),
    ("policy", lambda d: d["environment"].update(action_names=5), "does not describe its environment"),  # TypeError
    ("policy", lambda d: d["environment"].update(num_actions=0), "does not describe its environment"),
])
def test_metadata_found_by_fuzzing(models, name, change, match):
    path = _with_metadata(models, name, change)
    with pytest.raises(ModelFileError, match=match) as caught:
        load(path, device="cpu")
    assert str(path) in str(caught.value)


def test_metadata_that_is_not_utf8_found_by_fuzzing(models):
    """A flipped high bit in the metadata at the end of an ONNX file (found by atheris): was UnicodeDecodeError
    from onnxruntime's ``custom_metadata_map``."""
    path = _with_metadata(models, "policy", lambda d: d.update(model="MARK"))
    data = path.read_bytes()
    assert data.count(b'"MARK"') == 1
    path.write_bytes(data.replace(b'"MARK"', b'"\xff\xfe\xfd\xfc"'))
    for call in (lambda: load(path, device="cpu"), lambda: Engine(path, device="cpu"), lambda: read_metadata(path)):
        with pytest.raises(ModelFileError, match="metadata that is not UTF-8"):
            call()


def test_deeply_nested_metadata_found_by_fuzzing():
    with pytest.raises(ModelFileError, match="'m.onnx': malformed dlpipe metadata .RecursionError"):
        ModelInfo.from_json("[" * 100_000, "'m.onnx'")


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(vocabulary=[None, []]), "'vocabulary' must be a list of words"),  # was TypeError
    (lambda d: d.update(vocabulary=d["vocabulary"][4:]), "a vocabulary must start with"),  # did not name the file
    (lambda d: d["graphs"].update(encoder=None), "'graphs' must name"),  # was TypeError on folder / None
    (lambda d: d["graphs"].update(decoder="encoder.onnx"), "is not a decoder step"),
    (lambda d: d["decoding"].update(length_penalty=None), "malformed 'decoding'"),  # was TypeError in predict
    (lambda d: d["decoding"].update(length_penalty=647), "malformed 'decoding'"),  # was OverflowError in predict
    (lambda d: d.update(decoding=[]), "malformed 'decoding'"),
])
def test_manifest_found_by_fuzzing(models, tmp_path, change, match):
    package = tmp_path / "package"
    shutil.copytree(models.files["captioner"], package)
    doc = json.loads((package / "manifest.json").read_text())
    change(doc)
    (package / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match=match) as caught:
        Captioner(package, device="cpu")
    assert str(package / "manifest.json") in str(caught.value)
    (package / "manifest.json").write_text("[" * 100_000)  # was RecursionError
    with pytest.raises(ModelFileError, match="not a readable JSON manifest"):
        Captioner(package, device="cpu")


def test_a_length_penalty_that_overflows_is_a_usage_error(models):
    from dlpipe.runtime import UsageError

    with pytest.raises(UsageError, match="length penalty"):  # was OverflowError from length ** 647
        models.predictor("captioner").predict(np.zeros((20, 12, 3), np.uint8), beam=2, length_penalty=647)


def test_a_checkpoint_that_does_not_rebuild_its_model_names_the_file(models, tmp_path):
    import torch

    from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(models.files["checkpoint"])
    path = tmp_path / "edited.pt"
    for change in ({"model_args": {"hidden": "wide"}}, {"state_dict": {}}, {"model": "no-such-model"}):
        torch.save({**ckpt, **change}, path)  # was TypeError, RuntimeError, UnknownModelError
        with pytest.raises(ModelFileError, match=f"'{path}'"):
            model_from_checkpoint(load_checkpoint(path), source=path)
