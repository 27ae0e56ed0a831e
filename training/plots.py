"""Plots (matplotlib, PNG) written beside the JSON they come from (issue 18): every training run's
``curves.png`` beside its ``metrics.jsonl``, and the latency chart of ``dlpipe bench --plot``.

matplotlib's object API only (a :class:`~matplotlib.figure.Figure` saved through the Agg canvas, never
pyplot's global state), imported inside the functions so that ``dlpipe --help`` and the runtime stay free
of it. The evaluation plots of ``dlpipe evaluate --plots`` are in :mod:`dlpipe.training.report_plots`.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from dlpipe.runtime.errors import InputError
from dlpipe.runtime.files import atomic_output

# A run redraws its curves at most this often (seconds), unless forced: a DQN run writes a row every few
# hundred steps, and a redraw costs a few tenths of a second.
THROTTLE_S = 15.0
_drawn: dict[str, float] = {}  # metrics file (resolved) -> when its curves were last drawn (time.monotonic)

# Row keys that say where a row is (or how fast it came), not how training goes: never drawn as a curve.
BOOKKEEPING = frozenset({"epoch", "step", "layer", "stage", "episode", "seconds", "frozen_layers", "eval_episodes",
                         "episode_length", "eval_std_return", "images", "beam"})
SCHEDULES = ("lr", "epsilon", "momentum")  # drawn together in the last panel
PHASES = ("stage", "layer")  # keys whose change marks a new phase of the run (fine-tuning stage, RBM layer)
PREFIXES = ("val_", "train_", "eval_mean_", "eval_", "episode_")  # a figure's stem is its name without these
MAX_PANELS = 6


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib ``Figure`` as a PNG at ``path`` atomically; the path."""
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` (object API, Agg when saved; no pyplot state) of ``width`` x ``height`` inches."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def curves(metrics: str | Path, force: bool = False) -> Path | None:
    """Draw ``curves.png`` beside a run's ``metrics.jsonl``, at most once every :data:`THROTTLE_S` seconds
    per file unless ``force``. A failure is one warning line on stderr, never an exception: a plot must not
    stop a training run.

    Returns:
        The PNG's path; None when skipped (too soon, nothing to draw yet, or the drawing failed).
    """
    path = Path(metrics)
    key, now = str(path.resolve()), time.monotonic()
    if not force and now - _drawn.get(key, -math.inf) < THROTTLE_S:
        return None
    _drawn[key] = now
    try:
        return draw_curves(path)
    except Exception as e:  # noqa: BLE001 - anything matplotlib or a bad row raises; the run goes on
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"dlpipe: warning: could not draw curves.png of '{path}': {message}", file=sys.stderr)
        return None


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl`` (a line that is not one, e.g. half-written, is skipped).

    Raises:
        InputError: the file cannot be read.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InputError(f"'{path}': cannot read the metrics file ({e.strerror or e})") from None
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _stem(key: str) -> str:
    return next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)


def _x_axis(rows: list[dict[str, Any]]) -> tuple[str, list[float]]:
    """The x of every row and its name: the step for loops whose rows count steps (DQN), else the epoch; a
    running count where the epochs start again (each RBM layer counts its own)."""
    key = "step" if any("step" in r for r in rows) else "epoch"
    xs, last = [], 0.0
    for i, r in enumerate(rows):
        last = float(r.get(key, last if key == "step" else i + 1))
        xs.append(last)
    if key == "epoch" and any(b < a for a, b in zip(xs, xs[1:])):
        return "epoch (counted through the run)", [float(i + 1) for i in range(len(rows))]
    return key, xs


def series(rows: list[dict[str, Any]]) -> tuple[str, dict[str, tuple[list[float], list[float]]]]:
    """The x axis's name and, per drawable figure of the rows, its (x, y) points (each at the rows that
    have it: a DQN run's losses, episode returns and evaluations come in different rows)."""
    x_name, xs = _x_axis(rows)
    out: dict[str, tuple[list[float], list[float]]] = {}
    for x, row in zip(xs, rows):
        for k, v in row.items():
            if (k in BOOKKEEPING or k.endswith("_per_s") or "neg_" in k or isinstance(v, bool)
                    or not isinstance(v, (int, float)) or not math.isfinite(v)):
                continue
            out.setdefault(k, ([], []))
            out[k][0].append(x)
            out[k][1].append(float(v))
    return x_name, out


def panels(figures: dict[str, tuple[list[float], list[float]]]) -> list[tuple[str, list[str]]]:
    """(title, keys) per panel, picked from the keys present: the losses (training and validation), the
    figures within [0, 1] (accuracies, IoU, mAP, BLEU, D(x)...), one panel per other figure (training and
    validation of the same figure together: FID, returns, PSNR...), and the schedule (learning rate)."""
    schedule = [k for k in SCHEDULES if k in figures]
    loss = [k for k in figures if k not in schedule and ("loss" in _stem(k) or "error" in _stem(k))]
    rest = [k for k in figures if k not in schedule and k not in loss]
    unit = [k for k in rest if all(0 <= v <= 1 for v in figures[k][1])]
    by_stem: dict[str, list[str]] = {}
    for k in rest:
        if k not in unit:
            by_stem.setdefault(_stem(k), []).append(k)
    out = [("loss", loss)] if loss else []
    if unit:
        out.append((", ".join(dict.fromkeys(_stem(k) for k in unit)), unit))
    out += list(by_stem.items())
    out = out[:MAX_PANELS - bool(schedule)]
    if schedule:
        out.append(("learning rate" if schedule == ["lr"] else "schedule", schedule))
    return out


def _spread(values: Sequence[float]) -> float:
    """max / min of positive values (0 when any is not positive: no log scale then); above ~50 a log scale
    reads better."""
    low = min(values)
    return max(values) / low if low > 0 else 0.0


def draw_curves(metrics: str | Path) -> Path | None:
    """``curves.png`` beside ``metrics`` (a ``metrics.jsonl``): losses, validation figures and the learning
    rate against the epoch (or the step); None when the file holds nothing to draw yet.

    Raises:
        InputError: the file cannot be read.
    """
    metrics = Path(metrics)
    rows = read_rows(metrics)
    x_name, figures = series(rows)
    chosen = panels(figures)
    if not chosen:
        return None
    cols = min(len(chosen), 3)
    fig = new_figure(4.2 * cols, 3.2 * math.ceil(len(chosen) / cols))
    axes = fig.subplots(math.ceil(len(chosen) / cols), cols, squeeze=False).ravel()
    from matplotlib.ticker import MaxNLocator

    phases = _phase_starts(rows, _x_axis(rows)[1])
    for ax, (title, keys) in zip(axes, chosen):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for k in keys:
            xs, ys = figures[k]
            ax.plot(xs, ys, label=k, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2)
        values = [v for k in keys for v in figures[k][1]]
        if _spread(values) > (10 if title in ("learning rate", "schedule") else 50):
            ax.set_yscale("log")
        for x, label in phases:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
            ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), fontsize=7, color="grey",
                        rotation=90, va="top", ha="right")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_name, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(chosen):]:
        ax.set_visible(False)
    fig.suptitle(f"{metrics.parent.name}: {len(rows)} rows of {metrics.name}", fontsize=10)
    return save_figure(fig, metrics.with_name("curves.png"))


def _phase_starts(rows: list[dict[str, Any]], xs: list[float]) -> list[tuple[float, str]]:
    """Where a new phase (fine-tuning stage, RBM layer) begins, after the first, with its name."""
    out, last = [], None
    for x, row in zip(xs, rows):
        phase = next(((k, row[k]) for k in PHASES if k in row), None)
        if phase is not None and last is not None and phase != last:
            out.append((x - 0.5, f"{phase[0]} {phase[1]}"))
        last = phase if phase is not None else last
    return out


def latency(stats: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``dlpipe bench --plot``: per batch size, each variant's p50 latency (bar) with a p90-p99 whisker, and its
    throughput; a variant whose spread was too wide to trust is hatched. ``stats`` are
    :class:`~dlpipe.runtime.benchmark.LatencyStats` as dicts.

    Raises:
        InputError: no measurements.
    """
    if not stats:
        raise InputError("nothing was timed; no latency plot to draw")
    batches = list(dict.fromkeys(s["batch"] for s in stats))
    names = list(dict.fromkeys(s["name"] for s in stats))
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    fig = new_figure(max(4.5, 1.2 + 0.9 * len(names)) * len(batches), 6.4)
    axes = fig.subplots(2, len(batches), squeeze=False)
    for col, batch in enumerate(batches):
        rows = [s for s in stats if s["batch"] == batch]
        xs = list(range(len(rows)))
        hatch = ["//" if s.get("spread_too_wide") else "" for s in rows]
        top, bottom = axes[0][col], axes[1][col]
        top.bar(xs, [s["p50_ms"] for s in rows], color=[colours[s["name"]] for s in rows], hatch=hatch,
                label="p50")
        mid = [(s["p90_ms"] + s["p99_ms"]) / 2 for s in rows]
        top.errorbar(xs, mid, yerr=[[m - s["p90_ms"] for m, s in zip(mid, rows)],
                                    [s["p99_ms"] - m for m, s in zip(mid, rows)]],
                     fmt="none", ecolor="black", capsize=4, linewidth=1, label="p90-p99")
        top.set_title(f"latency at batch {batch}", fontsize=10)
        top.set_ylabel("ms per call", fontsize=8)
        top.legend(fontsize=7)
        bottom.bar(xs, [s["throughput"] for s in rows], color=[colours[s["name"]] for s in rows], hatch=hatch)
        bottom.set_title(f"throughput at batch {batch}", fontsize=10)
        bottom.set_ylabel("items/s (at p50)", fontsize=8)
        for ax in (top, bottom):
            ax.set_xticks(xs, [s["name"] for s in rows], rotation=20, ha="right", fontsize=7)
            ax.tick_params(axis="y", labelsize=8)
            ax.grid(axis="y", alpha=0.3)
    if any(s.get("spread_too_wide") for s in stats):
        fig.suptitle("hatched: spread too wide to trust (p90 over 2x p10); time again on a quiet machine",
                     fontsize=8)
    return save_figure(fig, path)


def predictions(images: Any, truths: Any, outputs: Any, labels: Sequence[str], path: str | Path,
                dense: bool = False) -> Path:
    """A few validation images with the model's predictions (a sample picture for the run's tracker): the
    predicted label and its probability over each image (green when right, red when wrong), or, for dense
    outputs, each image beside its predicted and true masks.

    Args:
        images: ``N x C x H x W`` inputs as the model saw them (any normalisation: shown min-max scaled).
        truths: ``N`` labels, or ``N x H x W`` masks.
        outputs: ``N x K`` logits, or ``N x K x H x W``.
    """
    import numpy as np

    images, truths, outputs = (np.asarray(a, dtype=np.float32 if i == 0 else None)
                               for i, a in enumerate((images, truths, outputs)))
    n = len(images)
    shown = images.transpose(0, 2, 3, 1)
    low = shown.min(axis=(1, 2, 3), keepdims=True)
    shown = (shown - low) / np.maximum(shown.max(axis=(1, 2, 3), keepdims=True) - low, 1e-8)
    shown = shown[..., 0] if shown.shape[-1] == 1 else shown
    grey = {"cmap": "gray", "vmin": 0, "vmax": 1} if shown.ndim == 3 else {}
    if dense:
        fig = new_figure(1.6 * n, 5.0)
        axes = fig.subplots(3, n, squeeze=False)
        predicted, k = outputs.argmax(1), max(outputs.shape[1] - 1, 1)
        for i in range(n):
            for row, (picture, style) in enumerate(((shown[i], grey), (predicted[i], {"cmap": "tab20", "vmin": 0, "vmax": k}),
                                                    (truths[i], {"cmap": "tab20", "vmin": 0, "vmax": k}))):
                axes[row, i].imshow(picture, interpolation="nearest", **style)
                axes[row, i].set_xticks([])
                axes[row, i].set_yticks([])
        for row, name in enumerate(("image", "predicted", "true")):
            axes[row, 0].set_ylabel(name)
    else:
        probs = np.exp(outputs - outputs.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        fig = new_figure(1.6 * n, 2.0)
        axes = fig.subplots(1, n, squeeze=False)[0]
        for i in range(n):
            guess = int(probs[i].argmax())
            name = labels[guess] if guess < len(labels) else str(guess)
            axes[i].imshow(shown[i], interpolation="nearest", **grey)
            axes[i].set_title(f"{name[:12]} {probs[i, guess]:.2f}", fontsize=8,
                              color="tab:green" if guess == int(truths[i]) else "tab:red")
            axes[i].axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def annotated(images: Any, titles: Sequence[str], path: str | Path,
              boxes: Sequence[Sequence[tuple[float, float, float, float, str]]] | None = None) -> Path:
    """A row of uint8 ``N x C x H x W`` images, each with its title (a caption) and, when given, its boxes
    (``x1, y1, x2, y2, text`` in the image's pixels): the detector's and captioner's sample pictures."""
    import numpy as np
    from matplotlib.patches import Rectangle

    images = np.asarray(images)
    n = len(images)
    fig = new_figure(2.2 * n, 2.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for i in range(n):
        picture = images[i].transpose(1, 2, 0)
        axes[i].imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", interpolation="nearest")
        for x1, y1, x2, y2, text in (boxes[i] if boxes else ()):
            axes[i].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="yellow", linewidth=1.2))
            axes[i].text(x1, y1, text, fontsize=6, color="black", backgroundcolor="yellow", va="bottom")
        axes[i].set_title("\n".join(_wrapped(titles[i], 28)) if i < len(titles) else "", fontsize=7)
        axes[i].axis("off")
    with warnings.catch_warnings():  # a label at a box's top edge reaches outside its axes
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    return save_figure(fig, path)


def _wrapped(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken between words (three lines at most)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word[:width])
    return lines[:3]
