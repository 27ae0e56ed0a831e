"""What ``dlpipe predict`` runs over: a folder tree of images, a list file (one path per line) or a Parquet
table with a column of encoded image bytes or of paths, as named inputs, and each input decoded as the other
commands decode a file (:func:`~dlpipe.runtime.images.open_image`, with its pixel limit)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from dlpipe.runtime.errors import InputError, UsageError
from dlpipe.runtime.images import Failure, decode_image, open_image

# Columns tried, in order, when a Parquet input is given without --column.
DEFAULT_COLUMNS = ("image", "bytes", "path")


@dataclass(frozen=True)
class Inputs:
    """Named inputs, in order: ``names`` are unique and identify each input's row in the results; each
    source is a file path or the encoded image bytes."""

    names: list[str]
    sources: Sequence[str | bytes]

    def __len__(self) -> int:
        return len(self.names)

    def select(self, keep: list[int]) -> "Inputs":
        """The inputs at the positions ``keep``."""
        return Inputs([self.names[i] for i in keep], [self.sources[i] for i in keep])


def decode(name: str, source: str | bytes, max_pixels: int | None = None) -> Image.Image | Failure:
    """One input decoded, or a :class:`Failure` naming it when it is unreadable."""
    try:
        if isinstance(source, str):
            return open_image(source, max_pixels)
        return decode_image(source, name, max_pixels)
    except InputError as exc:
        return Failure(name, exc)


def _image_suffixes() -> set[str]:
    Image.init()
    return {suffix.lower() for suffix in Image.registered_extensions()}


def _folder(root: Path) -> Inputs:
    """Every file under ``root`` whose suffix Pillow knows, sorted (a damaged one still comes: it gets an
    error row)."""
    suffixes = _image_suffixes()
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in suffixes and not p.is_dir())
    return Inputs(paths, paths)


def _list_file(path: Path) -> Inputs:
    """One path per line (blank lines and ``#`` comments skipped); a relative path is taken from the list's
    folder and named as written."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the list file '{path}': {exc}") from None
    names = list(dict.fromkeys(s for s in (line.strip() for line in lines) if s and not s.startswith("#")))
    return Inputs(names, [n if Path(n).is_absolute() else str(path.parent / n) for n in names])


def _parquet(path: Path, column: str | None) -> Inputs:
    """A Parquet table's column of encoded images (binary; rows named ``FILE#ROW``) or of paths (string;
    named by the path, relative ones taken from the table's folder)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    try:  # a file, or a folder of part files (as `dlpipe predict` and Ray write them)
        table = pads.dataset(path, format="parquet")
        schema = table.schema
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"'{path}' is not a readable Parquet table: {exc}") from None
    if column is None:
        column = next((c for c in DEFAULT_COLUMNS if c in schema.names), None)
        if column is None:
            raise UsageError(f"'{path}' has columns {schema.names}; name the image column with --column")
    if column not in schema.names:
        raise UsageError(f"'{path}' has no column {column!r}; its columns are {schema.names}")
    kind = schema.field(column).type
    values = table.to_table(columns=[column]).column(column).to_pylist()
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:  # Hugging Face's Image: {bytes, path}
        kind, values = kind.field("bytes").type, [(v or {}).get("bytes") for v in values]
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return Inputs([f"{path}#{i}" for i in range(len(values))], [v if v is not None else b"" for v in values])
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        names = [v or "" for v in values]
        return Inputs(names, [n if Path(n).is_absolute() else str(path.parent / n) for n in names])
    raise UsageError(f"column {column!r} of '{path}' holds {kind}; expected image bytes (binary) or paths (string)")


def list_inputs(inputs: str | Path, column: str | None = None) -> Inputs:
    """The named inputs of ``inputs``: a folder (searched recursively for image files), a ``.parquet`` table
    (``column``: its image-bytes, Hugging Face image struct or path column), one image file, or a list file of
    paths.

    Raises:
        InputError: ``inputs`` does not exist or cannot be read.
        UsageError: ``column`` given for a folder or list, or a column that is missing or of the wrong type.
    """
    path = Path(inputs)
    if not path.exists():
        raise InputError(f"inputs '{path}' do not exist (a folder of images, a list file or a .parquet table)")
    if path.suffix.lower() == ".parquet":
        return _parquet(path, column)
    if column is not None:
        raise UsageError(f"--column applies to a .parquet table, not to '{path}'")
    if path.is_file() and path.suffix.lower() in _image_suffixes():  # one image: a list of one
        return Inputs([str(path)], [str(path)])
    found = _folder(path) if path.is_dir() else _list_file(path)
    if not found.names:
        raise InputError(f"no images in '{path}'")
    return found
