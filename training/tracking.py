"""Experiment tracking (TensorBoard, MLflow) of training runs. (Being written for issue 18.)"""

from __future__ import annotations

from typing import Any


def log_row(row: dict[str, Any]) -> None:
    """Send one ``metrics.jsonl`` row (one epoch) to the active tracker, if any."""
