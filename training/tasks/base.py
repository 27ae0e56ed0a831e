"""The shape of a task declaration (ultralytics' ``task_map``, optimum's ``OnnxConfig``): one frozen
dataclass per task holding what every stage needs from it. The stages above (the exporter, the
quantizer, the evaluator, the demo, the command line) look a task up in :mod:`dlpipe.training.tasks`
and run its hooks; they name no task.

Every hook here is plain torch, numpy or runtime code, so the table sits in the training layer and
the export layer runs it: a task says how to make its example inputs and which graphs it exports
(:class:`Graph`), what its quantizer keeps in float and how agreement is measured
(:class:`QuantizationPolicy`), how an exported model is scored (``evaluate``), and what the demo shows
(:class:`DemoRow`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dlpipe.training.loop import Metric, TrainConfig
from dlpipe.training.registry import OnnxContract

# Inputs for calibration and agreement checks: (model path, source given by the user or None, split,
# count, data root, offset) -> preprocessed float32 inputs (N x ...).
InputLoader = Callable[[Any, "str | None", str, int, "str | None", int], np.ndarray]
# Agreement of a variant with fp32: (fp32 predictor, variant predictor, check inputs) -> (share, max |diff|).
Agreement = Callable[[Any, Any, np.ndarray], "tuple[float, float]"]
# The labels of what an InputLoader returns for the same arguments, in the model's label order; None where they are
# not known (an array of inputs, another dataset than the model's, folders that are not the model's classes).
LabelLoader = Callable[[Any, "str | None", str, int, "str | None", int], "np.ndarray | None"]


@dataclass(frozen=True)
class Graph:
    """One ONNX graph a checkpoint exports to.

    Attributes:
        part: Its name in a package of several graphs (``encoder``...); None for a single-file model.
        module: The ``nn.Module`` traced (a wrapper around one method of the model for parts).
        contract: Input/output names, dynamic axes, opset and parity tolerance.
        example: The inputs it is exported on.
        checks: Other inputs (other batch sizes or resolutions) its parity with PyTorch is proven on.
    """

    part: str | None
    module: nn.Module
    contract: OnnxContract
    example: tuple[torch.Tensor, ...]
    checks: list[tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class QuantizationPolicy:
    """What the quantizer does for a task beyond the defaults, and how a variant is judged.

    Attributes:
        inputs: Real inputs for calibration (split ``train``) and for the agreement check (``test``).
        agreement: Share of fp32's decisions the variant makes, and the largest output difference.
        agreement_name: The measure in words for reports and errors.
        fp16_keep_ops: Operator types kept in float32 by fp16 on top of the quantizer's block list.
        fp16_scopes: When set, fp16 converts only the nodes under these name prefixes (the rest, with
            Casts at the borders, stays float32).
        int8_ops: Operator types int8 quantizes (None: all that onnxruntime quantizes).
        reported_fp32_ops: Operator types listed in the report as kept in float32.
        keep_fp32_nodes: ``f(onnx model) -> node names`` int8 leaves in float32.
        bias_correct_output: Correct the float output layer's bias for the mean int8 error on the
            calibration inputs (Nagel et al., 2019).
        parts: For packages: ``f(config) -> {part: config}`` (``dataclasses.replace`` of the config).
        labels: The check inputs' labels, where known: the variant's task metric on them is measured beside
            the agreement (reported, and named in a refusal), ``labelled_metric(predictor, inputs, labels)``.
        labelled_metric_name: That metric in words.
    """

    inputs: InputLoader
    agreement: Agreement
    agreement_name: str = "top-1 agreement"
    fp16_keep_ops: tuple[str, ...] = ()
    fp16_scopes: tuple[str, ...] = ()
    int8_ops: tuple[str, ...] | None = None
    reported_fp32_ops: tuple[str, ...] = ()
    keep_fp32_nodes: Callable[[Any], tuple[str, ...]] | None = None
    bias_correct_output: bool = False
    parts: Callable[[Any], dict[str, Any]] | None = None
    labels: LabelLoader | None = None
    labelled_metric: Callable[[Any, np.ndarray, np.ndarray], float] | None = None
    labelled_metric_name: str = "accuracy"


@dataclass(frozen=True)
class DemoRow:
    """The task's short run in ``dlpipe demo``: train, export, quantize, score every variant, run its app.

    Attributes:
        model: Registered model trained.
        options: Training options, as the ``train`` command takes them.
        quick: Options replaced in ``--quick`` runs.
        precisions: Variants made and scored besides fp32.
        quantize: Quantization settings (``calibration_size``, ``min_agreement``, ``check_size``).
        samples: ``f(count) -> uint8 images`` shown to the app (None: the app needs no files).
        app: The ``dlpipe`` command line that runs the app, with ``{model}``, ``{images}`` and ``{out}``.
        describe: ``f(app's JSON output) -> str``: the row's "app" column.
    """

    model: str
    options: dict[str, Any]
    quick: dict[str, Any]
    app: tuple[str, ...]
    describe: Callable[[Any], str]
    precisions: tuple[str, ...] = ("fp16", "int8")
    quantize: dict[str, Any] = field(default_factory=lambda: {"calibration_size": 64, "min_agreement": 0.9,
                                                              "check_size": 64})
    samples: Callable[[int], np.ndarray] | None = None
    evaluate_limit: int = 300


@dataclass(frozen=True)
class Task:
    """One task, declared once: what every stage needs from it.

    Attributes:
        name: The key models, checkpoints and ONNX metadata carry (``segmentation``...).
        description: One line for the command line and the docs.
        metric: The validation metric that picks ``best.pt`` (also the evaluation's headline figure).
        train: ``f(TrainConfig) -> summary``: the task's training on the shared loop (or its own).
        command: ``f(model, progress, **options) -> summary``: ``dlpipe train`` with the command's options.
        summary: ``f(summary) -> str``: what ``dlpipe train`` prints.
        graphs: ``f(checkpoint, model, dynamic_batch) -> [Graph]``: one graph, or a package's parts.
        metadata: ``f(checkpoint) -> dict``: more metadata for every graph (and a package's manifest).
        quantization: The quantizer's policy.
        evaluate: ``f(predictor, model, dataset, split, limit, data_dir) -> report`` with the metric's key.
        predictor: The runtime's predictor class for the task (``dlpipe.runtime.load`` returns it).
        batched: Whether the exported graph has a batch axis (else one input at a time).
        report: ``f(evaluation report) -> str``: the task's figures in words (``dlpipe evaluate``).
        demo: The task's row in ``dlpipe demo`` (None: no row).
        data_parallel: Whether it trains on the shared loop with its distributed and mixed-precision
            options (``--nproc``, torchrun, ``--amp``, ``--sync-bn``); the others refuse them.
        plots: ``f(evaluation report, report's JSON path) -> [PNG paths]``: ``dlpipe evaluate --plots`` draws
            the report's figures beside its JSON (:mod:`dlpipe.training.report_plots`); None: no plots.
    """

    name: str
    description: str
    metric: Metric
    train: Callable[[TrainConfig], dict[str, Any]]
    command: Callable[..., dict[str, Any]]
    summary: Callable[[dict[str, Any]], str]
    graphs: Callable[[dict[str, Any], nn.Module, bool], list[Graph]]
    quantization: QuantizationPolicy
    evaluate: Callable[..., dict[str, Any]]
    predictor: type
    report: Callable[[dict[str, Any]], str] | None = None
    metadata: Callable[[dict[str, Any]], dict[str, Any]] = lambda ckpt: {}
    batched: bool = True
    demo: DemoRow | None = None
    data_parallel: bool = False
    plots: Callable[[dict[str, Any], Path], list[Path]] | None = None

    def describe(self, report: dict[str, Any]) -> str:
        """An evaluation report's figures in words."""
        if self.report is not None:
            return self.report(report)
        return f"{self.metric.name} {report[self.metric.key]:.4f}"
