"""Fuzz campaign (issue 12): the targets of ``tests/test_fuzz.py`` (damaged image, ONNX and checkpoint files,
every PIL mode and size, random arrays into the engine and every predictor, malformed metadata and manifests),
run for longer than the suite does, unseeded. Counts the inputs tried per target (hypothesis's shrinking
included) and lists every escape (an exception other than dlpipe's own) with its minimal input.

With ``--atheris``, the file targets (image, ONNX, checkpoint) also run coverage-guided under atheris
(libFuzzer over the instrumented Python code), each in a subprocess, from the valid files as the corpus.

    python bench/fuzz.py --seconds 180
    python bench/fuzz.py --examples 2000 --target image_file --target checkpoint_file
    python bench/fuzz.py --seconds 120 --atheris
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import write_result  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import test_fuzz  # noqa: E402
from dlpipe.apps.output import table  # noqa: E402
from test_fuzz import TARGETS, FuzzModels, build_models  # noqa: E402

ROUND = 50  # examples per hypothesis run; each run has its own seed
ATHERIS_TARGETS = ("image_file", "onnx_file", "checkpoint_file")


def _escapes(exc: BaseException) -> list[dict[str, str]]:
    """Each escape in ``exc`` (hypothesis groups distinct failures) as its type, first message line and
    hypothesis's minimal example."""
    if isinstance(exc, BaseExceptionGroup):
        return [found for sub in exc.exceptions for found in _escapes(sub)]
    notes = "\n".join(getattr(exc, "__notes__", []))
    example = notes.split("Falsifying example:", 1)[-1].strip() if "Falsifying example" in notes else notes
    line = (str(exc).strip().splitlines() or [""])[0]
    return [{"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": line[:300],
             "example": example[:2000]}]


def campaign(models: FuzzModels, name: str, examples: int | None, seconds: float | None) -> dict:
    """Run target ``name`` for ``examples`` inputs or ``seconds``, whichever is given (both: the first reached)."""
    target = TARGETS[name]
    tried = 0
    escapes: dict[tuple[str, str], dict] = {}

    def check(example) -> None:
        nonlocal tried
        tried += 1
        target.check(models, example)

    test_fuzz.OUTCOMES.clear()
    start = time.perf_counter()
    run = 0
    while (examples is None or tried < examples) and (seconds is None or time.perf_counter() - start < seconds):
        @seed(run)
        @settings(max_examples=ROUND, database=None, deadline=None, suppress_health_check=list(HealthCheck))
        @given(target.strategy)
        def fuzz(example):
            check(example)

        run += 1
        try:
            fuzz()
        except Exception as exc:  # an escape: keep its minimal example and go on with the next seed
            for found in _escapes(exc):
                escapes.setdefault((found["type"], found["message"]), found)
    return {"inputs": tried, "hypothesis_runs": run, "seconds": round(time.perf_counter() - start, 1),
            "calls": dict(test_fuzz.OUTCOMES), "escapes": list(escapes.values())}


def atheris_campaign(folder: Path, name: str, seconds: int) -> dict:
    """Coverage-guided bytes for a file target, in a subprocess (libFuzzer ends its process). The corpus and
    any crash file live in a temporary folder; a crash's input is kept in the result (hex, first 512 bytes)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"atheris_{name}_") as work:
        proc = subprocess.run([sys.executable, __file__, "--atheris-worker", name, "--models", str(folder),
                               "--corpus", work, "--seconds", str(seconds)], capture_output=True, text=True)
        crashes = [{"file": f.name, "bytes": f.stat().st_size, "head_hex": f.read_bytes()[:512].hex()}
                   for f in Path(work).glob("crash-*")]
    done = re.findall(r"Done (\d+) runs", proc.stderr)
    escaped = "Uncaught Python exception" in proc.stderr
    traceback = proc.stderr.split("=== Uncaught Python exception: ===", 1)[-1][:2000] if escaped else ""
    executed = re.findall(r"stat::number_of_executed_units: (\d+)", proc.stderr)
    return {"inputs": int((done or executed or [0])[-1]), "seconds": round(time.perf_counter() - start, 1),
            "returncode": proc.returncode,
            "escapes": [{"type": "uncaught", "traceback": traceback, "inputs": crashes}] if escaped else []}


def _instrument(atheris, prefixes: tuple[str, ...]) -> None:
    """Coverage instrumentation for the functions and methods of the loaded modules under ``prefixes`` only
    (``atheris.instrument_all`` takes over a minute on everything numpy, hypothesis and pytest load)."""
    import inspect

    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefixes):
            continue
        for obj in list(vars(module).values()):
            members = vars(obj).values() if inspect.isclass(obj) and obj.__module__ == name else [obj]
            for fn in members:
                fn = getattr(fn, "__func__", fn)  # static and class methods
                if inspect.isfunction(fn) and fn.__module__ == name:
                    try:
                        atheris.instrument_func(fn)
                    except Exception:  # a function whose bytecode atheris cannot patch stays uninstrumented
                        pass


def atheris_worker(folder: Path, name: str, seconds: int, work: Path) -> None:
    """libFuzzer's loop over ``name``'s check, the bytes being the whole file (the corpus: the valid files)."""
    import atheris

    models = FuzzModels.at(folder)
    corpus = work / "corpus"
    corpus.mkdir()
    if name == "checkpoint_file":
        import dlpipe.training.checkpoint  # noqa: F401  (loaded before instrumenting)
    if name == "image_file":
        seeds = {f"{n}.bin": test_fuzz.seed_file(n) for n in test_fuzz.SEED_FILES}
    else:
        seeds = {"seed.bin": models.files["policy" if name == "onnx_file" else "checkpoint"].read_bytes()}
    for file, data in seeds.items():
        (corpus / file).write_bytes(data)
    predictors = test_fuzz.IMAGE_PREDICTORS

    def one_input(data: bytes) -> None:
        if not data:
            return
        if name == "image_file":  # the last byte picks the predictor; the file is the bytes as they are
            target = models.folder / "atheris.img"
            target.write_bytes(data)
            image = test_fuzz.expect(lambda: test_fuzz.open_image(target), target)
            if image is not None and image.width * image.height <= test_fuzz.SMALL_IMAGE:
                test_fuzz._predict_image(models, predictors[data[-1] % len(predictors)], target, target)
        elif name == "onnx_file":
            test_fuzz.check_onnx_file(models, (("random", data), 1))
        else:
            test_fuzz.check_checkpoint_file(models, ("random", data))

    _instrument(atheris, ("dlpipe", "PIL", "torch.serialization", "torch._weights_only_unpickler"))
    longest = max(len(data) for data in seeds.values()) + 4096
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-rss_limit_mb=8192", f"-max_len={longest}",
                   "-print_final_stats=1", f"-artifact_prefix={work}/", str(corpus)], one_input)
    atheris.Fuzz()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=None, help="total time, shared equally by the targets")
    p.add_argument("--examples", type=int, default=None, help="inputs per target (default 200 without --seconds)")
    p.add_argument("--target", action="append", choices=sorted(TARGETS), help="fuzz only these (repeatable)")
    p.add_argument("--atheris", action="store_true", help="also run the file targets under atheris (a quarter "
                   "of --seconds)")
    p.add_argument("--models", default=None, help="folder of the tiny models (built there when missing)")
    p.add_argument("--json", default=None, help="result file (default bench/results/fuzz.json)")
    p.add_argument("--atheris-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.atheris_worker:
        atheris_worker(Path(args.models), args.atheris_worker, int(args.seconds), Path(args.corpus))
        return
    if args.atheris and importlib.util.find_spec("atheris") is None:
        p.error("--atheris needs atheris (pip install atheris)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dlpipe_fuzz_") as scratch:
        folder = Path(args.models or scratch)
        models = FuzzModels.at(folder) if (folder / "fuzzed").is_dir() else build_models(folder)
        build_seconds = time.perf_counter() - start
        results = run_targets(models, folder, args)
    total = sum(r["inputs"] for r in results.values())
    escapes = sum(len(r["escapes"]) for r in results.values())
    print(table([[name, r["inputs"], f"{r['seconds']:.1f}", len(r["escapes"])] for name, r in results.items()],
                ["target", "inputs", "seconds", "escapes"]))
    for name, r in results.items():
        for e in r["escapes"]:
            print(f"ESCAPE {name}: {e}")
    path = write_result("fuzz", {"targets": results, "inputs": total, "escapes": escapes,
                                 "model_build_seconds": round(build_seconds, 1),
                                 "seconds": round(time.perf_counter() - start, 1)}, args.json)
    print(f"{total} inputs, {escapes} escapes; wrote {path}")


def run_targets(models: FuzzModels, folder: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Each chosen target for ``--examples`` inputs or its share of ``--seconds`` (a quarter of the time goes
    to atheris when asked for), then the atheris campaigns."""
    names = args.target or list(TARGETS)
    examples = args.examples if args.examples or args.seconds else 200
    share, atheris_share = None, 0.0
    if args.seconds:
        atheris_share = args.seconds / 4 if args.atheris else 0.0
        share = (args.seconds - atheris_share) / len(names)
    results = {name: campaign(models, name, examples, share) for name in names}
    if args.atheris:
        per = max(10, int(atheris_share / len(ATHERIS_TARGETS))) if args.seconds else 30
        results |= {f"atheris:{name}": atheris_campaign(folder, name, per) for name in ATHERIS_TARGETS}
    return results

if __name__ == "__main__":
    main()
