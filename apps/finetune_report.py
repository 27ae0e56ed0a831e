"""What ``dlpipe finetune`` prints about a fine-tuning run (``training.finetune.finetune``'s summary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlpipe.apps.output import table

STAGE_NAMES = {"head": "head-only", "finetune": "fine-tuning", "full": "from-scratch"}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def describe(summary: dict[str, Any]) -> str:
    """One row per stage (its best validation accuracy and epoch), then the stage best.pt came from and the
    figures of best.pt itself (loaded back and scored), so no figure is shown that the saved model does not
    have; the per-class accuracy, the checkpoint and what next."""
    r, stages, split = summary, summary["stages"], summary["per_class_split"]
    rows = [[STAGE_NAMES.get(name, name), f"{s['epochs_run']}/{s['epochs']}" if s["epochs"] else "0 (skipped)",
             _percent(s["best_val_acc"]), s["best_epoch"]] for name, s in stages.items()]
    after, origin = r["after"], STAGE_NAMES.get(r["best_stage"], r["best_stage"])
    saved = (f"best.pt: {f'from the {origin} stage ' if origin else ''}(epoch {r['best_epoch']}), "
             f"val {_percent(after['val_acc'])}"
             + (f", test {_percent(after['test_acc'])}" if "test_acc" in after else "")
             + " (best.pt loaded back and scored)")
    tuned = stages.get("finetune")
    if r["best_stage"] == "head" and tuned and tuned["epochs_run"]:
        saved += (f"\nthe fine-tuning stage never beat the head-only stage (its best val "
                  f"{_percent(tuned['best_val_acc'])}): best.pt holds the head-only weights")
    text = (f"{r['source']} -> {len(r['labels'])} classes of {r['dataset']} ({r['images']['train']} training, "
            f"{r['images']['val']} validation images; head '{r['head']}', {r['frozen_layers']} of "
            f"{r['backbone_layers']} backbone layers frozen)\n"
            + table(rows, ["stage", "epochs", "best val acc", "at epoch"]) + f"\n{saved}\n\n"
            f"per-class {split} accuracy of best.pt:\n"
            + table([[k, _percent(v)] for k, v in r["per_class_accuracy"].items()], ["class", "accuracy"])
            + f"\n\ncheckpoint: {r['best']}\nnext: {r['export_command']}")
    if Path(r["dataset"]).is_dir():  # quantize and evaluate default to the model's dataset: this folder
        text += "\nthen: dlpipe quantize MODEL.onnx --to int8; dlpipe evaluate MODEL.onnx --dataset HELD_OUT_FOLDER"
    return text
