"""The ``dlpipe`` command line. Commands are thin: parse, import lazily, call one library function,
print. Heavy imports (torch) happen inside the commands, so ``dlpipe --help`` stays fast."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import click

from dlpipe.apps.output import emit, table
from dlpipe.runtime.errors import DlpipeError
from dlpipe.runtime.formats import PRECISIONS, QUANTIZED


class CommandError(click.ClickException):
    """A :class:`DlpipeError` shown as one line with the error's exit code."""

    def __init__(self, error: DlpipeError):
        super().__init__(str(error))
        self.exit_code = error.exit_code

    def show(self, file=None) -> None:
        click.echo(f"dlpipe: error: {self.format_message()}", err=True, file=file)


class DlpipeGroup(click.Group):
    """Click group that turns user-facing errors into one line and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except DlpipeError as exc:
                raise CommandError(exc) from None


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """dlpipe's own warnings (an int8 file on CUDA or on another kind of CPU) as one ``dlpipe: warning:`` line;
    other libraries' as Python shows them."""
    if category.__module__.startswith("dlpipe."):
        click.echo(f"dlpipe: warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                      help="Execution provider: CUDA only when it really runs (auto), or insist on one.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
FAIL_FAST = click.option("--fail-fast", is_flag=True,
                         help="Stop at the first unusable image (default: report each one, process the rest, "
                              "exit 1 at the end).")
MAX_PIXELS = click.option("--max-pixels", type=click.IntRange(min=1), default=None,
                          help="Refuse images of more pixels than this (default: Pillow's limit, 89,478,485): "
                               "a guard against decompression bombs.")
OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace output files that already exist.")
DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                        help="Data root (default: $DLPIPE_DATA_DIR, else ~/.cache/dlpipe/data).")


TRACKING_URI = click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
                            help="--log mlflow: the tracking server or store (default: $MLFLOW_TRACKING_URI, else "
                                 "MLflow's own, sqlite:///mlflow.db in the working folder).")


def TRACKED(command):
    """``--log``, ``--tracking-uri`` and ``--experiment`` of the training commands (issue 18)."""
    command = click.option("--experiment", envvar="MLFLOW_EXPERIMENT_NAME", default="dlpipe", show_default=True,
                           help="--log mlflow: the experiment the run goes in.")(command)
    command = TRACKING_URI(command)
    return click.option("--log", type=click.Choice(["none", "tensorboard", "mlflow"]), envvar="DLPIPE_LOG",
                        default="none", show_default=True,
                        help="Track the run (or $DLPIPE_LOG): TensorBoard event files under --out/tensorboard, or an "
                             "MLflow run: hyper-parameters, per-epoch metrics, learning rate, images/s, test metrics "
                             "and pictures. Needs dlpipe[tensorboard] or dlpipe[mlflow].")(command)


def ATTACHED(command):
    """``--log mlflow --run-id RUN`` of export, quantize, evaluate and bench: what they make joins the
    training's MLflow run (issue 18)."""
    command = click.option("--experiment", envvar="MLFLOW_EXPERIMENT_NAME", default="dlpipe", show_default=True,
                           help="--log mlflow without --run-id: the experiment of the new run.")(command)
    command = TRACKING_URI(command)
    command = click.option("--run-id", default=None,
                           help="The MLflow run to add to (the training run's id, printed by train --log mlflow); "
                                "implies --log mlflow.")(command)
    return click.option("--log", type=click.Choice(["none", "mlflow"]), default="none", show_default=True,
                        help="Log to MLflow: ONNX models in its onnx flavour with a signature, metrics per "
                             "precision, reports and latency tables. Needs dlpipe[mlflow].")(command)


def _attach(track: dict, **what) -> None:
    """Send what a command made to MLflow when ``--log mlflow``/``--run-id`` asks; say where on stderr."""
    if track["log"] == "none" and not track["run_id"]:
        return
    from dlpipe.training.tracking import Tracking, attach

    found = attach(Tracking("mlflow", track["tracking_uri"], track["experiment"], track["run_id"]), **what)
    click.echo(f"logged to mlflow run {found['run_id']} at {found['where']}", err=True)


def _finish(rows: list[dict], as_json: bool, human) -> None:
    """Print the results (``human(good_rows)`` or all rows as JSON), then one line per failed image on
    stderr; exit 1 when any failed."""
    good = [r for r in rows if "error" not in r]
    failed = [r for r in rows if "error" in r]
    if good or as_json:
        emit(rows, as_json, human(good))
    for r in failed:
        click.echo(f"dlpipe: error: {r['error']}", err=True)
    if failed:
        if len(rows) > 1:
            click.echo(f"dlpipe: {len(failed)} of {len(rows)} images failed", err=True)
        raise click.exceptions.Exit(1)


@click.group(cls=DlpipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dlpipe")
def cli() -> None:
    """dlpipe: train -> export to ONNX -> quantize (fp16/int8) -> serve with onnxruntime."""


@cli.command("models")
@click.argument("name", required=False)
@JSON
def models_cmd(name: str | None, as_json: bool) -> None:
    """List the registered models and their training recipes; with NAME, that model's recipes in full
    (what `dlpipe train NAME --recipe R` runs when no other flag is given)."""
    from dlpipe.training.registry import get_spec, list_models

    if name is not None:
        spec = get_spec(name)
        recipes = {r: spec.recipe_for(None, r) for r in spec.recipe.names}
        keys = [k for k in recipes["default"] if k not in ("model", "dataset", "recipe")]
        rows = [[r, *(json.dumps(s[k]) if isinstance(s[k], dict) else s[k] for k in keys)] for r, s in recipes.items()]
        head = (f"{spec.name} ({spec.task}), default dataset {spec.default_dataset}"
                + (f"; measured by {spec.recipe.benchmark}" if spec.recipe.benchmark else "")
                + (f"; dataset overrides: {', '.join(spec.recipe.datasets)}" if spec.recipe.datasets else ""))
        emit({"name": spec.name, "task": spec.task, "default_dataset": spec.default_dataset,
              "benchmark": spec.recipe.benchmark, "recipes": recipes,
              "dataset_overrides": {k: dict(v) for k, v in spec.recipe.datasets.items()}}, as_json,
             head + "\n" + table(rows, ["recipe", *keys]))
        return
    specs = [get_spec(n) for n in list_models()]
    rows = [[s.name, s.task, s.default_dataset, ", ".join(s.recipe.names), s.description] for s in specs]
    emit([dict(zip(["name", "task", "default_dataset", "recipes", "description"], r)) for r in rows], as_json,
         table(rows, ["model", "task", "default dataset", "recipes", "description"]))


def _model_args(ctx, param, values: tuple[str, ...]) -> dict | None:
    """``KEY=VALUE`` pairs -> dict, each VALUE read as JSON (a bare word stays a string)."""
    args = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param=param)
        try:
            args[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            args[key.strip()] = value
    return args or None


def _quiet_distributed(opts: dict) -> None:
    """Distributed runs: torch's C++ layer (read once, before torch loads) logs a lost peer as a warning with
    a native stack trace; the failure is reported as one line instead."""
    if opts.get("nproc") or (opts.get("nnodes") or 1) > 1:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


@cli.command("train")
@click.argument("model")
@click.option("--dataset", default=None,
              help="mnist, fashion-mnist, shapes, shapes-scenes, mnist-scenes, shapes-boxes, mnist-boxes, "
                   "voc-seg:ROOT, voc-det:ROOT, coco:ROOT, folder:ROOT (ROOT/CLASS/IMAGE, 64x64 RGB)... "
                   "(default: the model's).")
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--lr", type=float, default=None, help="(Peak) learning rate.")
@click.option("--optimizer", default=None,
              help="sgd, momentum, nesterov, adagrad, rmsprop, adadelta, adam, adamw or radam.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=None)
@click.option("--init", default=None, help="Weight init: default, he, xavier or lecun.")
@click.option("--batch-norm/--no-batch-norm", default=None, help="Insert batch normalisation (model default).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", callback=_model_args,
              help="A keyword argument for the model's builder, VALUE as JSON (e.g. widths=[32,64,96,128,192]); "
                   "repeatable.")
@click.option("--schedule", default=None, help="none, step, cosine or onecycle (default: the recipe's).")
@click.option("--augment", default=None,
              help="none, shift, affine, affine+erase (random erasing too), elastic (elastic distortion), crop or "
                   "flip (default: the recipe's).")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Classifiers: cross-entropy label smoothing (default: the recipe's).")
@click.option("--recipe", default="default", show_default=True,
              help="The model's named recipe for every option not given: default (what its benchmark measured), "
                   "quick (a smoke run), or one of the model's own (deep_convnet: book, erase; dmlp, lenet5: plain).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--patience", type=click.IntRange(min=0), default=0, show_default=True, help="Early stopping patience (0: off).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Train on the first N images only.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Score the test split's first N images only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--out", default="runs/train", show_default=True, type=click.Path(file_okay=False))
@click.option("--resume", default=None, type=click.Path(dir_okay=False), help="Continue from a last.pt.")
@click.option("--init-from", default=None, type=click.Path(dir_okay=False),
              help="Start from this checkpoint's weights wherever names and shapes match (pretraining).")
@click.option("--download", is_flag=True, help="Let torchvision download a missing dataset.")
@click.option("--env", default=None, help="DQN models: gymnasium environment id (CartPole-v1, ALE/Pong-v5...).")
@click.option("--total-steps", type=click.IntRange(min=1), default=None, help="DQN models: environment steps.")
@click.option("--buffer-size", type=click.IntRange(min=1), default=None, help="DQN models: replay buffer capacity.")
@click.option("--double-dqn", is_flag=True, default=None, help="DQN models: Double DQN targets.")
@click.option("--style", default=None, type=click.Path(dir_okay=False),
              help="stylizer: the style image (default: a built-in procedural brush-stroke texture).")
@click.option("--classifier", default=None, type=click.Path(dir_okay=False),
              help="GAN models: a classifier best.pt of the dataset that judges the samples (default: train LeNet-5).")
@click.option("--cd-k", type=click.IntRange(min=1), default=None, help="RBM models: Gibbs steps of contrastive divergence.")
@click.option("--persistent", is_flag=True, default=None, help="RBM models: persistent contrastive divergence (PCD).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Data-parallel processes on this machine (torch.distributed DDP through torch's launcher; gloo on "
                   "the CPU). The global batch is --batch-size x processes and --lr applies to it: divide "
                   "--batch-size by N to keep a single process's run. Classification, segmentation, detection and "
                   "captioning; DQN (and the other tasks with their own loops) train in one process only.")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --nproc: machines taking part (each runs the same command).")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="With --nnodes: where the machines meet (torch's c10d rendezvous; the same on every node).")
@click.option("--rdzv-id", default="dlpipe", show_default=True, help="With --nnodes: the run's rendezvous id.")
@click.option("--ddp-timeout", type=click.FloatRange(min=1), default=None,
              help="Distributed runs: seconds a collective waits for the other processes (default 300; more than "
                   "rank 0's validation of an epoch takes).")
@click.option("--sync-bn", is_flag=True, default=None,
              help="Distributed runs: synchronise batch-norm statistics across processes (SyncBatchNorm; GPUs only).")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default=None,
              help="Mixed-precision training (autocast): bf16 on the CPU or CUDA, fp16 with a gradient scaler; "
                   "checkpoints stay fp32.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@TRACKED
@DATA_DIR
@JSON
def train_cmd(model, as_json, no_progress, **opts) -> None:
    """Train MODEL; writes best.pt, last.pt and metrics.jsonl to --out."""
    _quiet_distributed(opts)
    from dlpipe.training.train import train_command

    result, human = train_command(model, progress=not no_progress, **opts)
    emit(result, as_json, human)


@cli.command("finetune")
@click.option("--from", "source", required=True,
              help="A dlpipe classifier checkpoint, or torchvision:ARCH[:WEIGHTS] (e.g. torchvision:resnet18:DEFAULT, "
                   "read from the local torch cache, never downloaded; or torchvision:ARCH:FILE.pth).")
@click.option("--data", required=True, help="An image folder (one sub-folder per class) or a registered dataset.")
@click.option("--out", default="runs/finetune", show_default=True, type=click.Path(file_okay=False))
@click.option("--per-class", type=click.IntRange(min=2), default=None, help="At most N labelled images per class (few-shot).")
@click.option("--freeze", default="none", show_default=True,
              help="backbone (head only), none, or N (the first N backbone layers).")
@click.option("--head-epochs", type=click.IntRange(min=0), default=2, show_default=True, help="Epochs training the new head alone.")
@click.option("--epochs", type=click.IntRange(min=0), default=5, show_default=True, help="Epochs after that, frozen as --freeze says.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Backbone learning rate.")
@click.option("--head-lr", type=float, default=1e-3, show_default=True, help="Head learning rate.")
@click.option("--optimizer", default="adam", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--schedule", default="cosine", show_default=True, help="none, step or cosine (per stage).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--augment", default="none", show_default=True, help="none, shift, affine, affine+erase, elastic, crop or flip.")
@click.option("--image-size", type=click.IntRange(min=8), default=None, help="Input size for torchvision sources (default: 224).")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Held out from each class.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Registered datasets: first N test images only.")
@click.option("--scratch", is_flag=True, help="Baseline: the same network, images and budget from random weights.")
@click.option("--patience", type=click.IntRange(min=0), default=0, show_default=True,
              help="End a stage after N epochs without validation improvement (0: off).")
@click.option("--resume", default=None, type=click.Path(dir_okay=False), help="Continue from a last.pt.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Data-parallel processes (torch.distributed DDP through torch's launcher); the global batch is "
                   "--batch-size x processes.")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --nproc: machines taking part (each runs the same command).")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="With --nnodes: where the machines meet.")
@click.option("--ddp-timeout", type=click.FloatRange(min=1), default=None,
              help="Distributed runs: seconds a collective waits for the other processes (default 300).")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default=None,
              help="Mixed-precision training (autocast); checkpoints stay fp32.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@TRACKED
@DATA_DIR
@JSON
def finetune_cmd(as_json, no_progress, **opts) -> None:
    """Fine-tune a pretrained classifier on your images; writes a checkpoint 'dlpipe export' takes."""
    _quiet_distributed(opts)
    from dlpipe.apps.finetune_report import describe
    from dlpipe.training.finetune import finetune_command
    from dlpipe.training.train import tracked_line

    if opts["ddp_timeout"] is None:
        del opts["ddp_timeout"]  # the config's default
    r = finetune_command(progress=not no_progress, **opts)
    if r is None:
        click.echo("this node's processes finished; rank 0 (on another node) wrote the checkpoint")
        return
    emit(r, as_json, describe(r) + tracked_line(r))


@cli.command("export")
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .onnx file.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the model's contract).")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True)
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default=None,
              help="torch.onnx exporter (default: the model's contract).")
@click.option("--builder", default=None, help="Your own model: package.module:function returning an nn.Module.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="State dict for --builder or a torchvision:ARCH source.")
@click.option("--input-shape", default=None, help="C,H,W of one input, for --builder.")
@click.option("--labels", default=None, help="Class names, comma-separated or @file (one per line), for --builder.")
@click.option("--mean", default=None, help="Per-channel mean (0-1 scale), for --builder.")
@click.option("--std", default=None, help="Per-channel std (0-1 scale), for --builder.")
@ATTACHED
@JSON
def export_cmd(checkpoint, out, opset, dynamic_batch, exporter, builder, weights, input_shape, labels, mean, std,
               as_json, **track) -> None:
    """Export a training CHECKPOINT, a torchvision classifier (torchvision:ARCH[:WEIGHTS], or --weights FILE.pth;
    categories and preprocessing from the weights' metadata) or your own --builder module to ONNX, with parity
    checks."""
    from dlpipe.export.onnx_export import export_checkpoint, export_torchvision, export_user_module, read_labels

    if (checkpoint is None) == (builder is None):
        raise click.UsageError("give either a CHECKPOINT or --builder (with --input-shape and --labels)")
    if builder:
        if not input_shape or not labels:
            raise click.UsageError("--builder needs --input-shape C,H,W and --labels")
        report = export_user_module(builder, out, input_shape=_ints(input_shape), labels=read_labels(labels),
                                    weights=weights, mean=_floats(mean), std=_floats(std), opset=opset,
                                    dynamic_batch=dynamic_batch, exporter=exporter or "dynamo")
    elif checkpoint.startswith("torchvision:"):
        report = export_torchvision(checkpoint, out, weights=weights, opset=opset, dynamic_batch=dynamic_batch,
                                    exporter=exporter or "dynamo")
    else:
        report = export_checkpoint(checkpoint, out, opset=opset, dynamic_batch=dynamic_batch, exporter=exporter)
    rows = [[p.output, p.batch, "x".join(map(str, p.shape)), f"{p.max_abs:.2e}", f"{p.atol:g}"] for p in report.parity]
    human = (f"wrote {report.path} ({report.model}, opset {report.opset}, {report.exporter} exporter, "
             f"{report.seconds:.1f}s)\nparity with PyTorch:\n" + table(rows, ["output", "batch", "shape", "max |diff|", "atol"]))
    emit(report.as_dict(), as_json, human)
    _attach(track, models=[report.path], documents={"export.json": report.as_dict()})


@cli.command("quantize")
@click.argument("model", type=click.Path())
@click.option("--to", "precision", type=click.Choice(list(QUANTIZED)), required=True,
              help="; ".join(f"{p}: {PRECISIONS[p].description}" for p in QUANTIZED))
@click.option("--method", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="int8: static (calibrated) or dynamic.")
@click.option("--format", "int8_format", type=click.Choice(["auto", "qdq-u8s8", "qop-u8s8", "qdq-s8s8"]), default="auto",
              show_default=True, help="int8 static: QDQ or QOperator, uint8 or int8 activations (int8 weights). auto "
              "builds each, reads which convolutions onnxruntime fuses into integer kernels on this CPU, times them "
              "at batch 1 and --batch and keeps the fastest that passes --min-agreement.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="int8 auto: the typical batch size the formats are timed at (besides 1).")
@click.option("--calibration", default=None,
              help="Calibration data: dataset name, image folder or .npy (default: the model's dataset).")
@click.option("--calibration-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="percentile",
              show_default=True, help="Default by measurement (bench/int8_real.py, held-out images, MobileNetV2 / "
              "deep_convnet / resnet_small): percentile agreed with fp32 as well as minmax or better every time "
              "(MobileNetV2 top-1 76.6 vs 73.8% with bias correction, 66.8 vs 58.6% without), at up to 1.8x its "
              "calibration time; entropy worst (-2 to -26 points).")
@click.option("--per-channel/--per-tensor", default=True, show_default=True)
@click.option("--keep-fp32", multiple=True, help="Operator type to keep in float32 (repeatable).")
@click.option("--min-agreement", type=float, default=0.98, show_default=True,
              help="Fail when top-1 agreement with fp32 is lower.")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), default=None, metavar="POINTS",
              help="Classifiers: also accept a variant below --min-agreement whose accuracy on the labelled check "
              "images (the model's own test split) is at most POINTS below fp32's.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="int8 static QDQ: correct each Conv/Gemm bias so its mean output on the calibration images "
              "matches fp32, layer by layer (fine-tuned MobileNetV2: 0.73 -> 0.24 points of accuracy lost).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Default: MODEL.<precision>.onnx, or manifest.<precision>.json in a package folder.")
@ATTACHED
@DATA_DIR
@JSON
def quantize_cmd(model, precision, method, int8_format, batch, calibration, calibration_size, calibration_method,
                 per_channel, keep_fp32, min_agreement, max_accuracy_drop, bias_correction, out, data_dir, as_json,
                 **track) -> None:
    """Quantize a dlpipe fp32 MODEL (ONNX file, package folder or manifest) to fp16 or int8; check it against fp32."""
    from dlpipe.export.quantize import QuantizationConfig, quantize
    from dlpipe.runtime.formats import labelled_text

    config = QuantizationConfig(precision=precision, method=method, format=int8_format, batch=batch,
                                per_channel=per_channel, calibration_method=calibration_method,
                                calibration_size=calibration_size, keep_fp32=tuple(keep_fp32),
                                min_agreement=min_agreement, bias_correction=bias_correction,
                                max_accuracy_drop=max_accuracy_drop)
    report = quantize(model, out, config, calibration=calibration, data_dir=data_dir)
    ops = ", ".join(f"{k} {v}" for k, v in report.op_counts.items())
    human = (f"wrote {report.path} ({report.precision}{' ' + report.method if report.method else ''}"
             f"{' ' + report.format if report.format else ''}{' per-tensor' if report.per_channel is False else ''}, "
             f"{report.size_bytes / 1024:.0f} KiB vs {report.fp32_size_bytes / 1024:.0f} KiB fp32)\n"
             f"{report.agreement_name} with fp32: {report.agreement:.2%} on {report.check_images} images "
             f"(max |diff| {report.max_abs_diff:.3g})\n{report.conv_summary}\noperators: {ops}\n"
             f"kept in fp32: {', '.join(report.kept_fp32) or 'none'}")
    if report.labelled_check:
        human += "\n" + labelled_text(report.labelled_check, report.precision)
    if report.passed_by == "accuracy":
        human += (f"\naccepted by --max-accuracy-drop {max_accuracy_drop:g}: agreement below --min-agreement "
                  f"{min_agreement:g}")
    if report.bias_corrected_layers:
        human += f"\nbias correction: {report.bias_corrected_layers} layers matched to fp32's mean outputs"
    measured = [c for c in report.candidates if c.get("p50_ms") or c.get("error") or c.get("same_kernels_as")]
    if measured:
        rows = [[c["name"], c.get("integer_convs", ""), c.get("float_convs", ""),
                 "" if c.get("agreement") is None else f"{c['agreement']:.2%}",
                 ", ".join(f"b{b} {v:.3g}" for b, v in c.get("p50_ms", {}).items())
                 or c.get("error") or f"same kernels as {c.get('same_kernels_as')}"] for c in measured]
        human += (f"\nint8 candidates (format chosen: {report.format}):\n"
                  + table(rows, ["candidate", "int convs", "float convs", "agreement", "p50 ms"])
                  + f"\nwhy: {report.format_reason}")
    if report.warning:
        click.echo(f"warning: {report.warning}", err=True)
    emit(report.as_dict(), as_json, human)
    _attach(track, models=[report.path], metrics={f"quantize_{report.precision}_agreement": report.agreement},
            documents={f"quantize.{report.precision}.json": report.as_dict()})


@cli.command("evaluate")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--dataset", default=None, help="Default: the dataset in the model's metadata.")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N images only.")
@click.option("--confusion", is_flag=True, help="Print the confusion matrix.")
@click.option("--plots", type=click.Path(), default=None,
              help="Write each model's report (<name>.json) and its task's plots (PNG) into this folder.")
@DEVICE
@DATA_DIR
@ATTACHED
@JSON
def evaluate_cmd(models, dataset, split, limit, confusion, plots, device, data_dir, as_json, **track) -> None:
    """Task metrics of each MODEL (ONNX file, package folder or manifest; any precision) through the runtime."""
    from dlpipe.export.evaluate import evaluate_onnx, plots_folder
    from dlpipe.training.tasks import get_task

    folder = plots_folder(plots) if plots else None  # a bad folder is refused before the evaluation
    reports = [evaluate_onnx(m, dataset, split, limit, data_dir, device) for m in models]
    rows = [[r["model"], r["precision"], r["dataset"], r["images"], get_task(r["task"]).describe(r)] for r in reports]
    human = table(rows, ["model", "precision", "dataset", "images", "task metrics"])
    if confusion:
        for r in reports:
            if "confusion" not in r:
                continue
            labels = [lbl[:6] for lbl in r["labels"]] or [str(i) for i in range(len(r["confusion"]))]
            human += f"\n\nconfusion matrix of {r['model']} (rows: true, columns: predicted)\n"
            human += table([[labels[i], *row] for i, row in enumerate(r["confusion"])], ["", *labels])
    if folder is not None:
        human += "\n\n" + _save_reports(reports, models, folder)
    emit(reports, as_json, human)
    _attach(track, metrics=_evaluation_metrics(reports),
            documents={f"evaluate/{i}-{Path(r['model']).stem}.json": r for i, r in enumerate(reports)},
            files=[f for r in reports for f in r.get("files", []) if f.endswith(".png")])


def _evaluation_metrics(reports: list[dict]) -> dict[str, float]:
    """The task metrics of evaluate's reports as MLflow metrics, named by precision: ``eval_int8_accuracy``."""
    skip = {"images", "seconds", "batch", "limit"}
    return {f"eval_{r['precision']}_{k}": v for r in reports for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}


def _save_reports(reports: list[dict], models: tuple[str, ...], folder: Path) -> str:
    """``evaluate --plots``: each report as ``folder/<name>.json`` and its plots beside it (the name: the
    model file's stem, a package's folder and variant, unique among the models); what was written, in words.
    Each report gets the list of its ``files``."""
    from dlpipe.apps.images import unique_stems
    from dlpipe.export.evaluate import save_report

    named = []
    for model in map(Path, models):
        if model.suffix == ".json" and model.name.startswith("manifest"):  # pkg/manifest.int8.json -> pkg.int8
            model = model.parent / f"{model.parent.name}{model.name[len('manifest'):]}"
        elif model.is_dir():
            model = model / f"{model.name}.package"
        named.append(str(model))
    lines = []
    for report, name in zip(reports, unique_stems(named)):
        written = save_report(report, folder / f"{name}.json")
        report["files"] = [str(p) for p in written]
        if len(written) > 1:
            lines.append(f"wrote {', '.join(report['files'])}")
        else:
            from dlpipe.training.tasks import get_task

            why = "nothing to plot in its report" if get_task(report["task"]).plots else "no plots for its task"
            lines.append(f"wrote {written[0]} ({why}: {report['task']})")
    return "\n".join(lines)


@cli.command("bench")
@click.argument("models", nargs=-1, type=click.Path())  # ONNX files, package folders or manifests
@click.option("--vs-torch", "checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Also time PyTorch eager from this checkpoint.")
@click.option("--batch", "batches", default="1,64", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--iters", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for onnxruntime and torch alike.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the JSON here.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Draw latency (p50, p90-p99 whiskers) and throughput per variant and batch size as this PNG; "
                   "the JSON beside it (FILE.json) unless --out is given.")
@ATTACHED
@JSON
def bench_cmd(models, checkpoint, batches, iters, warmup, threads, device, out, plot, as_json, **track) -> None:
    """Latency (p50/p90/p99) and throughput of ONNX MODELS, beside PyTorch eager."""
    from dlpipe.export.evaluate import benchmark
    from dlpipe.runtime.benchmark import SPREAD_FOOTNOTE, marked
    from dlpipe.runtime.errors import UsageError
    from dlpipe.runtime.files import write_json

    if plot and (Path(plot).suffix.lower() != ".png" or Path(plot).is_dir()):
        raise UsageError(f"--plot '{plot}' must name a .png file")
    stats = benchmark(models, _ints(batches), checkpoint, warmup, iters, threads, device)
    data = [s.as_dict() for s in stats]
    out = out or (Path(plot).with_suffix(".json") if plot else None)
    if out:
        write_json(out, data)
    if plot:
        from dlpipe.training.plots import latency

        latency(data, plot)
    rows = [[s.name, s.batch, marked(s.p50_ms, s.spread_too_wide), s.p90_ms, s.p99_ms,
             marked(s.throughput, s.spread_too_wide, digits=0)] for s in stats]
    human = table(rows, ["variant", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s"])
    emit(data, as_json, human + (f"\n{SPREAD_FOOTNOTE}" if any(s.spread_too_wide for s in stats) else ""))
    _attach(track, documents={"bench/latency.json": data}, files=[plot] if plot else [],
            metrics={f"bench/{s.name}/b{s.batch}/{key}": value for s in stats
                     for key, value in (("p50_ms", s.p50_ms), ("items_per_s", s.throughput))})


@cli.command("card")
@click.argument("model", type=click.Path(exists=True))
@click.option("--eval", "evaluations", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON written by `dlpipe evaluate --json` (or one report of --plots); repeatable. Each precision "
                   "evaluated becomes a model-index result.")
@click.option("--bench", "benches", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON written by `dlpipe bench --out FILE` (or --json); repeatable.")
@click.option("--license", "license_id", default=None,
              help="Licence id from Hugging Face's list (apache-2.0, mit, ...). Default: other, and the card says "
                   "the licence was not stated.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="The card's file (README.md), or - to print it.")
@OVERWRITE
@JSON
def card_cmd(model, evaluations, benches, license_id, out, overwrite, as_json) -> None:
    """A model card for MODEL (ONNX file, package folder or manifest) in the Hugging Face convention, from its
    metadata and the JSON that evaluate and bench wrote."""
    from dlpipe.apps.card import model_card, write_card

    if out == "-":
        click.echo(model_card(model, evaluations, benches, license=license_id), nl=False)
        return
    path = write_card(model, out, evaluations, benches, license=license_id, overwrite=overwrite)
    emit({"card": str(path)}, as_json, f"wrote {path}")


@cli.command("classify")
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@FAIL_FAST
@MAX_PIXELS
@DEVICE
@JSON
def classify_cmd(model, images, top_k, fail_fast, max_pixels, device, as_json) -> None:
    """Top-k labels for IMAGES (PNG/JPEG, any size, colour or grayscale)."""
    from dlpipe.apps.classify import classify_images

    rows = classify_images(model, list(images), top_k=top_k, device=device, fail_fast=fail_fast,
                           max_pixels=max_pixels)
    def human(good: list[dict]) -> str:
        return table([[r["image"], r["label"], f"{r['score']:.3f}",
                       ", ".join(f"{t['label']} {t['score']:.3f}" for t in r["top_k"][1:])] for r in good],
                     ["image", "label", "prob", "next best"])

    _finish(rows, as_json, human)


@cli.command("segment")
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNG outputs.")
@OVERWRITE
@FAIL_FAST
@MAX_PIXELS
@DEVICE
@JSON
def segment_cmd(model, images, out, overwrite, fail_fast, max_pixels, device, as_json) -> None:
    """Segment IMAGES: write NAME_overlay.png and NAME_mask.png (class ids) to --out."""
    from dlpipe.apps.segment import segment_images

    rows = segment_images(model, list(images), out, device=device, overwrite=overwrite, fail_fast=fail_fast,
                          max_pixels=max_pixels)

    def human(good: list[dict]) -> str:
        labels = list(good[0]["shares"]) if good else []
        body = [[r["image"], *(f"{100 * r['shares'][lbl]:.1f}%" for lbl in labels)] for r in good]
        return table(body, ["image", *labels]) + f"\n\nwrote overlays and masks to {out}"

    _finish(rows, as_json, human)


@cli.command("detect")
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the outputs.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Smallest score reported.")
@OVERWRITE
@FAIL_FAST
@MAX_PIXELS
@DEVICE
@JSON
def detect_cmd(model, images, out, threshold, overwrite, fail_fast, max_pixels, device, as_json) -> None:
    """Detect objects in IMAGES: write NAME_boxes.png (boxes drawn) and NAME_boxes.json to --out."""
    from dlpipe.apps.detect import detect_images

    rows = detect_images(model, list(images), out, threshold=threshold, device=device, overwrite=overwrite,
                         fail_fast=fail_fast, max_pixels=max_pixels)

    def human(good: list[dict]) -> str:
        body = [[r["image"], d["label"], f"{d['score']:.2f}", ", ".join(f"{v:.0f}" for v in d["box"])]
                for r in good for d in r["detections"]]
        counts = ", ".join(f"{Path(r['image']).name}: {len(r['detections'])}" for r in good)
        return (table(body, ["image", "label", "score", "box (x0, y0, x1, y1)"])
                + f"\n\ndetections per image: {counts}\nwrote drawn images and JSON to {out}")

    _finish(rows, as_json, human)


@cli.command("play")
@click.argument("model", type=click.Path())  # any model file; not a policy is a one-line usage error
@click.option("--env", "env_id", default=None, help="Gymnasium environment id (default: the one in the model).")
@click.option("--episodes", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Episode i is reset with seed + i.")
@click.option("--epsilon", type=float, default=0.0, show_default=True, help="Share of random actions.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Cap on an episode's length.")
@click.option("--record", type=click.Path(dir_okay=False), default=None, help="Write the first episode as a GIF.")
@DEVICE
@JSON
def play_cmd(model, env_id, episodes, seed, epsilon, max_steps, record, device, as_json) -> None:
    """Play a DQN policy (ONNX, any precision) in its environment; report mean ± std return."""
    from dlpipe.training.play import play

    r = play(model, env_id, episodes=episodes, seed=seed, epsilon=epsilon, max_steps=max_steps, record=record,
             device=device)
    played = f"{r['episodes']} episode{'s' if r['episodes'] != 1 else ''}"
    human = (f"{r['env']}, {r['precision']} policy, {played}: return {r['mean_return']:.1f} ± "
             f"{r['std_return']:.1f} (min {r['min_return']:.0f}, max {r['max_return']:.0f}), "
             f"{r['policy_ms_per_step']:.3f} ms per action" + (f"\nrecorded the first episode to {record}" if record else ""))
    emit(r, as_json, human)


@cli.command("caption")
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True)
@click.option("--beam", type=click.IntRange(min=1), default=None,
              help="Beam width (1: greedy). Default: the package's.")
@FAIL_FAST
@MAX_PIXELS
@DEVICE
@JSON
def caption_cmd(model, images, beam, fail_fast, max_pixels, device, as_json) -> None:
    """One caption per IMAGE (PNG/JPEG, any size or mode) from a captioner package (folder or manifest)."""
    from dlpipe.apps.caption import caption_images

    rows = caption_images(model, list(images), beam=beam, device=device, fail_fast=fail_fast, max_pixels=max_pixels)
    _finish(rows, as_json, lambda good: table([[r["image"], r["caption"], f"{r['score']:.3f}"] for r in good],
                                              ["image", "caption", "score (log-prob / length^a)"]))


@cli.command("generate")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(), help="A grid .png, or a folder for one PNG per image.")
@click.option("--n", "count", type=int, default=None, help="Images (or interpolation steps).  [default: 64, or 10 with --interpolate]")
@click.option("--seed", type=int, default=0, show_default=True, help="Latent seed (--interpolate: from SEED to SEED+1).")
@click.option("--class", "label", default=None, help="Class to generate (class-conditional models).")
@click.option("--interpolate", is_flag=True, help="A strip of images along the latent path between two seeds.")
@click.option("--columns", type=click.IntRange(min=1), default=8, show_default=True, help="Grid columns.")
@OVERWRITE
@DEVICE
@JSON
def generate_cmd(model, out, count, seed, label, interpolate, columns, overwrite, device, as_json) -> None:
    """Images from a generator MODEL (a DCGAN generator, a VAE package): a grid PNG or one PNG per image."""
    from dlpipe.apps.generate import generate_images

    count = count if count is not None else (10 if interpolate else 64)
    result = generate_images(model, out, count=count, seed=seed, label=label, interpolate=interpolate,
                             overwrite=overwrite, device=device, columns=columns)
    what = "interpolation steps" if interpolate else "images"
    emit(result, as_json, f"{result['count']} {what} ({'x'.join(map(str, result['image_shape']))}) -> "
                          f"{result['out']}{(' (strip)' if interpolate else ' (grid)') if result['grid'] else ''}")


@cli.command("predict")
@click.argument("model", type=click.Path())
@click.argument("inputs", type=click.Path())
@click.option("--out", required=True, type=click.Path(),
              help="Results: NAME.parquet (a folder of part files) or NAME.jsonl. An existing one is resumed: "
                   "inputs already in it are skipped.")
@click.option("--column", default=None, help="INPUTS .parquet: its column of image bytes or paths "
                                             "(default: image, bytes or path).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Runtime sessions: threads (local) or Ray actors (default: one per core).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a pool of sessions in this process; ray: Ray Data (pip install 'dlpipe[ray]').")
@click.option("--address", default=None, help="--engine ray: a Ray cluster (ray://HOST:10001; default: a local Ray).")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Classifiers.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Detectors.")
@click.option("--beam", type=click.IntRange(min=1), default=None, help="Captioners (default: the package's).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Rows per durable write.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@MAX_PIXELS
@DEVICE
@JSON
def predict_cmd(model, inputs, out, no_progress, as_json, **opts) -> None:
    """Run MODEL over INPUTS (a folder tree of images, a list file of paths, or a .parquet table) and write one
    row per input to --out: its name (image), the task's outputs as `classify`/`segment`/`detect`/`caption`
    --json give them, or its error. Unreadable files become error rows (counted in the summary; the exit code
    stays 0) and count as done when a re-run resumes."""
    from dlpipe.apps.batch import predict_batch

    s = predict_batch(model, inputs, out, progress=not no_progress, **opts)
    emit(s, as_json, f"{s['written']} rows written to {s['out']} ({s['errors']} errors) in {s['seconds']:.1f} s, "
                     f"{s['images_per_s']} images/s; {s['skipped']} of {s['inputs']} inputs were already done")


@cli.command("stylize")
@click.argument("contents", nargs=-1, required=True)
@click.option("--style", default=None, help="Style image (--optimize; a --model has its style baked in).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for NAME_styled.png.")
@click.option("--model", default=None, type=click.Path(), help="An exported stylizer (dlpipe train stylizer).")
@click.option("--optimize", is_flag=True, help="Optimise each image itself against --style (slow, any style).")
@click.option("--size", type=click.IntRange(min=4), default=None,
              help="Resize so the longer side is N pixels (default: the image's own size; 256 with --optimize).")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True, help="--optimize: steps.")
@OVERWRITE
@FAIL_FAST
@MAX_PIXELS
@DEVICE
@JSON
def stylize_cmd(contents, style, out, model, optimize, size, steps, overwrite, fail_fast, max_pixels, device,
                as_json) -> None:
    """Paint CONTENTS in a style: write NAME_styled.png to --out."""
    from dlpipe.apps.stylize import stylize_images

    rows = stylize_images(list(contents), out, style=style, model=model, optimize=optimize, size=size, steps=steps,
                          overwrite=overwrite, fail_fast=fail_fast, max_pixels=max_pixels, device=device,
                          progress=not as_json)

    def human(good: list[dict]) -> str:
        body = [[r["image"], r["output"], f"{r['width']}x{r['height']}", f"{r['seconds']:.2f}"] for r in good]
        plural = "s" * (len(good) != 1)
        return table(body, ["image", "output", "size", "seconds"]) + f"\n\nwrote {len(good)} image{plural} to {out}"

    _finish(rows, as_json, human)


@cli.command("encode")
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .npy file of features (N x F).")
@OVERWRITE
@FAIL_FAST
@MAX_PIXELS
@DEVICE
@JSON
def encode_cmd(model, images, out, overwrite, fail_fast, max_pixels, device, as_json) -> None:
    """Features of IMAGES (an autoencoder's code, a VAE's latent mean, an RBM's hidden units) to --out."""
    from dlpipe.apps.autoencode import encode_images

    rows = encode_images(model, list(images), out, overwrite=overwrite, device=device, fail_fast=fail_fast,
                         max_pixels=max_pixels)
    _finish(rows, as_json, lambda good: table([[r["image"], r["row"], r["features"]] for r in good],
                                              ["image", "row", "features"]) + f"\n\nwrote {out}")


@cli.command("denoise")
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for NAME.png outputs.")
@OVERWRITE
@FAIL_FAST
@MAX_PIXELS
@DEVICE
@JSON
def denoise_cmd(model, images, out, overwrite, fail_fast, max_pixels, device, as_json) -> None:
    """Clean IMAGES with an autoencoder package: NAME.png in --out, at each image's own size."""
    from dlpipe.apps.autoencode import denoise_images

    rows = denoise_images(model, list(images), out, overwrite=overwrite, device=device, fail_fast=fail_fast,
                          max_pixels=max_pixels)
    _finish(rows, as_json, lambda good: table([[r["image"], r["out"]] for r in good], ["image", "output"]))


@cli.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--dataset", default=None,
              help="shapes (embedded, no files) or mnist/fashion-mnist. Default: mnist when --data-dir holds it, "
                   "else shapes.")
@click.option("--model", default="lenet5", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: 8 on shapes, 2 on MNIST.")
@click.option("--quick", is_flag=True, help="A tiny run (seconds) that still goes through every stage.")
@DATA_DIR
@JSON
def demo_cmd(out, dataset, model, epochs, quick, data_dir, as_json) -> None:
    """The whole pipeline in one command: train, export, quantize, evaluate, bench, classify.

    Timings are interleaved rounds with rests; a * marks a number whose spread (p90/p10 of its calls) is
    over 2: the machine was too busy to trust it.
    """
    from dlpipe.apps.demo import run_demo
    from dlpipe.runtime.benchmark import SPREAD_FOOTNOTE, marked

    if dataset is None:
        dataset = "mnist" if data_dir and (Path(data_dir) / "MNIST" / "raw").is_dir() else "shapes"
    summary = run_demo(out=out, dataset=dataset, model=model, epochs=epochs, quick=quick, data_dir=data_dir)
    variants = summary["variants"]
    rows = [[v["variant"], f"{v['size_kib']:.0f}", f"{100 * v['accuracy']:.2f}%", v["agreement"],
             marked(v["p50_ms_b1"], v["spread_too_wide_b1"]),
             marked(v["throughput_b64"], v["spread_too_wide_b64"], digits=0)] for v in variants]
    busy = any(v["spread_too_wide_b1"] or v["spread_too_wide_b64"] for v in variants)
    human = (table(rows, ["variant", "KiB", "accuracy", "agrees w/ fp32", "p50 ms (b=1)", "img/s (b=64)"])
             + (f"\n{SPREAD_FOOTNOTE}" if busy else "")
             + "\n\nsample classifications (int8):\n"
             + table([[c["image"], c["truth"], c["label"], f"{c['score']:.3f}"] for c in summary["samples"]],
                     ["image", "truth", "predicted", "prob"])
             + _task_table(summary.get("tasks", []))
             + f"\n\nartifacts in {summary['out']}")
    emit(summary, as_json, human)


def _task_table(tasks: list[dict]) -> str:
    """The demo's other tasks: one row each, the task metric of every variant and what the app wrote."""
    if not tasks:
        return ""
    rows = [[t["task"], t["model"], t["metric"],
             ", ".join(f"{k} {v:.3g}" for k, v in t["scores"].items() if v is not None), t["sample"]] for t in tasks]
    return "\n\nother tasks:\n" + table(rows, ["task", "model", "metric", "results", "app"])


@cli.command("serve")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@DEVICE
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime threads per session.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True, help="Sessions per model.")
@click.option("--max-batch-size", type=click.IntRange(min=0), default=64, show_default=True,
              help="Rows per execution (0: no dynamic batching).")
@click.option("--preferred-batch-size", default=None, help="Comma-separated batch sizes run at once.")
@click.option("--max-queue-delay-ms", type=click.FloatRange(min=0), default=2.0, show_default=True)
@click.option("--idle-run/--no-idle-run", default=True, show_default=True,
              help="Run at once when no session is busy (Triton always waits out the delay).")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Queued requests per model; more are answered 503 with Retry-After.")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True)
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True)
@MAX_PIXELS
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="One JSON line per request.")
@click.option("--ui/--no-ui", default=False, show_default=True,
              help="Serve a web page at / to try the models in a browser (upload an image, see the task's answer).")
def serve_cmd(sources, host, port, device, threads, instances, max_batch_size, preferred_batch_size,
              max_queue_delay_ms, idle_run, max_queue, timeout_s, max_body_mb, max_pixels, access_log, ui) -> None:
    """Serve SOURCES (ONNX files, model package folders or Triton-layout repositories) over the Open Inference
    Protocol (KServe v2), with task endpoints under /v1."""
    from dlpipe.apps.serve.app import ServerLimits
    from dlpipe.apps.serve.repository import ModelSettings
    from dlpipe.apps.serve.run import serve

    settings = ModelSettings(max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                             preferred_batch_size=tuple(_ints(preferred_batch_size)) if preferred_batch_size else (),
                             max_queue=max_queue, instances=instances, threads=threads, device=device,
                             timeout_s=timeout_s, idle_run=idle_run)
    limits = ServerLimits(max_body_bytes=int(max_body_mb * 2**20), max_pixels=max_pixels)
    serve(list(sources), host, port, settings, limits, access_log=access_log, ui=ui)


@cli.command("export-repo")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Repository folder.")
@click.option("--max-batch-size", type=click.IntRange(min=0), default=64, show_default=True)
@click.option("--max-queue-delay-ms", type=click.FloatRange(min=0), default=2.0, show_default=True)
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@OVERWRITE
@JSON
def export_repo_cmd(models, out, max_batch_size, max_queue_delay_ms, instances, device, overwrite, as_json) -> None:
    """Write a Triton model repository (config.pbtxt per model) that `dlpipe serve` reads too."""
    from dlpipe.apps.serve.repository import ModelSettings
    from dlpipe.apps.serve.triton_repo import export_repository

    settings = ModelSettings(max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                             instances=instances)
    rows = export_repository(list(models), out, settings, device=device, overwrite=overwrite)
    emit(rows, as_json, table([[r["model"], r["task"], r["max_batch_size"], r["folder"]] for r in rows],
                              ["model", "task", "max batch", "folder"]))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dlpipe")


if __name__ == "__main__":
    sys.exit(main())
