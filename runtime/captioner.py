"""Image captioning in the runtime (issue 4): a model package of two ONNX graphs, decoded here.

A captioner package is a folder with a manifest (``manifest.json`` for fp32, ``manifest.fp16.json``,
``manifest.int8.json`` for the variants) naming two graphs: the *encoder* (image -> initial LSTM
state ``h``, ``c``) and one *decoder step* (previous token, ``h_in``, ``c_in`` -> next-token
``log_probs``, ``h_out``, ``c_out``). The manifest also holds the vocabulary, the special tokens,
the preprocessing and the decoding defaults. :class:`Captioner` runs greedy and beam-search decoding
over the two sessions, a batch of images at a time. onnxruntime, numpy and pillow only.

The search functions take any ``step(tokens, h, c) -> (log_probs, h, c)`` over numpy arrays, so
``dlpipe.training.captioning`` runs the very same beam search over the PyTorch model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import InputError, ModelFileError, UsageError
from dlpipe.runtime.images import Failure, ImageLike, guarded, preprocess, split_items
from dlpipe.runtime.metadata import ModelInfo

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
MANIFEST = "manifest.json"
PACKAGE_FORMAT = "dlpipe.package"
Step = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
# Larger exponents overflow length ** penalty (issue 12); useful ones lie around 0.6-1 (GNMT).
MAX_LENGTH_PENALTY = 10.0
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@dataclass(frozen=True)
class Vocabulary:
    """Words by id; ids 0-3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``.

    Sentences are lower-cased and split into words (letters and digits; punctuation dropped).
    """

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if tuple(self.tokens[:4]) != SPECIAL_TOKENS or len(set(self.tokens)) != len(self.tokens):
            raise ModelFileError(f"a vocabulary must start with {', '.join(SPECIAL_TOKENS)} and hold no word twice")

    @classmethod
    def build(cls, sentences: Iterable[str], min_count: int = 1) -> "Vocabulary":
        """The words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts: dict[str, int] = {}
        for sentence in sentences:
            for word in cls.words(sentence):
                counts[word] = counts.get(word, 0) + 1
        words = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS),
                       key=lambda w: (-counts[w], w))
        return cls(SPECIAL_TOKENS + tuple(words))

    @staticmethod
    def words(sentence: str) -> list[str]:
        """``sentence`` as lower-case words, punctuation dropped."""
        return _WORD.findall(sentence.lower())

    @property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.tokens)}

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, sentence: str) -> list[int]:
        """``<bos>`` word ids ``<eos>``; unknown words become ``<unk>``."""
        index = self.index
        return [self.bos_id, *(index.get(w, self.unk_id) for w in self.words(sentence)), self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """The sentence up to the first ``<eos>`` (``<bos>`` and ``<pad>`` skipped)."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return " ".join(words)


@dataclass(frozen=True)
class Caption:
    """One image's caption: the sentence, its length-normalised log-probability (``score``, what beam
    search ranks by), the raw log-probability and the token ids (``<eos>`` included when reached)."""

    sentence: str
    score: float
    log_prob: float
    tokens: tuple[int, ...]


def normalised(log_prob: float, length: int, length_penalty: float) -> float:
    """``log_prob / length ** length_penalty`` (0 ranks by raw log-probability)."""
    return log_prob / max(length, 1) ** length_penalty


def greedy_search(h: np.ndarray, c: np.ndarray, step: Step, bos: int, eos: int,
                  max_len: int) -> list[tuple[list[int], float]]:
    """Batched greedy decoding: the most likely next token each step, until ``<eos>`` or ``max_len``.

    Returns:
        Per image, the token ids (``<eos>`` included when reached) and their summed log-probability.
    """
    n = len(h)
    tokens = np.full(n, bos, dtype=np.int64)
    out = np.full((n, max_len), eos, dtype=np.int64)
    log_prob = np.zeros(n, dtype=np.float64)
    lengths = np.full(n, max_len)
    done = np.zeros(n, dtype=bool)
    for t in range(max_len):
        lp, h, c = step(tokens, h, c)
        tokens = lp.argmax(axis=1)
        log_prob += np.where(done, 0.0, lp[np.arange(n), tokens])
        out[:, t] = tokens
        finished = ~done & (tokens == eos)
        lengths[finished] = t + 1
        done |= finished
        if done.all():
            break
    return [(out[i, :lengths[i]].tolist(), float(log_prob[i])) for i in range(n)]


def beam_search(h: np.ndarray, c: np.ndarray, step: Step, bos: int, eos: int, max_len: int, beam: int,
                length_penalty: float = 0.0) -> list[tuple[list[int], float]]:
    """Batched beam search over ``beam`` hypotheses per image.

    Each step keeps the ``beam`` best unfinished continuations; a hypothesis that ends with ``<eos>``
    among the ``beam`` best candidates is finished. An image is done when it has ``beam`` finished
    hypotheses (with width 1 this is exactly greedy decoding); at ``max_len`` the unfinished ones
    count too. The best by :func:`normalised` score wins.

    Returns:
        Per image, the token ids of the best hypothesis and its summed log-probability.
    """
    if beam < 1:
        raise InputError(f"beam width must be at least 1, got {beam}")
    n = len(h)
    h, c = np.repeat(h, beam, axis=0), np.repeat(c, beam, axis=0)
    tokens = np.full(n * beam, bos, dtype=np.int64)
    scores = np.full((n, beam), -np.inf)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
    history = np.zeros((n, beam, 0), dtype=np.int64)
    finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(n)]
    done = np.zeros(n, dtype=bool)
    rows = np.arange(n)[:, None]
    for t in range(max_len):
        lp, h, c = step(tokens, h, c)
        vocab = lp.shape[1]
        flat = (scores[..., None] + lp.reshape(n, beam, vocab).astype(np.float64)).reshape(n, beam * vocab)
        top = np.argsort(-flat, axis=1, kind="stable")[:, :2 * beam]
        new_scores = np.full((n, beam), -np.inf)
        new_src = np.zeros((n, beam), dtype=np.int64)
        new_tok = np.full((n, beam), eos, dtype=np.int64)
        for i in np.flatnonzero(~done):
            k = 0
            for rank, j in enumerate(top[i]):
                s = flat[i, j]
                if not np.isfinite(s):
                    break
                src, tok = divmod(int(j), vocab)
                if tok == eos:
                    if rank < beam:
                        finished[i].append((normalised(s, t + 1, length_penalty), float(s),
                                            [*history[i, src].tolist(), eos]))
                    continue
                new_scores[i, k], new_src[i, k], new_tok[i, k] = s, src, tok
                k += 1
                if k == beam:
                    break
            done[i] = len(finished[i]) >= beam
        if done.all():
            break
        gather = (rows * beam + new_src).ravel()
        h, c = h[gather], c[gather]
        history = np.concatenate([history[rows, new_src], new_tok[..., None]], axis=2)
        scores, tokens = new_scores, new_tok.ravel()
    else:  # max_len reached: unfinished hypotheses compete too
        for i in np.flatnonzero(~done):
            for k in range(beam):
                if np.isfinite(scores[i, k]):
                    finished[i].append((normalised(scores[i, k], max_len, length_penalty), float(scores[i, k]),
                                        history[i, k].tolist()))
    best = [max(f, key=lambda item: item[0]) for f in finished]
    return [(tokens_, log_prob) for _, log_prob, tokens_ in best]


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    """The manifest file of a package (the folder, or a manifest inside it) and its parsed content.

    Raises:
        ModelFileError: missing folder/manifest, not JSON, or not a dlpipe package manifest.
    """
    path = Path(path)
    manifest = path / MANIFEST if path.is_dir() else path
    if not manifest.is_file():
        raise ModelFileError(f"model package '{path}' does not exist or has no {MANIFEST}")
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise ModelFileError(f"'{manifest}' is not a readable JSON manifest ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != PACKAGE_FORMAT:
        raise ModelFileError(f"'{manifest}' is not a dlpipe model package manifest (no format '{PACKAGE_FORMAT}')")
    for key in ("task", "graphs", "preprocessing"):
        if key not in doc:
            raise ModelFileError(f"'{manifest}': manifest has no '{key}'")
    return manifest, doc


def _decoding(doc: object, manifest: Path) -> dict:
    """The manifest's decoding defaults, checked: ``beam`` and ``max_len`` whole numbers from 1 and
    ``length_penalty`` from 0 to :data:`MAX_LENGTH_PENALTY` (other keys kept as they are).

    Raises:
        ModelFileError: not an object, or a value of the wrong type or out of range (naming ``manifest``).
    """
    try:
        if not isinstance(doc, dict):
            raise TypeError(f"expected an object, got {type(doc).__name__}")
        checked = {"beam": int(doc.get("beam", 3)), "max_len": int(doc.get("max_len", 20)),
                   "length_penalty": float(doc.get("length_penalty", 0.0))}
        if min(checked["beam"], checked["max_len"]) < 1 or not 0 <= checked["length_penalty"] <= MAX_LENGTH_PENALTY:
            raise ValueError(f"beam and max_len must be at least 1, length_penalty from 0 to {MAX_LENGTH_PENALTY:g}")
    except (TypeError, ValueError, OverflowError) as exc:
        raise ModelFileError(f"'{manifest}': malformed 'decoding' ({type(exc).__name__}: {exc})") from None
    return {**doc, **checked}


class Captioner:
    """Captions for images from a captioner package (see the module docstring).

    Args:
        path: The package folder (its fp32 ``manifest.json``) or one variant's manifest file.
        device, threads: As for :class:`~dlpipe.runtime.engine.Engine` (``threads``: the encoder's).
        decoder_threads: Intra-op threads of the decoder step. One by default: the step graph is too
            small for more to pay, and a second session's spinning thread pool would fight the
            encoder's for the cores (measured: greedy at batch 32 on 2 cores took twice as long).
    """

    task = "captioning"

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None,
                 decoder_threads: int | None = 1):
        self.manifest_path, self.manifest = read_manifest(path)
        doc = self.manifest
        if doc["task"] != "captioning":
            raise ModelFileError(f"'{self.manifest_path}' is a {doc['task']!r} package, not a captioner")
        for key in ("vocabulary", "decoding"):  # what a captioner's manifest holds beyond any package's
            if key not in doc:
                raise ModelFileError(f"'{self.manifest_path}': manifest has no '{key}'")
        folder = self.manifest_path.parent
        graphs = doc["graphs"]
        if (not isinstance(graphs, dict) or not {"encoder", "decoder"} <= set(graphs)
                or not all(isinstance(graphs[g], str) for g in ("encoder", "decoder"))):
            raise ModelFileError(f"'{self.manifest_path}': 'graphs' must name an 'encoder' and a 'decoder' file")
        self.encoder = Engine(folder / graphs["encoder"], device=device, threads=threads)
        self.decoder = Engine(folder / graphs["decoder"], device=device, threads=decoder_threads)
        self.engine = self.encoder  # what the other predictors call their engine (providers, path)
        if sorted(self.decoder.input_names) != ["c_in", "h_in", "token"] or len(self.decoder.outputs) != 3:
            raise ModelFileError(f"'{self.manifest_path}': the decoder graph '{graphs['decoder']}' is not a decoder "
                                 "step (token, h_in, c_in -> log_probs, h_out, c_out)")
        self.info = ModelInfo.from_json(json.dumps(doc), f"'{self.manifest_path}'")
        words = doc["vocabulary"]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ModelFileError(f"'{self.manifest_path}': 'vocabulary' must be a list of words")
        try:
            self.vocabulary = Vocabulary(tuple(words))
        except ModelFileError as exc:
            raise ModelFileError(f"'{self.manifest_path}': {exc}") from None
        self.decoding = _decoding(doc["decoding"], self.manifest_path)
        vocab_out = self.decoder.outputs[0].shape[-1]
        if isinstance(vocab_out, int) and vocab_out != len(self.vocabulary):
            raise ModelFileError(f"'{self.manifest_path}': the decoder predicts {vocab_out} tokens, the vocabulary "
                                 f"has {len(self.vocabulary)}")

    @property
    def path(self) -> Path:
        return self.manifest_path

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision", "fp32"))

    def state(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Initial decoder state (``h``, ``c``) for a preprocessed float32 NCHW batch."""
        h, c = self.encoder.run({self.encoder.input_names[0]: batch})
        return h, c

    def step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder step. The session is called directly: the search loop makes these arrays itself,
        so :meth:`Engine.run`'s input checks would only cost time on every token."""
        lp, h, c = self.decoder.session.run(None, {"token": tokens, "h_in": h, "c_in": c})
        return lp, h, c

    def predict(self, images: ImageLike | Iterable[ImageLike], beam: int | None = None, max_len: int | None = None,
                length_penalty: float | None = None, batch_size: int = 32,
                errors: str = "raise") -> list[Caption | Failure]:
        """Caption images (paths, PIL images, HxW[xC] arrays or an NxHxW[xC] batch), ``batch_size`` at a time.

        Args:
            beam: Beam width; 1 is greedy decoding; the package's default when None.
            max_len: Most tokens generated per caption (``<eos>`` included); the package's default when None.
            length_penalty: Exponent of the length normalisation; the package's default when None.
            errors: ``"raise"`` stops at the first unusable image; ``"skip"`` puts a
                :class:`~dlpipe.runtime.images.Failure` in its place and goes on.

        Returns:
            One :class:`Caption` (or :class:`Failure`) per image, in order.
        """
        beam = int(self.decoding.get("beam", 3) if beam is None else beam)
        max_len = int(self.decoding.get("max_len", 20) if max_len is None else max_len)
        alpha = float(self.decoding.get("length_penalty", 0.0) if length_penalty is None else length_penalty)
        if beam < 1 or max_len < 1 or batch_size < 1:
            raise UsageError(f"beam width, maximum length and batch size must be at least 1, got {beam}, {max_len}, "
                             f"{batch_size}")
        if not 0 <= alpha <= MAX_LENGTH_PENALTY:
            raise UsageError(f"the length penalty must be between 0 and {MAX_LENGTH_PENALTY:g}, got {alpha}")
        items = split_items(images)
        if not items:
            raise InputError("no images given")
        chunks = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
        return guarded(chunks, lambda part: self.decode(preprocess(part, self.info.preprocessing), beam, max_len,
                                                        alpha), errors)

    def decode(self, batch: np.ndarray, beam: int = 1, max_len: int = 20,
               length_penalty: float = 0.0) -> list[Caption]:
        """Captions for a preprocessed float32 NCHW batch (greedy when ``beam`` is 1)."""
        h, c = self.state(batch)
        v = self.vocabulary
        if beam == 1:
            found = greedy_search(h, c, self.step, v.bos_id, v.eos_id, max_len)
        else:
            found = beam_search(h, c, self.step, v.bos_id, v.eos_id, max_len, beam, length_penalty)
        return [Caption(v.decode(ids), normalised(lp, len(ids), length_penalty), lp, tuple(ids)) for ids, lp in found]

    def __repr__(self) -> str:
        return f"Captioner('{self.manifest_path}', precision={self.precision}, providers={self.encoder.providers})"


def is_package(path: str | Path) -> bool:
    """Whether ``path`` names a model package (a folder or a ``.json`` manifest) rather than one ONNX file."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() == ".json"


def load_package(path: str | Path, device: str = "auto", threads: int | None = None) -> Captioner:
    """Open a captioner package (:func:`dlpipe.runtime.load` opens any package by its manifest's task)."""
    return Captioner(path, device=device, threads=threads)
