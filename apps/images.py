"""The apps' image batches: read every file (a bad one is reported, the others still processed), name
each output uniquely, and never replace a file that already exists unless asked to."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from dlpipe.runtime.errors import InputError, UsageError
from dlpipe.runtime.images import Failure, open_image


def open_images(paths: list[str], fail_fast: bool = False,
                max_pixels: int | None = None) -> list[Image.Image | Failure]:
    """Decode every image file: its picture, or a :class:`Failure` in its place when it is unreadable
    (``max_pixels``: the decompression-bomb limit, default Pillow's).

    Raises:
        InputError: with ``fail_fast``, at the first unreadable file.
    """
    pictures: list[Image.Image | Failure] = []
    for path in paths:
        try:
            pictures.append(open_image(path, max_pixels))
        except InputError as exc:
            if fail_fast:
                raise
            pictures.append(Failure(str(path), exc))
    return pictures


def predict_readable(predict, pictures: list[Image.Image | Failure], fail_fast: bool) -> list[Any]:
    """``predict(images, errors=...)`` on the readable pictures; failures keep their places."""
    readable = [p for p in pictures if not isinstance(p, Failure)]
    results = iter(predict(readable, errors="raise" if fail_fast else "skip") if readable else [])
    return [p if isinstance(p, Failure) else next(results) for p in pictures]


def failure_row(failure: Failure, path: str) -> dict[str, Any]:
    """A failed image as a result row: the file and the error message (which names the file)."""
    message = failure.message
    if str(path) not in message:  # the runtime saw a decoded picture, known to it only by position
        message = f"'{path}': {message.removeprefix(f'{failure.image}: ')}"
    return {"image": str(path), "error": message}


def unique_stems(paths: list[str]) -> list[str]:
    """An output name per input path: the file's stem, lengthened by its folders where two inputs share a
    stem (``a/horse.png``, ``b/horse.png`` -> ``a_horse``, ``b_horse``), numbered when one file comes twice."""
    stems = [Path(p).stem for p in paths]
    folders = [[part for part in Path(p).parent.parts if part not in ("/", ".", "..")] for p in paths]
    depth = 0
    while len(set(stems)) < len(stems) and depth < max(map(len, folders), default=0):
        depth += 1
        counts = Counter(stems)
        stems = ["_".join([*folders[i][-depth:], Path(p).stem]) if counts[stems[i]] > 1 else stems[i]
                 for i, p in enumerate(paths)]
    seen: Counter[str] = Counter()
    named = []
    for stem in stems:
        seen[stem] += 1
        named.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return named


def output_paths(paths: list[str], out: str | Path, suffixes: tuple[str, ...],
                 overwrite: bool = False) -> list[tuple[Path, ...]]:
    """``out/<unique stem><suffix>`` for every input and suffix, checked before anything is written.

    Raises:
        UsageError: an output file exists already and ``overwrite`` is off.
    """
    out = Path(out)
    targets = [tuple(out / f"{stem}{suffix}" for suffix in suffixes) for stem in unique_stems(paths)]
    if not overwrite:
        existing = [str(t) for group in targets for t in group if t.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise UsageError(f"'{existing[0]}'{more} already exists; pass --overwrite to replace it, or choose "
                             "another --out folder")
    return targets
