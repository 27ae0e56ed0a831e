"""The Show-and-Tell captioner (issue 4): vocabulary, masked loss, training, the two-graph package
(parity of both graphs, runtime decoding equal to PyTorch's, variants), real caption file formats,
``dlpipe caption`` and bad inputs."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dlpipe.apps.cli import cli
from dlpipe.runtime import Captioner, Engine, load
from dlpipe.runtime.captioner import Vocabulary, beam_search, greedy_search
from dlpipe.runtime.errors import InputError, ModelFileError
from dlpipe.training.captioning import (CaptionOptions, beam_decode, greedy_decode, load_caption_data,
                                        masked_cross_entropy, model_and_vocabulary, normalize, pad_sequences,
                                        train_captioner)
from dlpipe.training.captions import TEST_START, caption_scenes, caption_set
from dlpipe.training.checkpoint import load_checkpoint
from dlpipe.training.registry import get_spec
from dlpipe.training.train import TrainConfig

SMALL = CaptionOptions(embed_dim=32, hidden=64, beam=3)


# Seconds of training: every test that uses it is marked slow.
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small captioner trained for 2 epochs on 400 shapes scenes (seconds), and its package."""
    out = tmp_path_factory.mktemp("captioner")
    cfg = TrainConfig(model="captioner", out=str(out / "train"), epochs=2, limit=400, test_limit=40, threads=1,
                      progress=False)
    result = train_captioner(cfg, SMALL)
    from dlpipe.export.onnx_export import export_checkpoint

    report = export_checkpoint(result["best"], out / "pkg")  # dispatches to the package exporter
    return {"result": result, "ckpt": result["best"], "package": out / "pkg", "report": report, "out": out}


@pytest.fixture(scope="module")
def held_out():
    images, sentences = caption_set(48, start=TEST_START)
    return images, sentences


def test_scene_sentences_name_kinds_colours_and_relations():
    images, sentences = caption_set(20)
    assert images.shape == (20, 48, 48, 3) and images.dtype == np.uint8
    indices, many = caption_scenes(1500)
    assert many[:20] == sentences  # deterministic
    words = {w for s in many for w in s.split()}
    assert {"left", "above", "circle", "red", "an", "orange"} <= words
    assert any(s.startswith("two ") for s in many)
    assert 0.3 < np.mean([len(s.split()) > 3 for s in many]) < 0.7  # one- and two-shape sentences alike


def test_vocabulary_round_trip_and_unknown_words():
    v = Vocabulary.build(["A red circle.", "a blue square left of a red circle"])
    assert v.tokens[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")
    ids = v.encode("A red circle left of a blue square!")
    assert ids[0] == v.bos_id and ids[-1] == v.eos_id
    assert v.decode(ids) == "a red circle left of a blue square"
    unknown = v.encode("a purple circle")
    assert unknown[2] == v.unk_id and v.decode(unknown) == "a <unk> circle"
    assert v.decode([v.bos_id, v.index["red"], v.eos_id, v.index["circle"]]) == "red"  # stops at <eos>
    with pytest.raises(ModelFileError):
        Vocabulary(("a", "b"))


def test_masked_loss_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    targets = torch.tensor([[4, 5, 2, 0], [4, 2, 0, 0]])
    loss = masked_cross_entropy(logits, targets, pad_id=0)
    changed = logits.clone()
    changed[targets == 0] = torch.randn(int((targets == 0).sum()), 7) * 10
    assert torch.allclose(loss, masked_cross_entropy(changed, targets, pad_id=0))
    keep = targets != 0
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, manual)


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    images, sentences = caption_set(16)
    v = Vocabulary.build(sentences)
    tokens = pad_sequences([v.encode(s) for s in sentences], v.pad_id)
    model = get_spec("captioner").build(in_channels=3, image_size=[48, 48], vocab_size=len(v), embed_dim=32,
                                        hidden=64)
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = masked_cross_entropy(model(x, tokens[:, :-1]), tokens[:, 1:], v.pad_id)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.slow
def test_checkpoint_holds_model_args_vocabulary_and_decoding(trained):
    ckpt = load_checkpoint(trained["ckpt"])
    assert ckpt["task"] == "captioning" and ckpt["model_args"]["vocab_size"] == len(ckpt["vocabulary"])
    assert ckpt["vocabulary"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert set(ckpt["decoding"]) == {"beam", "max_len", "length_penalty"}
    history = trained["result"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] and 0 <= trained["result"]["test_bleu"] <= 1


@pytest.mark.slow
def test_package_graphs_match_pytorch(trained, held_out):
    report = trained["report"]
    outputs = {p.output for p in report.parity}
    assert outputs == {"h", "c", "log_probs", "h_out", "c_out"}
    assert sorted({p.batch for p in report.parity}) == [1, 16]
    assert all(p.max_abs <= p.atol for p in report.parity)
    manifest = json.loads((trained["package"] / "manifest.json").read_text())
    assert manifest["graphs"] == {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
    assert manifest["special_tokens"]["bos"] == "<bos>" and manifest["decoding"]["beam"] == 3
    # a third batch size, on images the export never saw: encoder, then one decoder step
    model, v = model_and_vocabulary(load_checkpoint(trained["ckpt"]))
    x = normalize(torch.from_numpy(held_out[0][:5]).permute(0, 3, 1, 2))
    encoder = Engine(trained["package"] / "encoder.onnx", device="cpu")
    decoder = Engine(trained["package"] / "decoder.onnx", device="cpu")
    assert encoder.info.raw["part"] == "encoder" and decoder.info.raw["vocabulary"] == list(v.tokens)
    with torch.no_grad():
        h, c = model.encode(x)
        lp, h1, c1 = model.step(torch.full((5,), v.bos_id), h, c)
    got_h, got_c = encoder.run(x.numpy())
    np.testing.assert_allclose(got_h, h.numpy(), atol=1e-4)
    got = decoder.run({"token": np.full(5, v.bos_id, np.int64), "h_in": got_h, "c_in": got_c})
    for a, b in zip(got, (lp, h1, c1)):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4)


@pytest.mark.slow
def test_runtime_greedy_equals_pytorch_greedy(trained, held_out):
    model, v = model_and_vocabulary(load_checkpoint(trained["ckpt"]))
    captioner = load(trained["package"], device="cpu")
    assert isinstance(captioner, Captioner)
    max_len = captioner.decoding["max_len"]
    x = normalize(torch.from_numpy(held_out[0]).permute(0, 3, 1, 2))
    ref = greedy_decode(model, x, v.bos_id, v.eos_id, max_len)
    got = captioner.predict(held_out[0], beam=1, batch_size=16)
    assert [r.tokens for r in got] == [tuple(ids) for ids, _ in ref]
    assert np.allclose([r.log_prob for r in got], [lp for _, lp in ref], atol=1e-3)
    # images of any size and mode go through the package's preprocessing
    big = Image.fromarray(held_out[0][0]).resize((200, 130)).convert("RGBA")
    mixed = captioner.predict([big, held_out[0][1]], beam=2)
    assert len(mixed) == 2 and all(isinstance(r.sentence, str) and r.score <= 0 for r in mixed)


@pytest.mark.slow
def test_beam_width_one_is_greedy(trained, held_out):
    model, v = model_and_vocabulary(load_checkpoint(trained["ckpt"]))
    x = normalize(torch.from_numpy(held_out[0][:24]).permute(0, 3, 1, 2))
    max_len = load_checkpoint(trained["ckpt"])["decoding"]["max_len"]
    greedy = greedy_decode(model, x, v.bos_id, v.eos_id, max_len)
    assert [ids for ids, _ in beam_decode(model, x, v.bos_id, v.eos_id, max_len, beam=1)] == [i for i, _ in greedy]
    captioner = load(trained["package"], device="cpu")
    assert [c.tokens for c in captioner.predict(held_out[0][:24], beam=1)] == \
           [c.tokens for c in captioner.decode(x.numpy(), beam=1, max_len=max_len)]


def test_search_functions_on_a_known_distribution():
    # a toy language model over 7 tokens: <bos> -> a (0.55) | b (0.45); a -> c (0.7) | <eos> (0.3);
    # c -> d; d -> <eos>; b -> <eos>. Greedy says "a c d" (p 0.385); beam 2 ranks "b" (p 0.45) first by
    # raw log-probability, and "a c d" first with full length normalisation.
    table = {1: {3: 0.55, 4: 0.45}, 3: {5: 0.7, 2: 0.3}, 5: {6: 1.0}}

    def step(tokens, h, c):
        lp = np.full((len(tokens), 7), -np.inf, dtype=np.float32)
        for i, t in enumerate(tokens):
            for j, p in table.get(int(t), {2: 1.0}).items():
                lp[i, j] = np.log(p)
        return lp, h, c

    h = c = np.zeros((2, 1), np.float32)
    assert [ids for ids, _ in greedy_search(h, c, step, 1, 2, 6)] == [[3, 5, 6, 2]] * 2
    assert [ids for ids, _ in beam_search(h, c, step, 1, 2, 6, beam=1)] == [[3, 5, 6, 2]] * 2
    found = beam_search(h, c, step, 1, 2, 6, beam=2)
    assert [ids for ids, _ in found] == [[4, 2]] * 2 and np.isclose(found[0][1], np.log(0.45))
    assert [ids for ids, _ in beam_search(h, c, step, 1, 2, 6, beam=2, length_penalty=1.0)] == [[3, 5, 6, 2]] * 2
    assert [ids for ids, _ in beam_search(h, c, step, 1, 2, 2, beam=1)] == [[3, 5]] * 2  # max_len cuts
    assert [ids for ids, _ in greedy_search(h, c, step, 1, 2, 2)] == [[3, 5]] * 2
    with pytest.raises(InputError):
        beam_search(h, c, step, 1, 2, 5, beam=0)


@pytest.mark.slow
def test_variants_and_evaluation(trained):
    from dlpipe.export.quantize import QuantizationConfig, quantize
    from dlpipe.export.evaluate import evaluate_onnx

    pkg = trained["package"]
    fp16 = quantize(pkg / "manifest.json", pkg / "manifest.fp16.json", QuantizationConfig("fp16", min_agreement=0.5),
                    check_size=64)
    int8 = quantize(pkg / "manifest.json", pkg / "manifest.int8.json",
                    QuantizationConfig("int8", calibration_size=32, min_agreement=0.5), check_size=64)
    assert fp16.check_images == 64 and 0.5 <= fp16.agreement <= 1
    assert any(k.startswith("decoder:DynamicQuantizeLSTM") or k.startswith("decoder:MatMulInteger")
               for k in int8.op_counts), int8.op_counts
    assert any(k.startswith("encoder:QuantizeLinear") for k in int8.op_counts), int8.op_counts
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["variants"] == {"fp32": "manifest.json", "fp16": "manifest.fp16.json",
                                    "int8": "manifest.int8.json"}
    reports = [evaluate_onnx(pkg / manifest["variants"][p], limit=40, device="cpu") for p in ("fp32", "fp16", "int8")]
    assert [r["precision"] for r in reports] == ["fp32", "fp16", "int8"]
    assert all(0 <= r["bleu"] <= 1 and r["images"] == 40 for r in reports)
    # the same 40 held-out scenes with the same beam search as training's PyTorch test
    assert abs(reports[0]["bleu"] - trained["result"]["test_beam_bleu"]) < 0.02


def _write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (30 + len(name), 40, 3), dtype=np.uint8)).save(folder / name)


def test_coco_and_flickr8k_caption_files(tmp_path):
    _write_images(tmp_path / "coco", ["1.jpg", "2.png"])
    ann = {"images": [{"id": 1, "file_name": "1.jpg", "height": 35, "width": 40},
                      {"id": 2, "file_name": "2.png", "height": 35, "width": 40}],
           "annotations": [{"id": 10, "image_id": 1, "caption": "A dog runs."},
                           {"id": 11, "image_id": 1, "caption": "A brown dog on grass"},
                           {"id": 12, "image_id": 2, "caption": "Two cats sleep."}]}
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    coco = load_caption_data(f"coco:{tmp_path / 'coco'}:{tmp_path / 'captions.json'}", "train", image_size=32)
    assert coco.images.shape == (2, 3, 32, 32) and coco.images.dtype == torch.uint8
    assert coco.references == [["A dog runs.", "A brown dog on grass"], ["Two cats sleep."]]

    _write_images(tmp_path / "flickr", ["a.jpg", "b.jpg"])
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tA child climbs .\na.jpg#1\tA kid on stairs .\n"
                                                 "b.jpg#0\tA black dog .\n")
    flickr = load_caption_data(f"flickr8k:{tmp_path / 'flickr'}:{tmp_path / 'Flickr8k.token.txt'}", "train")
    assert flickr.images.shape == (2, 3, 48, 48) and flickr.references[1] == ["A black dog ."]

    # and a captioner trains on such files end to end (vocabulary from their sentences)
    cfg = TrainConfig(model="captioner", out=str(tmp_path / "run"), epochs=1, val_fraction=0.5, threads=1,
                      progress=False, dataset=f"coco:{tmp_path / 'coco'}:{tmp_path / 'captions.json'}")
    result = train_captioner(cfg, CaptionOptions(image_size=32, embed_dim=16, hidden=32))
    assert "dog" in load_checkpoint(result["best"])["vocabulary"] or "cats" in load_checkpoint(result["best"])[
        "vocabulary"]

    (tmp_path / "bad.txt").write_text("no tab here\n")
    with pytest.raises(InputError, match="bad.txt' line 1"):
        load_caption_data(f"flickr8k:{tmp_path / 'flickr'}:{tmp_path / 'bad.txt'}", "train")
    with pytest.raises(InputError, match="unknown caption dataset"):
        load_caption_data("imagenet", "train")
    from dlpipe.runtime.errors import DataNotFoundError
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_caption_data(f"coco:{tmp_path / 'nowhere'}:{tmp_path / 'captions.json'}", "train")


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def one_line_error(result, fragment):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("dlpipe: error: ") and fragment in lines[0], result.output


@pytest.mark.slow
def test_caption_app(trained, held_out, tmp_path):
    paths = []
    for i, (size, mode) in enumerate([((48, 48), "RGB"), ((300, 200), "L"), ((64, 96), "RGBA")]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(held_out[0][i]).resize(size).convert(mode).save(path)
        paths.append(path)
    out = json.loads(run("caption", trained["package"], *paths, "--json").stdout)
    assert [r["image"] for r in out] == [str(p) for p in paths]
    assert all(isinstance(r["caption"], str) and r["score"] <= 0 and r["beam"] == 3 for r in out)
    greedy = json.loads(run("caption", trained["package"] / "manifest.json", paths[0], "--beam", "1", "--json").stdout)
    expected = load(trained["package"], device="cpu").predict(str(paths[0]), beam=1)[0].sentence
    assert greedy[0]["caption"] == expected
    assert "caption" in run("caption", trained["package"], paths[0]).stdout


@pytest.mark.slow
def test_bad_inputs(trained, tmp_path):
    pkg = trained["package"]
    (tmp_path / "not.png").write_text("text")
    one_line_error(run("caption", pkg, tmp_path / "not.png", ok=False), "not an image file")
    one_line_error(run("caption", pkg, tmp_path / "missing.png", ok=False), "does not exist")
    one_line_error(run("caption", tmp_path / "nothing", tmp_path / "not.png", ok=False), "does not exist")
    (tmp_path / "broken.json").write_text("{not json")
    one_line_error(run("caption", tmp_path / "broken.json", tmp_path / "not.png", ok=False), "not a readable JSON")
    (tmp_path / "other.json").write_text('{"a": 1}')
    one_line_error(run("caption", tmp_path / "other.json", tmp_path / "not.png", ok=False),
                   "not a dlpipe model package")
    assert run("caption", pkg, tmp_path / "not.png", "--beam", "0", ok=False).exit_code == 2
    with pytest.raises(InputError, match="beam width"):
        load(pkg, device="cpu").predict(np.zeros((48, 48, 3), np.uint8), beam=0)
    with pytest.raises(InputError, match="NaN"):
        load(pkg, device="cpu").predict(np.full((48, 48, 3), np.nan, np.float32))
    with pytest.raises(InputError, match="no images"):
        load(pkg, device="cpu").predict([])
    with pytest.raises(ModelFileError, match="not a captioner"):
        model_and_vocabulary({"model": "lenet5", "task": "classification"})
