"""Publishing a finished output file: written under a temporary name beside it, then renamed over it, so
a reader never sees half a file."""

from __future__ import annotations

import os
from pathlib import Path


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename the finished temporary file ``tmp`` to ``path``, with the permissions a plainly created file
    gets (``tempfile.mkstemp`` makes files only their owner may read, which a model server run as another
    user could not load)."""
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)
