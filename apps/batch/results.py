"""Where ``dlpipe predict`` writes its rows, so that a run killed at any moment loses nothing already written
and a re-run skips what is done.

* ``.jsonl``: one file; each chunk of rows is appended as whole lines, then flushed and fsync'ed. A kill
  during a write can leave only a partial last line, which the next run cuts off (those inputs are redone).
* ``.parquet``: a folder of part files (``part-00000.parquet``, ...), each written under a hidden temporary
  name and renamed when complete: the folder is always a valid Parquet dataset (pandas, pyarrow, DuckDB and
  Ray read it as one table). Parquet files cannot be appended to, hence the parts.

Either way the inputs already done are the ``image`` names of the rows on disk (rows with an ``error``
count as done: a re-run does not retry them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dlpipe.runtime.errors import InputError, UsageError
from dlpipe.runtime.files import publish

SUFFIXES = (".parquet", ".jsonl")


class JsonlResults:
    """Rows appended to a JSON-lines file, one fsync per chunk."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            raise UsageError(f"--out '{path}' is a folder; a .jsonl output is a file")

    def done(self) -> set[str]:
        """The names already written; a partial last line (a killed write) is cut off first."""
        if not self.path.exists():
            return set()
        data = self.path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
                os.fsync(f.fileno())
        names = set()
        for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                names.add(json.loads(line)["image"])
            except (ValueError, KeyError, TypeError):
                raise InputError(f"'{self.path}' line {number} is not a dlpipe result row; "
                                 "choose another --out") from None
        return names

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` and make them durable before returning."""
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


class ParquetResults:
    """Rows written as a folder of Parquet part files, each published atomically."""

    def __init__(self, folder: Path):
        self.folder = folder
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--out '{folder}' is a file; a .parquet output of dlpipe predict is a folder of "
                             "part files: choose another name")
        foreign = [f.name for f in folder.glob("*.parquet") if not f.name.startswith("part-")] if folder.is_dir() else []
        if foreign:
            raise UsageError(f"--out '{folder}' holds Parquet files dlpipe predict did not write ({foreign[0]}, ...); "
                             "choose another name")
        self.schema = None
        self.next_part: int | None = None

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def done(self) -> set[str]:
        """The names in the finished parts (temporary files of a killed write are removed)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        for stale in self.folder.glob(".part-*.tmp"):
            stale.unlink()
        names: set[str] = set()
        for part in self.parts():
            try:
                schema = pq.read_schema(part)
                names.update(pq.read_table(part, columns=["image"]).column("image").to_pylist())
            except (OSError, KeyError, pa.ArrowException) as exc:
                raise InputError(f"'{part}' is not a dlpipe result part ({exc}); choose another --out") from None
            self.schema = schema if self.schema is None else _unify([self.schema, schema])
        return names

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Write ``rows`` as the next part file. Every part carries every column seen so far (missing values
        are null), so a reader that takes the schema from the first part still sees all of them."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = dict.fromkeys(key for row in rows for key in row)  # from_pylist alone takes the first row's
        table = pa.Table.from_pydict({key: [row.get(key) for row in rows] for key in columns})
        # every part has the error column, even one without errors, so that a reader taking its schema from
        # the first part (pandas.read_parquet of the folder) still sees the errors of later parts
        first = pa.schema([("image", pa.string()), ("error", pa.string())]) if self.schema is None else self.schema
        self.schema = _unify([first, table.schema])
        table = pa.Table.from_pylist(rows, schema=self.schema)
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.next_part is None:
            parts = self.parts()
            self.next_part = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        path = self.folder / f"part-{self.next_part:05d}.parquet"
        self.next_part += 1
        tmp = self.folder / f".{path.name}.tmp"  # hidden: readers of the folder skip it
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        publish(tmp, path)


def _unify(schemas):
    import pyarrow as pa

    # "permissive": a column that was all null (or empty lists) in one part takes its type from another
    return pa.unify_schemas(schemas, promote_options="permissive")


def open_results(out: str | Path) -> JsonlResults | ParquetResults:
    """The results store for ``out`` by its suffix.

    Raises:
        UsageError: a suffix other than ``.parquet`` or ``.jsonl``, or a file where a folder belongs.
    """
    path = Path(out)
    if path.suffix.lower() == ".jsonl":
        return JsonlResults(path)
    if path.suffix.lower() == ".parquet":
        return ParquetResults(path)
    raise UsageError(f"--out '{out}' must end in .parquet (a folder of part files) or .jsonl")


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """Every row of a ``dlpipe predict`` output, as the dicts that were written (null columns dropped, so an
    error row is ``{"image", "error"}`` from either format).

    Raises:
        UsageError: a wrong suffix. InputError: a missing or unreadable output.
    """
    store = open_results(out)
    path = Path(out)
    if not path.exists():
        raise InputError(f"'{path}' does not exist")
    if isinstance(store, JsonlResults):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    parts = store.parts()
    if not parts:
        return []
    schema = _unify([pq.read_schema(p) for p in parts])
    rows = pads.dataset([str(p) for p in parts], schema=schema, format="parquet").to_table().to_pylist()
    return [{k: v for k, v in row.items() if v is not None} for row in rows]
