"""Model cards in the Hugging Face convention (issue 18): a README.md with YAML front matter (licence, tags,
datasets, pipeline tag and a ``model-index`` of the measured metrics per precision), then what the model is
for, its inputs, outputs and labels, how it was trained, its evaluation, latency and quantization, its known
limitations and how to run it. Everything comes from the model's dlpipe metadata (read through the torch-free
runtime) and from the JSON that ``dlpipe evaluate --json`` and ``dlpipe bench --out`` wrote; nothing is made up.
Front matter schema: huggingface/hub-docs ``modelcard.md``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from dlpipe.runtime.benchmark import SPREAD_FOOTNOTE, marked
from dlpipe.runtime.captioner import is_package, read_manifest
from dlpipe.runtime.engine import Engine
from dlpipe.runtime.errors import InputError, ModelFileError, UsageError
from dlpipe.runtime.files import atomic_output
from dlpipe.runtime.formats import QUANTIZED, labelled_text, variant_path
from dlpipe.runtime.metadata import ModelInfo
from dlpipe.runtime.predictors import PACKAGES, PREDICTORS

Source = str | Path | dict | list  # a JSON file, or its content already loaded


@dataclass(frozen=True)
class TaskCard:
    """What a card says about one task. Text fields are templates over ``n`` (the number of labels),
    ``vocabulary`` (of a captioner) and ``model`` (the model's file name).

    Attributes:
        pipeline_tag: The Hugging Face pipeline tag (also the model-index task type).
        purpose: What the model does, one sentence.
        command: The dlpipe command that runs it.
        usage: Python lines after ``model = load(...)``.
        closed_set: What its fixed label set (or vocabulary, or style) means for a user, when it has one.
        trained_in: How the training data is named: a ``dataset`` or an ``environment``.
    """

    pipeline_tag: str | None
    purpose: str
    command: str = ""
    usage: tuple[str, ...] = ()
    closed_set: str | None = None
    trained_in: str = "dataset"


TASK_CARDS: dict[str, TaskCard] = {
    "classification": TaskCard(
        "image-classification", "Assigns an image one of {n} labels, with a probability for each.",
        "dlpipe classify {model} image.png", ('result = model.predict("image.png", top_k=3)[0]',
                                              "print(result.label, result.score)"),
        "It knows only these {n} labels: an image of anything else still gets one of them."),
    "segmentation": TaskCard(
        "image-segmentation", "Gives every pixel of an image one of {n} labels (a mask at the image's own size).",
        "dlpipe segment {model} image.png --out masks/", ('result = model.predict("image.png")[0]',
                                                          "print(result.shares)  # each label's share of the pixels"),
        "Every pixel gets one of these {n} labels, whatever it shows."),
    "detection": TaskCard(
        "object-detection", "Finds objects of {n} labels in an image, as boxes with a label and a score.",
        "dlpipe detect {model} image.png --out boxes/", ('for d in model.predict("image.png", threshold=0.5)[0]:',
                                                         "    print(d.label, d.score, d.box)"),
        "It finds objects of these {n} labels only."),
    "captioning": TaskCard(
        "image-to-text", "Writes a sentence describing an image.", "dlpipe caption {model} image.png",
        ('print(model.predict("image.png")[0].sentence)',),
        "Its sentences use only the {vocabulary} words of its vocabulary."),
    "generation": TaskCard(
        "unconditional-image-generation", "Draws new images like those it was trained on, from random latents.",
        "dlpipe generate {model} --out grid.png", ("images = model.generate(16, seed=0)  # uint8, N x H x W x C",)),
    "stylization": TaskCard(
        "image-to-image", "Repaints an image in the one style it was trained for.",
        "dlpipe stylize image.png --model {model} --out styled/",
        ('styled = model.stylize("image.png")[0]  # uint8, H x W x 3',),
        "It paints only the style it was trained for."),
    "reconstruction": TaskCard(
        "image-to-image", "Encodes an image into a short code and rebuilds (denoises) it from that code.",
        "dlpipe denoise {model} image.png --out clean/", ('clean = model.predict("image.png")[0]  # uint8 image',
                                                          'code = model.encode("image.png")  # N x code size')),
    "features": TaskCard(
        "image-feature-extraction", "Turns an image into a feature vector.",
        "dlpipe encode {model} image.png --out features.npy", ('features = model.encode("image.png")  # N x F',)),
    "control": TaskCard(
        "reinforcement-learning", "Chooses an action for an observation of its environment (a DQN policy).",
        "dlpipe play {model} --episodes 10", ("output = model.predict(observations)  # a batch of observations",
                                              "print(output.actions, output.q_values)"),
        trained_in="environment"),
}
# Keys of an evaluate report that count things rather than measure the model.
BOOKKEEPING = ("images", "seconds", "batch", "limit", "episodes")
# Keys of the training configuration that say where and how a run ran on its machine, not its recipe.
RUN_LOCAL = ("out", "data_dir", "progress", "threads", "download", "resume")
MAX_LABELS = 50  # labels listed in full; more are cut, with their count
POLICIES = {"stretch": "stretched to it, aspect ratio not kept",
            "center-crop": "shorter side resized to {resize_size}, the centre cut out: the borders are not seen",
            "letterbox": "fitted inside it with the aspect ratio kept, the rest padded with black"}
NOT_EVALUATED = "Not evaluated: pass `--eval` with the JSON of `dlpipe evaluate --json`."
NOT_BENCHED = "Not measured: pass `--bench` with the JSON of `dlpipe bench --out FILE`."


@dataclass
class _Model:
    """What a card is written from: the model's file (or package folder), its metadata, its graphs' engines and
    the quantization records of the model and of the variants beside it (precision -> (file, record))."""

    path: Path
    info: ModelInfo
    engines: dict[str, Engine]
    quantized: dict[str, tuple[str, dict]] = field(default_factory=dict)

    @property
    def raw(self) -> dict[str, Any]:
        return self.info.raw

    @property
    def name(self) -> str:
        return self.info.model or self.path.stem

    @property
    def task(self) -> TaskCard:
        return TASK_CARDS.get(self.info.task, TaskCard(None, f"A {self.info.task} model."))

    def words(self, text: str) -> str:
        return text.format(n=len(self.info.labels), vocabulary=len(self.raw.get("vocabulary") or ()),
                           model=self.path.name)


def _open(model: str | Path) -> _Model:
    """The model's metadata and graphs (an ONNX file, or a package folder or manifest).

    Raises:
        ModelFileError: missing, unreadable, or without dlpipe metadata.
    """
    if is_package(model):
        manifest, doc = read_manifest(model)
        info = ModelInfo.from_json(json.dumps(doc), f"'{manifest}'")
        engines = {part: Engine(manifest.parent / file, device="cpu", graph_optimization="disable")
                   for part, file in doc["graphs"].items()}
        found = _Model(manifest.parent if Path(model).is_dir() else manifest, info, engines)
        for precision, name in {info.precision: manifest.name, **(doc.get("variants") or {})}.items():
            variant = manifest.parent / str(name)
            written = read_manifest(variant)[1] if variant.is_file() else {}
            if written.get("quantization"):  # part -> precision and method, and the package's agreement gate
                found.quantized[precision] = (variant.name, {**written["quantization"], "gate": written.get("gate")})
        return found
    engine = Engine(model, device="cpu", graph_optimization="disable")
    if engine.info is None:
        raise ModelFileError(f"'{model}' has no dlpipe metadata (it was not written by 'dlpipe export'); "
                             "a card is written from that metadata")
    found = _Model(Path(model), engine.info, {"model": engine})
    if engine.info.raw.get("quantization"):
        found.quantized[engine.info.precision] = (found.path.name, engine.info.raw["quantization"])
    for precision in QUANTIZED:  # the variants `dlpipe quantize` wrote beside it, under their default names
        variant = variant_path(model, precision)
        if precision not in found.quantized and variant.is_file():
            quantization = Engine(variant, device="cpu", graph_optimization="disable").info
            if quantization is not None and quantization.raw.get("quantization"):
                found.quantized[precision] = (variant.name, quantization.raw["quantization"])
    return found


def _load(source: Source, what: str) -> Any:
    """The content of a JSON file (or the content itself when already loaded)."""
    if isinstance(source, (dict, list)):
        return source
    try:
        return json.loads(Path(source).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{what} '{source}' is not a readable JSON file ({type(exc).__name__}: {exc})") from None


def _evaluations(sources: Sequence[Source], model: _Model) -> list[dict]:
    """The evaluate reports in ``sources`` (each a list of reports, as ``--json`` prints them, or one report, as
    ``--plots`` writes it), checked to be of this model's task and labels, one per precision, dataset and split.

    Raises:
        InputError: not the JSON of ``dlpipe evaluate``. UsageError: a report of another model, or two of one
            precision on the same data.
    """
    reports, seen = [], set()
    for source in sources:
        doc = _load(source, "evaluation JSON")
        for report in doc if isinstance(doc, list) else [doc]:
            if not isinstance(report, dict) or not {"task", "precision", "metric"} <= set(report):
                raise InputError(f"'{source}' is not the JSON of `dlpipe evaluate --json` (a report has task, "
                                 "precision and metric)")
            labels = list(report.get("labels") or model.info.labels)
            if report["task"] != model.info.task or labels != list(model.info.labels):
                raise UsageError(f"the evaluation of '{report.get('model')}' in '{source}' is of another model "
                                 f"(a {report['task']} model with other labels) than '{model.path}'")
            key = (report["precision"], report.get("dataset"), report.get("split"))
            if key in seen:
                raise UsageError(f"two evaluations of the {key[0]} model on {key[1]} {key[2]}; give one per precision")
            seen.add(key)
            reports.append(report)
    return reports


def _benches(sources: Sequence[Source]) -> list[dict]:
    """The latency rows of ``dlpipe bench`` JSON files.

    Raises:
        InputError: not the JSON of ``dlpipe bench``.
    """
    rows = []
    for source in sources:
        doc = _load(source, "bench JSON")
        if not isinstance(doc, list) or not all(isinstance(r, dict) and {"name", "batch", "p50_ms"} <= set(r)
                                                for r in doc):
            raise InputError(f"'{source}' is not the JSON of `dlpipe bench --out FILE` (a list of name, batch, "
                             "p50_ms ... rows)")
        rows.extend(doc)
    return rows


def _metrics(report: dict) -> list[tuple[str, str, Any]]:
    """(key, name, value) of each metric in an evaluate report: its task metric first, then every other number
    (not a count, and not the task metric again under its long name)."""
    key, name = report["metric"], report.get("metric_name", report["metric"])
    rest = [(k, k, v) for k, v in report.items() if k not in (key, name, *BOOKKEEPING)
            and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ([(key, name, report[key])] if key in report else []) + rest


def _front_matter(model: _Model, reports: list[dict], license: str | None) -> dict[str, Any]:
    """The YAML front matter: licence, library, tags, datasets, pipeline tag and model-index."""
    tag = model.task.pipeline_tag
    precisions = list(dict.fromkeys([model.info.precision, *model.quantized, *(r["precision"] for r in reports)]))
    front: dict[str, Any] = {"license": license or "other", "library_name": "onnx",
                             "tags": list(dict.fromkeys(["dlpipe", "onnx", model.info.task, model.name, *precisions]))}
    datasets = list(dict.fromkeys(d for d in [model.raw.get("dataset"), *(r.get("dataset") for r in reports)] if d))
    if datasets:
        front["datasets"] = datasets
    if tag:
        front["pipeline_tag"] = tag
    if reports:
        front["model-index"] = [{"name": model.name, "results": [
            {"task": {"type": tag or model.info.task},
             "dataset": {"name": str(r.get("dataset")), "type": str(r.get("dataset")),
                         **({"split": r["split"]} if r.get("split") else {})},
             "metrics": [{"type": key, "value": value, "name": f"{name} ({r['precision']})"}
                         for key, name, value in _metrics(r)]} for r in reports]}]
    return front


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.5g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(map(str, value))
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True)
    else:
        text = "-" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows])


def _section(title: str, *parts: str) -> str:
    return "\n\n".join([f"## {title}", *(p for p in parts if p)])


def _intended_use(model: _Model) -> str:
    dataset = model.raw.get("dataset")
    data = (f"Trained on the {model.task.trained_in} `{dataset}`; it has not been validated on other data."
            if dataset else "Its training data is not recorded in its metadata.")
    return _section("Intended use", model.words(model.task.purpose), data)


def _shape(shape: Sequence[Any]) -> str:
    return " x ".join(str(d) for d in shape)


def _inputs(model: _Model) -> str:
    pre = model.raw.get("preprocessing") or {}
    rows = [[part, s.name, s.type, _shape(s.shape)] for part, e in model.engines.items() for s in e.inputs]
    tensors = _table(["graph", "input", "type", "shape"], rows)
    axes = model.raw.get("dynamic_axes") or {}
    dynamic = ("Dynamic axes: " + "; ".join(f"`{name}` " + ", ".join(f"{a}: {n}" for a, n in spec.items())
                                            for name, spec in axes.items()) + ".") if axes else ""
    # what the runtime applies: the metadata's values, and the runtime's defaults for those it leaves out
    steps = [[k, _shape(v) if k == "size" else v] for k, v in asdict(model.info.preprocessing).items()
             if v is not None] if pre else []
    how = ("Preprocessing (the runtime applies it to an image file or array; a raw tensor must be prepared "
           "this way: pixels x scale, minus mean, over std, per channel):\n\n" + _table(["step", "value"], steps)
           ) if steps else "The metadata describes no image preprocessing."
    return _section("Inputs and preprocessing", tensors, dynamic, how)


def _outputs(model: _Model) -> str:
    rows = [[part, s.name, s.type, _shape(s.shape)] for part, e in model.engines.items() for s in e.outputs]
    return _section("Outputs", _table(["graph", "output", "type", "shape"], rows))


def _labels(model: _Model) -> str:
    labels = model.info.labels
    if not labels:
        return ""
    shown = _table(["index", "label"], list(enumerate(labels[:MAX_LABELS])))
    more = f"... and {len(labels) - MAX_LABELS} more ({len(labels)} labels in all)." if len(labels) > MAX_LABELS else ""
    return _section("Labels", f"{len(labels)} labels, by class index:", shown, more)


def _training(model: _Model) -> str:
    args = model.raw.get("model_args") or {}
    arch = f"Architecture `{model.name}`" + (", with " + ", ".join(f"{k}={_cell(v)}" for k, v in args.items())
                                             if args else "") + "."
    recipe = model.raw.get("training") or {}
    rows = [[k, v] for k, v in recipe.items() if k not in RUN_LOCAL and v is not None]
    body = (_table(["setting", "value"], rows) if rows else
            "The training recipe is not recorded in this model's metadata.")
    metrics = model.raw.get("metrics") or {}
    recorded = (_table(["metric", "value"], sorted(metrics.items())) if metrics
                else "No metrics were recorded at training time.")
    return "\n\n".join([_section("Training", arch, body),
                        _section("Metrics recorded at training time", recorded)])


def _evaluation(reports: list[dict]) -> str:
    if not reports:
        return _section("Evaluation", NOT_EVALUATED)
    rows = [[Path(str(r.get("model", ""))).name, r["precision"], r.get("dataset"), r.get("split"), r.get("images"),
             name, value] for r in reports for _, name, value in _metrics(r)]
    return _section("Evaluation", "Measured by `dlpipe evaluate` through the ONNX runtime:",
                    _table(["model", "precision", "dataset", "split", "images", "metric", "value"], rows))


def _latency(stats: list[dict]) -> str:
    if not stats:
        return _section("Latency", NOT_BENCHED)
    rows = [[s["name"], s["batch"], marked(s["p50_ms"], s.get("spread_too_wide", False)),
             marked(s.get("p90_ms", float("nan")), False), marked(s.get("p99_ms", float("nan")), False),
             marked(s.get("throughput", float("nan")), s.get("spread_too_wide", False), digits=0)] for s in stats]
    noisy = SPREAD_FOOTNOTE if any(s.get("spread_too_wide") for s in stats) else ""
    return _section("Latency", "Measured by `dlpipe bench` (milliseconds per call; items per second at the median):",
                    _table(["variant", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s"], rows), noisy)


def _gate(gate: dict | None, precision: str = "variant") -> str | None:
    """The agreement gate a variant passed, in words; None when the file does not record it (older files)."""
    if not gate:
        return None
    labelled = gate.get("labelled_check")
    metric = f"; {labelled_text(labelled, precision)}" if labelled else ""
    passed = (f"; passed on accuracy: within --max-accuracy-drop {gate.get('max_accuracy_drop')} points of fp32's"
              if gate.get("passed_by") == "accuracy" else "")
    return (f"{gate['agreement']:.2%} {gate.get('agreement_name', '')} on {gate.get('check_inputs')} held-out inputs "
            f"(threshold {gate.get('min_agreement')}; max |diff| {gate.get('max_abs_diff', float('nan')):.3g}"
            f"{metric}{passed})")


def _quantized_file(record: dict) -> str:
    """One quantized file's record (written by ``dlpipe quantize``) as a table, and its int8 candidates."""
    convs = record.get("convolutions") or {}
    calibration = record.get("calibration") or {}
    int8 = record.get("precision") == "int8"
    cpu = record.get("cpu") if isinstance(record.get("cpu"), dict) else {}
    rows = [["method", record.get("method") if int8 else None],
            ["format", record.get("format")], ["format asked for", record.get("format_requested")],
            ["why this format", record.get("format_reason")],
            ["calibration", f"{record.get('calibration_method')}, {calibration.get('images')} inputs from "
                            f"{calibration.get('source')}" if calibration else None],
            ["per-channel weights", record.get("per_channel") if int8 else None],
            ["kept in float32", record.get("kept_fp32") or "none"],
            ["convolutions", f"{convs['integer']} of {convs['total']} run as integer kernels "
                             f"({convs['float']} in float), in onnxruntime's optimized graph on the machine that "
                             "quantized" if convs else None],
            ["quantized on", f"{cpu.get('model')} ({cpu.get('int8_isa')} int8 kernels)" if cpu else None],
            *([f"p50 ms at batch {b}: fp32 vs {record['precision']}", f"{v} vs {record['int8_p50_ms'].get(b)}"]
              for b, v in (record.get("fp32_p50_ms") or {}).items()),
            ["agreement with fp32 (gate)", _gate(record.get("gate"), record.get("precision") or "variant")],
            ["warning", record.get("warning") or None], ["quantized from", record.get("source")]]
    parts = [_table(["", "value"], [r for r in rows if r[1] not in (None, "")])]
    if record.get("candidates"):
        parts.append("int8 candidates built and measured:\n\n" + _table(
            ["candidate", "format", "integer convs", "float convs", "agreement with fp32", "p50 ms by batch"],
            [[c.get("name"), c.get("format"), c.get("integer_convs"), c.get("float_convs"), c.get("agreement"),
              ", ".join(f"b{b} {v}" for b, v in (c.get("p50_ms") or {}).items())
              or (f"same kernels as {c['same_kernels_as']}" if c.get("same_kernels_as") else None)]
             for c in record["candidates"]]))
    return "\n\n".join(parts)


def _quantization(model: _Model) -> str:
    if not model.quantized:
        return ""
    parts = [("`dlpipe quantize` writes a variant only after it agrees with fp32 on held-out inputs at least as "
              "well as its `--min-agreement` asks.")]
    for precision, (file, record) in model.quantized.items():
        if "precision" in record:  # one ONNX file's record
            parts += [f"### {precision} (`{file}`)", _quantized_file(record)]
        else:  # a package variant's manifest: part -> precision and method, and the gate the whole package passed
            gate = _gate(record.get("gate"))
            parts += [f"### {precision} (`{file}`)", _table(["graph", "precision", "method"], [
                [part, r.get("precision"), r.get("method")] for part, r in record.items()
                if isinstance(r, dict) and part != "gate"])]
            parts += [f"Agreement with fp32 (gate), the package as a whole: {gate}"] if gate else []
    return _section("Quantization", *parts)


def _limitations(model: _Model, reports: list[dict], stats: list[dict]) -> str:
    pre = model.raw.get("preprocessing") or {}
    facts = []
    if "size" in pre and pre.get("resize") != "none":
        how = POLICIES.get(pre.get("policy", "stretch"), pre.get("policy", "stretch"))
        facts.append(f"Every image is resized to {_shape(pre['size'])} pixels ({how.format(**pre)}) before the "
                     "model sees it.")
    elif pre.get("resize") == "none":
        facts.append(f"Images keep their size, padded up to a multiple of {pre.get('size_multiple', 1)} pixels.")
    if model.task.closed_set:
        facts.append(model.words(model.task.closed_set))
    if model.raw.get("dataset"):
        facts.append(f"It was trained on `{model.raw['dataset']}` only; how it does on other data is not measured.")
    facts += _precision_deltas(reports)
    facts += [f"The {p} variant's quantizer warned: {r['warning']}" for p, (_, r) in model.quantized.items()
              if isinstance(r.get("warning"), str) and r["warning"]]
    if stats:
        noisy = sum(bool(s.get("spread_too_wide")) for s in stats)
        facts.append("Latency was measured on the machine that ran `dlpipe bench`, which the JSON does not record; "
                     "it differs on other hardware." + (f" {noisy} of {len(stats)} measurements were too noisy to "
                                                        "trust (marked *)." if noisy else ""))
    return _section("Limitations", "\n".join(f"- {f}" for f in facts) or "None recorded.")


def _precision_deltas(reports: list[dict]) -> list[str]:
    """Each variant's task metric beside fp32's on the same data, from the evaluate reports."""
    fp32 = {(r.get("dataset"), r.get("split")): r for r in reports if r["precision"] == "fp32"}
    lines = []
    for r in reports:
        base = fp32.get((r.get("dataset"), r.get("split")))
        key = r["metric"]
        if base is None or r is base or not all(isinstance(x.get(key), (int, float)) for x in (r, base)):
            continue
        lines.append(f"{r['precision']} {r.get('metric_name', key)} on {r.get('dataset')} {r.get('split')}: "
                     f"{r[key]:.4g} vs fp32 {base[key]:.4g} ({r[key] - base[key]:+.4g}, {r.get('images')} vs "
                     f"{base.get('images')} inputs).")
    return lines


def _how_to_use(model: _Model) -> str:
    predictor = PREDICTORS.get(model.info.task) or PACKAGES.get(model.info.task)
    command = f"```bash\n{model.words(model.task.command)}\n```" if model.task.command else ""
    article = "an" if predictor and predictor.__name__[0] in "AEIOU" else "a"
    kind = f"  # {article} {predictor.__name__}, chosen from the metadata" if predictor else ""
    code = ["from dlpipe.runtime import load", "", f'model = load("{model.path.name}"){kind}', *model.task.usage]
    return _section("How to use", command, "```python\n" + "\n".join(code) + "\n```")


def _versions(model: _Model) -> str:
    rows = [[k, v] for k, v in sorted((model.raw.get("versions") or {}).items())]
    rows += [[k, model.raw[k]] for k in ("opset", "exporter", "format_version") if k in model.raw]
    return _section("Versions", _table(["", "version"], rows) if rows else "No versions are recorded.")


def model_card(model: str | Path, evaluations: Sequence[Source] = (), benches: Sequence[Source] = (),
               license: str | None = None) -> str:
    """The Markdown model card (YAML front matter first) of ``model``.

    Args:
        model: A dlpipe ONNX file, or a model package (folder or manifest).
        evaluations: JSON files written by ``dlpipe evaluate --json`` (or ``--plots``), or their content: one
            model-index result per precision.
        benches: JSON files written by ``dlpipe bench --out FILE`` (or ``--json``), or their content.
        license: A licence id from Hugging Face's list; ``other`` (and the card says it was not stated) when None.

    Raises:
        ModelFileError: not a dlpipe model. InputError: a JSON file that is not evaluate's or bench's.
        UsageError: an evaluation of another model, or two of one precision on the same data.
    """
    found = _open(model)
    reports, stats = _evaluations(evaluations, found), _benches(benches)
    front = yaml.safe_dump(_front_matter(found, reports, license), sort_keys=False, allow_unicode=True)
    precision = found.info.precision
    summary = (f"A {found.info.task} model (`{found.name}`, {precision}) in ONNX, exported by dlpipe. "
               + ("" if license else "Licence: not stated (no `--license` was given when this card was written)."))
    body = [f"# {found.name}", summary.strip(), _intended_use(found), _inputs(found), _outputs(found), _labels(found),
            _training(found), _evaluation(reports), _latency(stats), _quantization(found),
            _limitations(found, reports, stats), _how_to_use(found), _versions(found)]
    return f"---\n{front}---\n\n" + "\n\n".join(b for b in body if b) + "\n"


def write_card(model: str | Path, out: str | Path, evaluations: Sequence[Source] = (), benches: Sequence[Source] = (),
               license: str | None = None, overwrite: bool = False) -> Path:
    """Write :func:`model_card` to ``out`` atomically; returns ``out``.

    Raises:
        UsageError: ``out`` exists (without ``overwrite``) or is a folder; as :func:`model_card` otherwise.
    """
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"'{out}' is a folder; give the card's file name (README.md)")
    if out.exists() and not overwrite:
        raise UsageError(f"'{out}' already exists; pass --overwrite to replace it")
    text = model_card(model, evaluations, benches, license)
    with atomic_output(out) as tmp:
        tmp.write_text(text)
    return out
