"""Printing for people (aligned tables) and for programs (``--json``)."""

from __future__ import annotations

import json
from typing import Any, Sequence

import click


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned text table; floats get 4 significant decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
        return "-" if v is None else str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def emit(data: Any, as_json: bool, human: str) -> None:
    """Print ``data`` as JSON or the ``human`` text."""
    click.echo(json.dumps(data, indent=2, default=str) if as_json else human)
