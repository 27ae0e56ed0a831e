"""Training and decoding of the Show-and-Tell captioner (issue 4), as plain functions.

* Data: the shapes-world sentences (:mod:`dlpipe.training.captions`, the default), COCO captions
  JSON through ``torchvision.datasets.CocoCaptions`` and Flickr8k through
  ``torchvision.datasets.Flickr8k`` (its HTML annotations) or the usual ``Flickr8k.token.txt``.
* A :class:`~dlpipe.runtime.captioner.Vocabulary` built from the training captions and saved in
  the checkpoint beside the model arguments.
* Teacher-forced cross-entropy with the padding masked out, gradient clipping, a progress bar;
  ``best.pt`` is chosen on validation BLEU-4 (sacrebleu) of greedy captions.
* Greedy decoding (a PyTorch loop) and beam search (the runtime's, over the PyTorch step).

``dlpipe train captioner`` arrives here through the task table (:mod:`dlpipe.training.tasks.captioning`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dlpipe.runtime.captioner import Vocabulary, beam_search
from dlpipe.runtime.errors import DataNotFoundError, InputError, ModelFileError
from dlpipe.training import distributed, plots
from dlpipe.training.loop import Metric, TaskRun, run_supervised, split_indices
from dlpipe.training.precision import Precision

SHAPES_CAPTIONS = "shapes-captions"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@dataclass
class CaptionOptions:
    """Captioner-specific settings on top of :class:`~dlpipe.training.train.TrainConfig`."""

    image_size: int = 48
    """Images are resized to this square size (shapes captions are made at it)."""
    embed_dim: int = 64
    """Word embedding size."""
    hidden: int = 192
    """LSTM hidden size."""
    widths: tuple[int, ...] = (16, 32, 64)
    """Channels of the encoder's ResNet stages (each after the first halves the resolution)."""
    grid: int = 4
    """The encoder's last feature map is average-pooled to grid x grid cells (where things are)."""
    grad_clip: float = 5.0
    """Largest gradient norm; larger gradients are scaled down."""
    min_count: int = 1
    """Words seen fewer times in the training captions become <unk>."""
    beam: int = 3
    """Default beam width stored with the model."""
    length_penalty: float = 0.7
    """Default length-normalisation exponent stored with the model."""
    max_len: int | None = None
    """Most tokens per generated caption; the longest training caption + 2 when None."""


@dataclass
class CaptionData:
    """Images (uint8 NCHW) with one or more reference sentences each."""

    images: torch.Tensor
    references: list[list[str]] = field(default_factory=list)


def preprocessing(image_size: int) -> dict[str, Any]:
    """The runtime preprocessing contract of the captioner's input."""
    return {"color": "RGB", "size": [image_size, image_size], "resize": "bilinear", "scale": 1 / 255,
            "mean": list(MEAN), "std": list(STD), "layout": "NCHW"}


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32, scaled and normalised exactly as the runtime does it."""
    mean = torch.tensor(MEAN).view(1, -1, 1, 1)
    std = torch.tensor(STD).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def _resized(pictures, image_size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(p.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR),
                                dtype=np.uint8) for p in pictures])


def _flickr_tokens(images_dir: Path, token_file: Path) -> list[tuple[Path, list[str]]]:
    """``Flickr8k.token.txt`` lines ``<image>.jpg#<n><TAB><caption>`` (torchvision reads only the HTML form)."""
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(token_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, text = line.partition("\t")
        if not sep or "#" not in key:
            raise InputError(f"'{token_file}' line {number}: expected '<image>#<n><TAB><caption>'")
        captions.setdefault(key.split("#")[0], []).append(text.strip())
    return [(images_dir / name, caps) for name, caps in sorted(captions.items())]


def _real_captions(kind: str, images_dir: Path, annotations: Path, image_size: int,
                   limit: int | None) -> CaptionData:
    from torchvision import datasets as tvd

    from dlpipe.runtime.images import open_image

    if not images_dir.is_dir():
        raise DataNotFoundError(f"{kind} image folder '{images_dir}' does not exist")
    if not annotations.is_file():
        raise DataNotFoundError(f"{kind} annotation file '{annotations}' does not exist")
    pictures, references = [], []
    try:
        if kind == "coco":
            ds = tvd.CocoCaptions(str(images_dir), str(annotations))
        elif annotations.read_text(errors="replace").lstrip().startswith("<"):
            ds = tvd.Flickr8k(str(images_dir), str(annotations))
        else:
            ds = None
            for path, caps in _flickr_tokens(images_dir, annotations)[:limit]:
                pictures.append(open_image(path))
                references.append(caps)
        if ds is not None:
            for i in range(len(ds) if limit is None else min(limit, len(ds))):
                picture, caps = ds[i]
                pictures.append(picture)
                references.append(list(caps))
    except (InputError, DataNotFoundError):
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot read {kind} captions from '{annotations}' with images in '{images_dir}': "
                         f"{first}") from None
    if not pictures:
        raise InputError(f"'{annotations}' holds no captioned images")
    return CaptionData(torch.from_numpy(_resized(pictures, image_size)).permute(0, 3, 1, 2).contiguous(), references)


def load_caption_data(dataset: str, split: str, image_size: int = 48, limit: int | None = None) -> CaptionData:
    """Captioned images of a dataset.

    Args:
        dataset: ``shapes-captions``, ``coco:IMAGES_DIR:CAPTIONS.json`` or ``flickr8k:IMAGES_DIR:TOKENS_FILE``.
        split: ``train`` or ``test`` (real datasets have one file: the split is taken from it later).

    Raises:
        InputError: an unknown dataset or unreadable annotations; DataNotFoundError: missing files.
    """
    if dataset == SHAPES_CAPTIONS:
        from dlpipe.training.captions import load_captions

        images, references = load_captions(split, limit)
        if images.shape[1] != image_size:
            from PIL import Image

            images = _resized([Image.fromarray(a) for a in images], image_size)
        return CaptionData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), references)
    kind, _, rest = dataset.partition(":")
    images_dir, _, annotations = rest.partition(":")
    if kind not in ("coco", "flickr8k") or not images_dir or not annotations:
        raise InputError(f"unknown caption dataset {dataset!r}; use {SHAPES_CAPTIONS}, "
                         "coco:IMAGES_DIR:CAPTIONS.json or flickr8k:IMAGES_DIR:TOKENS_FILE")
    return _real_captions(kind, Path(images_dir), Path(annotations), image_size, limit)


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Token id lists -> an N x T int64 tensor padded with ``pad_id``."""
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), pad_id, dtype=torch.int64)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.int64)
    return out


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the non-padding target tokens (logits N x T x V, targets N x T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id)


def train_one_epoch(model: nn.Module, data: CaptionData, pairs: torch.Tensor, tokens: torch.Tensor,
                    optimizer: torch.optim.Optimizer, batch_size: int, grad_clip: float, pad_id: int,
                    generator: torch.Generator, scheduler=None, progress: tqdm | None = None,
                    precision: Precision | None = None) -> dict[str, float]:
    """One pass over the (image, caption) pairs, teacher-forced; returns mean token loss and pairs/s.
    In a distributed run every rank draws the same permutation and takes its shard of it (equal sizes, so
    every rank takes the same number of steps); ``precision`` autocasts the forward pass and the loss."""
    precision = precision or Precision()
    model.train()
    order = distributed.shard(torch.randperm(len(pairs), generator=generator))
    total, words, start = 0.0, 0, time.perf_counter()
    for first in range(0, len(order), batch_size):
        idx = order[first:first + batch_size]
        seq = tokens[idx]
        seq = seq[:, :int((seq != pad_id).sum(1).max())]  # drop all-padding columns
        with precision.autocast():
            logits = model(normalize(data.images[pairs[idx]]), seq[:, :-1])
            loss = masked_cross_entropy(logits, seq[:, 1:], pad_id)
        precision.step(loss, optimizer, clip=model.parameters(), max_norm=grad_clip)
        if scheduler is not None:
            scheduler.step()
        n = int((seq[:, 1:] != pad_id).sum())
        total += loss.item() * n
        words += n
        if progress is not None:
            progress.update(len(idx))
            progress.set_postfix(loss=f"{total / max(words, 1):.4f}", refresh=False)
    seconds = time.perf_counter() - start
    return {"train_loss": total / max(words, 1), "pairs_per_s": len(order) / seconds, "seconds": seconds}


@torch.no_grad()
def greedy_decode(model: nn.Module, images: torch.Tensor, bos: int, eos: int,
                  max_len: int) -> list[tuple[list[int], float]]:
    """Greedy captions for a normalised image batch, as a PyTorch loop (the eager reference).

    Returns:
        Per image, the token ids (``<eos>`` included when reached) and their summed log-probability.
    """
    model.eval()
    h, c = model.encode(images)
    n = len(images)
    token = torch.full((n,), bos, dtype=torch.int64)
    out, log_prob = [], torch.zeros(n, dtype=torch.float64)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_len):
        lp, h, c = model.step(token, h, c)
        best, token = lp.max(1)
        log_prob += torch.where(done, 0.0, best.double())
        out.append(token)
        done |= token == eos
        if bool(done.all()):
            break
    ids = torch.stack(out, 1).tolist()
    result = []
    for row, lp in zip(ids, log_prob.tolist()):
        end = row.index(eos) + 1 if eos in row else len(row)
        result.append((row[:end], lp))
    return result


@torch.no_grad()
def beam_decode(model: nn.Module, images: torch.Tensor, bos: int, eos: int, max_len: int, beam: int,
                length_penalty: float = 0.0) -> list[tuple[list[int], float]]:
    """Beam search over the PyTorch model (the runtime's search, fed by :meth:`Captioner.step`)."""
    model.eval()

    def step(tokens, h, c):
        lp, h, c = model.step(torch.from_numpy(tokens), torch.from_numpy(h), torch.from_numpy(c))
        return lp.numpy(), h.numpy(), c.numpy()

    h, c = model.encode(images)
    return beam_search(h.numpy(), c.numpy(), step, bos, eos, max_len, beam, length_penalty)


def caption_images(model: nn.Module, images: torch.Tensor, vocabulary: Vocabulary, max_len: int, beam: int = 1,
                   length_penalty: float = 0.0, batch_size: int = 256) -> list[str]:
    """Sentences for uint8 NCHW images (greedy when ``beam`` is 1)."""
    out = []
    for first in range(0, len(images), batch_size):
        x = normalize(images[first:first + batch_size])
        found = (greedy_decode(model, x, vocabulary.bos_id, vocabulary.eos_id, max_len) if beam == 1 else
                 beam_decode(model, x, vocabulary.bos_id, vocabulary.eos_id, max_len, beam, length_penalty))
        out.extend(vocabulary.decode(ids) for ids, _ in found)
    return out


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu, as a fraction) and the exact-match rate against any reference.

    References are lower-cased and stripped of punctuation the way the vocabulary reads sentences.
    """
    import sacrebleu

    refs = [[" ".join(Vocabulary.words(r)) for r in rs] for rs in references]
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), streams)
    exact = float(np.mean([h in r for h, r in zip(hypotheses, refs)]))
    return {"bleu": bleu.score / 100, "exact": exact, "images": len(hypotheses)}


def bleu_by_length(hypotheses: Sequence[str], references: Sequence[Sequence[str]], buckets: int = 5
                   ) -> list[dict[str, Any]]:
    """Corpus BLEU-4 (sacrebleu, by :func:`caption_scores`) per bucket of images grouped by their references'
    length (the mean word count of an image's references, rounded): one bucket per length when there are at
    most ``buckets`` lengths, else ``buckets`` buckets of about equal image counts.

    Returns:
        Per bucket, shortest first: ``words`` (``"7"`` or ``"5-6"``), ``min_words``, ``max_words``, ``images``
        and ``bleu`` (a fraction).
    """
    lengths = np.array([round(float(np.mean([len(Vocabulary.words(r)) for r in rs]))) for rs in references])
    if not len(lengths):
        return []
    distinct = np.unique(lengths)
    if len(distinct) > buckets:  # edges at quantiles of the lengths, so each bucket holds about as many images
        edges = np.unique(np.quantile(lengths, np.linspace(0, 1, buckets + 1)[1:-1], method="higher"))
        groups = np.searchsorted(edges, lengths, side="right")
    else:
        groups = np.searchsorted(distinct, lengths)
    out = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        low, high = int(lengths[idx].min()), int(lengths[idx].max())
        score = caption_scores([hypotheses[i] for i in idx], [references[i] for i in idx])["bleu"]
        out.append({"words": str(low) if low == high else f"{low}-{high}", "min_words": low, "max_words": high,
                    "images": int(len(idx)), "bleu": score})
    return out


def _subset(data: CaptionData, idx: torch.Tensor) -> CaptionData:
    return CaptionData(data.images[idx], [data.references[i] for i in idx.tolist()])


def prepare(cfg, spec, options: CaptionOptions | None = None) -> TaskRun:
    """The captioned images split, the vocabulary of the training sentences and the (image, sentence)
    pairs; validation and test score greedy BLEU-4 (and the test beam search too)."""
    opts = options or CaptionOptions()
    if cfg.augment != "none":
        raise InputError("augmentation is not supported for captioning (flips would swap 'left of')")
    data = load_caption_data(cfg.dataset, "train", opts.image_size, cfg.limit)
    train_idx, val_idx = split_indices(len(data.images), cfg.val_fraction, cfg.seed)
    train, val = _subset(data, train_idx), _subset(data, val_idx)
    vocabulary = Vocabulary.build((s for refs in train.references for s in refs), opts.min_count)
    pairs_list, sequences = [], []
    for i, refs in enumerate(train.references):
        for sentence in refs:
            pairs_list.append(i)
            sequences.append(vocabulary.encode(sentence))
    pairs, tokens = torch.as_tensor(pairs_list), pad_sequences(sequences, vocabulary.pad_id)
    max_len = opts.max_len or min(tokens.shape[1] + 1, 64)  # <bos> is not generated; room for one more word
    generator = torch.Generator().manual_seed(cfg.seed)
    precision = Precision(cfg.amp)
    # batches are drawn by train_one_epoch from a seeded permutation (this rank's shard of it in a
    # distributed run); the loader only counts them
    batches = DataLoader(range(distributed.local_count(len(pairs))), batch_size=cfg.batch_size, shuffle=True,
                         generator=generator)

    def test(model: nn.Module) -> dict[str, Any]:
        # real caption files have one split: the validation part stands in for the test set
        held = load_caption_data(cfg.dataset, "test", opts.image_size, cfg.test_limit) \
            if cfg.dataset == SHAPES_CAPTIONS else val
        greedy = caption_scores(caption_images(model, held.images, vocabulary, max_len), held.references)
        beam = caption_scores(caption_images(model, held.images, vocabulary, max_len, opts.beam, opts.length_penalty),
                              held.references)
        return {**greedy, **{f"beam_{k}": v for k, v in beam.items()}, "beam": opts.beam}

    n_examples = min(max(cfg.examples, 4), len(val.images))
    return TaskRun(
        model_args={"in_channels": 3, "image_size": [opts.image_size] * 2, "vocab_size": len(vocabulary),
                    "embed_dim": opts.embed_dim, "hidden": opts.hidden, "widths": list(opts.widths),
                    "grid": opts.grid, "pad_id": vocabulary.pad_id},
        train_loader=batches, images_per_epoch=len(pairs),
        train_epoch=lambda model, opt, sched, bar: train_one_epoch(model, train, pairs, tokens, opt, cfg.batch_size,
                                                                   opts.grad_clip, vocabulary.pad_id, generator,
                                                                   sched, bar, precision),
        validate=lambda model: caption_scores(caption_images(model, val.images, vocabulary, max_len), val.references),
        test=test, examples=normalize(val.images[:n_examples]),
        preview=lambda model, path: plots.annotated(
            val.images[:4].numpy(), caption_images(model, val.images[:4], vocabulary, max_len), path),
        dataset={"name": cfg.dataset, "labels": [], "preprocessing": preprocessing(opts.image_size)},
        extra={"vocabulary": list(vocabulary.tokens),
               "decoding": {"beam": opts.beam, "max_len": max_len, "length_penalty": opts.length_penalty},
               "example_tokens": pad_sequences([vocabulary.encode(r[0]) for r in val.references[:n_examples]],
                                               vocabulary.pad_id)},
        config={"caption_options": asdict(opts)})


def train_captioner(cfg, options: CaptionOptions | None = None) -> dict[str, Any]:
    """Train the captioner described by a :class:`~dlpipe.training.loop.TrainConfig` (and ``options``) on
    the shared loop: ``best.pt`` on validation BLEU-4, ``last.pt`` and ``metrics.jsonl``.

    Returns:
        Paths, the best validation BLEU-4, test BLEU-4 and exact-match rate (greedy, and ``test_beam_*`` with
        beam search), the history and the training time.
    """
    return run_supervised(cfg, functools.partial(prepare, options=options), METRIC, "captioning")


METRIC = Metric("bleu", "BLEU-4", (("bleu", "val BLEU-4"), ("exact", "exact")))


def model_and_vocabulary(ckpt: dict[str, Any]) -> tuple[nn.Module, Vocabulary]:
    """The captioner of a loaded checkpoint (eval mode) and its vocabulary."""
    from dlpipe.training.checkpoint import model_from_checkpoint

    if ckpt.get("task") != "captioning" or "vocabulary" not in ckpt:
        raise ModelFileError(f"the checkpoint holds a {ckpt.get('model')!r} model, not a captioner")
    return model_from_checkpoint(ckpt), Vocabulary(tuple(ckpt["vocabulary"]))


def evaluate_captioner(captioner, dataset: str | None = None, split: str = "test", limit: int | None = None,
                       beam: int | None = None) -> dict[str, Any]:
    """BLEU-4 and exact-match rate of a runtime :class:`~dlpipe.runtime.captioner.Captioner` (any
    variant) on a caption dataset, decoded with the package's default beam width unless given."""
    dataset = dataset or captioner.manifest.get("dataset") or SHAPES_CAPTIONS
    size = captioner.info.preprocessing.size[0]
    data = load_caption_data(dataset, split, size, limit)
    width = int(captioner.decoding.get("beam", 1) if beam is None else beam)
    start = time.perf_counter()
    found = captioner.predict(data.images.permute(0, 2, 3, 1).numpy(), beam=width)
    seconds = time.perf_counter() - start
    scores = caption_scores([c.sentence for c in found], data.references)
    return {"model": str(captioner.path), "precision": captioner.precision, "dataset": dataset, "split": split,
            "images": scores["images"], "accuracy": scores["exact"], "bleu": scores["bleu"],
            "exact": scores["exact"], "beam": width, "seconds": seconds, "labels": [],
            "bleu_by_length": bleu_by_length([c.sentence for c in found], data.references),
            "providers": captioner.encoder.providers}
