"""Writing outputs atomically: every file dlpipe writes (checkpoints, ONNX files, manifests, images,
JSON) is written under a temporary name beside its destination and renamed over it only when complete,
so a reader never sees half a file and a failure leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _default_mode(folder: bool = False) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename the finished temporary file ``tmp`` to ``path``, with the permissions a plainly created file
    gets (``tempfile.mkstemp`` makes files only their owner may read, which a model server run as another
    user could not load)."""
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write to; published as ``path`` when the block ends without an
    exception, removed otherwise.

    Example:
        >>> with atomic_output("model.onnx") as tmp:
        ...     onnx.save(model, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-1:]) + ".tmp"
    fd, name = tempfile.mkstemp(prefix=f"{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, doc: Any) -> Path:
    """Write ``doc`` as indented JSON to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``folder`` to fill; swapped in for ``folder`` (an older one is replaced
    only then) when the block ends without an exception, removed otherwise."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, _default_mode(folder=True))  # mkdtemp makes it private; a package is an ordinary folder
    try:
        yield tmp
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
