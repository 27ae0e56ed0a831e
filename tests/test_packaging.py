"""The wheel holds every module of the four folders, under the dlpipe namespace, and the server's web page."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("dlpipe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"dlpipe/{p.relative_to(REPO).as_posix()}" for folder in ("training", "export", "runtime", "apps")
                for p in (REPO / folder).rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    page = {f"dlpipe/{p.relative_to(REPO).as_posix()}" for p in (REPO / "apps" / "serve" / "static").iterdir()}
    assert page and page <= names, sorted(page - names)  # the web page of `dlpipe serve --ui` installs too
    assert not any(n.startswith(("training/", "runtime/", "tests/")) for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
