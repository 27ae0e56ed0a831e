"""The plots of ``dlpipe evaluate --plots`` (issue 18), one per task, drawn from the evaluation report alone
and written beside its JSON: each is a task declaration's ``plots`` hook, ``f(report, json_path) -> [png]``.

* classification: the confusion matrix (rows: true class, normalised per row; counts written in the cells);
* segmentation: IoU per class, bars, with the mean;
* detection: precision-recall curves per class at IoU 0.5 (pycocotools' own ``eval["precision"]`` arrays);
* captioning: BLEU-4 per bucket of reference caption length;
* control: the return of each episode played, with the mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.training.plots import new_figure, save_figure


def _beside(json_path: str | Path, kind: str) -> Path:
    """``<report stem>_<kind>.png`` beside the report's JSON."""
    path = Path(json_path)
    return path.with_name(f"{path.stem}_{kind}.png")


def _title(report: dict[str, Any]) -> str:
    return f"{Path(str(report.get('model', ''))).name} [{report.get('precision', '?')}] on {report.get('dataset', '?')}"


def confusion(report: dict[str, Any], json_path: str | Path) -> list[Path]:
    """The confusion matrix of a classifier's report (``confusion``, ``labels``) as a heat map."""
    counts = np.asarray(report.get("confusion") or [], dtype=np.int64)
    if counts.ndim != 2 or not counts.size:
        return []
    n = len(counts)
    labels = [str(v) for v in report.get("labels") or []] + [str(i) for i in range(len(report.get("labels") or []), n)]
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(3.0 + 0.45 * n, 14.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), labels[:n], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels[:n], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = report.get("accuracy", report.get("acc"))
    ax.set_title(f"{_title(report)}\naccuracy {100 * accuracy:.2f}% of {counts.sum()} images"
                 if accuracy is not None else _title(report), fontsize=9)
    return [save_figure(fig, _beside(json_path, "confusion"))]


def class_iou(report: dict[str, Any], json_path: str | Path) -> list[Path]:
    """A segmenter's IoU per class (``per_class_iou``; a class absent from both masks and predictions is
    marked so), with the mean IoU as a dashed line."""
    per_class = report.get("per_class_iou") or {}
    if not per_class:
        return []
    names = list(per_class)
    values = [per_class[k] if per_class[k] is not None else 0.0 for k in names]
    fig = new_figure(6.0, 1.2 + 0.35 * len(names))
    ax = fig.add_subplot()
    ys = range(len(names))
    ax.barh(ys, values, color=[f"C{i % 10}" for i in ys])
    for y, k, v in zip(ys, names, values):
        ax.text(v + 0.01, y, "absent" if per_class[k] is None else f"{v:.3f}", va="center", fontsize=7)
    if report.get("miou") is not None:
        ax.axvline(report["miou"], color="black", linestyle="--", linewidth=1, label=f"mean IoU {report['miou']:.3f}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("IoU")
    ax.set_title(f"{_title(report)}: IoU per class", fontsize=9)
    return [save_figure(fig, _beside(json_path, "iou"))]


def precision_recall(report: dict[str, Any], json_path: str | Path) -> list[Path]:
    """A detector's precision-recall curve per class (``pr_curves``: COCOeval's interpolated precision at
    its 101 recall points, IoU 0.5, all areas, 100 detections), each labelled with its AP."""
    curves = report.get("pr_curves") or {}
    recall = curves.get("recall")
    drawn = {k: v for k, v in (curves.get("precision") or {}).items() if v is not None}
    if not recall or not drawn:
        return []
    fig = new_figure(6.0, 4.6)
    ax = fig.add_subplot()
    for label, precision in drawn.items():
        p = np.array([np.nan if v is None else v for v in precision], dtype=float)
        ap = float(np.nanmean(p)) if np.isfinite(p).any() else 0.0
        ax.plot(recall, p, label=f"{label} (AP {ap:.3f})", linewidth=1.3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"{_title(report)}\nprecision-recall at IoU {curves.get('iou', 0.5)}, mAP@0.5 "
                 f"{report.get('map50', float('nan')):.3f}", fontsize=9)
    return [save_figure(fig, _beside(json_path, "pr"))]


def bleu_by_length(report: dict[str, Any], json_path: str | Path) -> list[Path]:
    """A captioner's BLEU-4 per bucket of reference length (``bleu_by_length``), images per bucket written
    on the bars, corpus BLEU-4 as a dashed line."""
    buckets = report.get("bleu_by_length") or []
    if not buckets:
        return []
    fig = new_figure(max(4.5, 1.5 + 0.8 * len(buckets)), 3.8)
    ax = fig.add_subplot()
    xs = range(len(buckets))
    ax.bar(xs, [b["bleu"] for b in buckets], color="C0")
    for x, b in zip(xs, buckets):
        ax.text(x, b["bleu"], f"{b['images']} img", ha="center", va="bottom", fontsize=7)
    if report.get("bleu") is not None:
        ax.axhline(report["bleu"], color="black", linestyle="--", linewidth=1, label=f"corpus {report['bleu']:.3f}")
        ax.legend(fontsize=7)
    ax.set_xticks(list(xs), [b["words"] for b in buckets], fontsize=8)
    ax.set_xlabel("reference length (words, mean over an image's references)")
    ax.set_ylabel("BLEU-4")
    ax.set_title(f"{_title(report)}: BLEU-4 by caption length", fontsize=9)
    return [save_figure(fig, _beside(json_path, "bleu_by_length"))]


def returns(report: dict[str, Any], json_path: str | Path) -> list[Path]:
    """A policy's return per episode played (``returns``), with the mean."""
    values = report.get("returns") or []
    if not values:
        return []
    fig = new_figure(max(4.5, 1.5 + 0.3 * len(values)), 3.6)
    ax = fig.add_subplot()
    episodes = range(1, len(values) + 1)
    ax.bar(episodes, values, color="C2")
    mean = float(np.mean(values))
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.1f}")
    ax.set_xlabel("episode")
    ax.set_ylabel("return")
    ax.legend(fontsize=7)
    ax.set_title(f"{Path(str(report.get('model', ''))).name} [{report.get('precision', '?')}] in "
                 f"{report.get('env', '?')}: return per episode", fontsize=9)
    return [save_figure(fig, _beside(json_path, "returns"))]
