"""The shape of the source, read with ``ast`` (nothing here imports the modules it checks).

* Layers point down: runtime < training < export < apps. A lower layer never imports a higher one, not even
  lazily inside a function, and the runtime imports no torch, torchvision or onnx.
* No import cycles between files (lazy imports inside functions count).
* No function longer than 80 lines.
* Generic code names no task: comparisons with a task name live in the task declarations (training/tasks/).

Each checker takes the repository root, so the self-checks at the bottom run it on a small fake tree and
show that it reports what it should (a checker that finds nothing to scan cannot pass silently).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The source folders, each installed as a subpackage of the `dlpipe` namespace (pyproject.toml's
# [tool.setuptools.package-dir]), with its layer: a module may import its own layer and the ones below.
LAYERS = {"runtime": 0, "training": 1, "export": 2, "apps": 3}

# The runtime is onnxruntime, numpy and pillow only (runtime/__init__.py): none of these, not even lazily.
# onnxscript and onnxconverter_common are listed too since both import onnx; pyarrow and ray belong to
# `dlpipe predict` in the apps (issue 14).
RUNTIME_FORBIDDEN = {"torch", "torchvision", "onnx", "onnxscript", "onnxconverter_common", "pyarrow", "ray"}

MAX_FUNCTION_LINES = 80

# `grep -rnE 'task (==|!=)|\.task (==|!=)|startswith\("dqn'` (single-quoted 'dqn too).
TASK_NAMING = re.compile(r"""task (==|!=)|\.task (==|!=)|startswith\(["']dqn""")
# The task declarations: the only place where code may compare against a task's name.
TASK_DECLARATIONS = ("training", "tasks")
# Guards on user input that must name a task, as (file relative to the repository, a fragment of the matching
# line). Each entry needs a comment saying which user input it guards. Initially empty.
ALLOWED_TASK_GUARDS: set[tuple[str, str]] = {
    # Fine-tuning replaces a classifier's head: a source checkpoint or a registered dataset of another task
    # is the user's mistake, refused with a clear message.
    ("training/finetune.py", 'if spec.task != "classification":'),
    ("training/finetune.py", 'if info.task != "classification":'),
    ("training/finetune.py", "if d.task == 'classification'"),
}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the root, posix
    line: int
    statement: str  # the source text of the import statement
    target: str  # the module imported: a dlpipe module resolved to a file's module where one exists

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.statement}"


# ----------------------------------------------------------------------------------------------------------------
# Reading the source


def source_files(root: Path) -> list[Path]:
    """Every .py file of the four source folders under ``root``."""
    return sorted(p for folder in LAYERS if (root / folder).is_dir() for p in (root / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


def module_name(root: Path, path: Path) -> str:
    """``training/models/fcn.py`` -> ``dlpipe.training.models.fcn``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["dlpipe", *parts])


def parse(root: Path, path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        pytest.fail(f"{path.relative_to(root)}:{e.lineno}: cannot be parsed: {e.msg}")


def known_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every module and package of the source folders."""
    return {module_name(root, p): p for p in source_files(root)}


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """A dotted name to the longest prefix that is a module file or package of the tree (or itself if none)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return name


def imports(root: Path, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in ``path``, at any depth (functions, classes, ``if``/``try`` blocks), relative ones resolved.

    ``import a.b.c`` imports ``a.b.c``; ``from a.b import c`` imports ``a.b.c`` when that is a module of the tree,
    else ``a.b``. dlpipe names are resolved to the nearest module of the tree; other names are kept as written.
    """
    source = path.read_text(encoding="utf-8")
    rel = path.relative_to(root).as_posix()
    here = module_name(root, path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(parse(root, path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)] if node.level > 1 else base_parts
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names = [base if alias.name == "*" or f"{base}.{alias.name}" not in modules else f"{base}.{alias.name}"
                     for alias in node.names]
        else:
            continue
        statement = " ".join((ast.get_source_segment(source, node) or "").split())
        for name in dict.fromkeys(names):
            target = _resolve(name, modules) if name.split(".")[0] == "dlpipe" else name
            found.append(Import(rel, node.lineno, statement, target))
    return found


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "dlpipe" else None


# ----------------------------------------------------------------------------------------------------------------
# The checkers: each returns its violations, one line each


def layer_violations(root: Path) -> list[str]:
    modules = known_modules(root)
    violations = []
    for module, path in modules.items():
        own = layer_of(module)
        for imp in imports(root, path, modules):
            other = layer_of(imp.target)
            if other is not None and other > own:
                violations.append(f"{imp.where()}  [{module.split('.')[1]} imports {imp.target.split('.')[1]}]")
            if own == LAYERS["runtime"] and imp.target.split(".")[0] in RUNTIME_FORBIDDEN:
                violations.append(f"{imp.where()}  [the runtime imports {imp.target.split('.')[0]}]")
    return violations


def import_graph(root: Path) -> dict[str, dict[str, list[Import]]]:
    """module -> {imported dlpipe module of the tree -> the imports that make that edge}."""
    modules = known_modules(root)
    graph: dict[str, dict[str, list[Import]]] = {m: {} for m in modules}
    for module, path in modules.items():
        for imp in imports(root, path, modules):
            if imp.target in modules:
                graph[module].setdefault(imp.target, []).append(imp)
    return graph


def strongly_connected_components(graph: dict[str, dict[str, list]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def cycle_violations(root: Path) -> list[str]:
    graph = import_graph(root)
    violations = []
    for component in strongly_connected_components(graph):
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        members = set(component)
        edges = dict.fromkeys(f"    {imp.where()}" for m in component for target, imps in sorted(graph[m].items())
                              if target in members for imp in imps)  # one line per statement
        violations.append(f"cycle between {', '.join(component)}:\n" + "\n".join(edges))
    return violations


def long_functions(root: Path) -> list[str]:
    violations = []
    for path in source_files(root):
        for node in ast.walk(parse(root, path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # from `def`: decorators excluded
                if length > MAX_FUNCTION_LINES:
                    violations.append(f"{path.relative_to(root).as_posix()}:{node.lineno}: {node.name} "
                                      f"is {length} lines")
    return violations


def task_naming_violations(root: Path) -> list[str]:
    violations = []
    for path in source_files(root):
        rel = path.relative_to(root)
        if rel.parts[:len(TASK_DECLARATIONS)] == TASK_DECLARATIONS:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if TASK_NAMING.search(line) and not any(rel.as_posix() == file and fragment in line
                                                    for file, fragment in ALLOWED_TASK_GUARDS):
                violations.append(f"{rel.as_posix()}:{number}: {line.strip()}")
    return violations


def _report(title: str, violations: list[str]) -> str:
    return f"{len(violations)} {title}:\n" + "\n".join(violations)


# ----------------------------------------------------------------------------------------------------------------
# The real tree


def test_the_scan_sees_the_source():
    files = source_files(REPO)
    assert len(files) > 30, [str(p) for p in files]
    assert {p.relative_to(REPO).parts[0] for p in files} == set(LAYERS)
    # and the import scan sees dlpipe imports in all four layers (lazy ones included)
    modules = known_modules(REPO)
    targets = {layer_of(i.target) for p in files for i in imports(REPO, p, modules)}
    assert set(LAYERS.values()) <= targets


def test_layers_only_point_down():
    violations = layer_violations(REPO)
    assert not violations, _report("imports that point up (runtime < training < export < apps), or torch/onnx "
                                   "in the runtime", violations)


def test_no_import_cycles_between_files():
    violations = cycle_violations(REPO)
    assert not violations, _report("import cycles between files (lazy imports count)", violations)


def test_no_function_longer_than_80_lines():
    violations = long_functions(REPO)
    assert not violations, _report(f"functions longer than {MAX_FUNCTION_LINES} lines", violations)


def test_generic_code_names_no_task():
    violations = task_naming_violations(REPO)
    assert not violations, _report(f"lines naming a task outside {'/'.join(TASK_DECLARATIONS)}/ (move the "
                                   "decision into the task's declaration)", violations)


# ----------------------------------------------------------------------------------------------------------------
# Self-checks of the checkers on a fake tree


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake(tmp_path):
    for folder in LAYERS:
        _write(tmp_path, f"{folder}/__init__.py", "")
    return tmp_path


def test_layer_checker_reports_lazy_relative_and_forbidden_imports(fake):
    _write(fake, "runtime/x.py", "def f():\n    from dlpipe.training import y\n")
    _write(fake, "runtime/torchy.py", "import numpy\n\ndef g():\n    import torch.nn as nn\n")
    _write(fake, "runtime/onnxy.py", "if True:\n    from onnx import helper\nimport onnxruntime\n")
    _write(fake, "training/y.py", "from dlpipe.runtime import x\nimport dlpipe.runtime.torchy\n")
    _write(fake, "training/rel.py", "class C:\n    def m(self):\n        from ..apps import cli\n")
    _write(fake, "export/ok.py", "from dlpipe.training.y import z\nfrom . import exporter\n"
                                 "from dlpipe import runtime\n")
    _write(fake, "export/up.py", "from dlpipe import apps\n")
    _write(fake, "apps/cli.py", "from dlpipe.export import ok\nfrom dlpipe.runtime.x import f\n")
    violations = layer_violations(fake)
    assert len(violations) == 5, violations
    assert any(v.startswith("runtime/x.py:2: from dlpipe.training import y") for v in violations), violations
    assert any(v.startswith("runtime/torchy.py:4: import torch.nn as nn") for v in violations), violations
    assert any(v.startswith("runtime/onnxy.py:2: from onnx import helper") for v in violations), violations
    assert any(v.startswith("training/rel.py:3: from ..apps import cli") for v in violations), violations
    assert any(v.startswith("export/up.py:1: from dlpipe import apps") for v in violations), violations
    assert "training imports apps" in next(v for v in violations if v.startswith("training/rel.py"))


def test_imports_resolve_to_module_files(fake):
    _write(fake, "training/models/__init__.py", "from .fcn import FCN\n")
    _write(fake, "training/models/fcn.py", "from ..registry import register\nfrom . import helpers\n")
    _write(fake, "training/registry.py", "import dlpipe.training.models.fcn as fcn\n")
    modules = known_modules(fake)
    targets = {i.statement: i.target for i in imports(fake, fake / "training/models/fcn.py", modules)}
    assert targets == {"from ..registry import register": "dlpipe.training.registry",
                       "from . import helpers": "dlpipe.training.models"}  # not a file: the package
    assert [i.target for i in imports(fake, fake / "training/models/__init__.py", modules)] == \
        ["dlpipe.training.models.fcn"]
    assert [i.target for i in imports(fake, fake / "training/registry.py", modules)] == \
        ["dlpipe.training.models.fcn"]


def test_cycle_checker_reports_lazy_cycles_and_self_imports(fake):
    _write(fake, "export/a.py", "def f():\n    from dlpipe.export.b import g\n")
    _write(fake, "export/b.py", "from dlpipe.export import c\n")
    _write(fake, "export/c.py", "import dlpipe.export.a\n")
    _write(fake, "export/d.py", "from dlpipe.export.a import f\n")  # into the cycle, not part of it
    _write(fake, "runtime/s.py", "def h():\n    from dlpipe.runtime.s import h\n")
    _write(fake, "training/fine.py", "from dlpipe.runtime import s\n")
    violations = cycle_violations(fake)
    assert len(violations) == 2, violations
    cycle = next(v for v in violations if "export" in v)
    assert cycle.startswith("cycle between dlpipe.export.a, dlpipe.export.b, dlpipe.export.c:")
    assert "export/a.py:2: from dlpipe.export.b import g" in cycle and "export/d.py" not in cycle
    assert any(v.startswith("cycle between dlpipe.runtime.s:") for v in violations)


def test_scc_on_a_long_chain_does_not_recurse():
    n = 5000
    graph = {str(i): {str(i + 1): []} for i in range(n)}
    graph[str(n)] = {"0": []}
    assert [len(c) for c in strongly_connected_components(graph)] == [n + 1]
    graph[str(n)] = {}
    assert len(strongly_connected_components(graph)) == n + 1


def test_length_checker_counts_from_def_to_the_last_line(fake):
    def body(indent):  # def + 79 lines = 80
        return "".join(f"{indent}x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))

    _write(fake, "apps/fns.py", f"@decorator\ndef fits():\n{body('    ')}class K:\n    @staticmethod\n"
                                f"    async def too_long():\n{body('        ')}        pass\n")
    line = 1 + MAX_FUNCTION_LINES + 3  # fits spans lines 2-81; then the class, the decorator, the def
    assert long_functions(fake) == [f"apps/fns.py:{line}: too_long is {MAX_FUNCTION_LINES + 1} lines"]


def test_task_checker_allows_only_the_task_declarations(fake):
    line = 'if spec.task == "detection":\n'
    _write(fake, "training/train.py", f"{line}if model.startswith(\"dqn-\"):\n    pass\nx = task != 'control'\n")
    _write(fake, "training/tasks/detection.py", line)
    _write(fake, "export/quantize.py", "tasks = {t.name: t for t in all_tasks}\n")
    assert task_naming_violations(fake) == ['training/train.py:1: if spec.task == "detection":',
                                            'training/train.py:2: if model.startswith("dqn-"):',
                                            "training/train.py:4: x = task != 'control'"]
