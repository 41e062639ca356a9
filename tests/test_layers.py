"""The package's layers, read from the source: the core, the harness and the demo import only
downwards, no modules import each other in a circle, and the command line starts light.

Layers (docs/architecture.md): `ueo` (the core, every `ueo/*.py` but `cli.py`) imports neither
`ueo.bench` nor `ueo.demo`; `ueo.bench` imports only the core; `ueo.demo` may import both;
`ueo.cli` sits above all three.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "open_clip", "sklearn", "matplotlib")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node that can run: all depths (functions, methods, try blocks...), but not the
    body of `if TYPE_CHECKING:`, which only type checkers read."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, name: str, modules: set[str], package: str) -> set[str]:
    """The package's modules that `name` (at `path`) imports at run time, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from pkg import sub` imports the submodule `pkg.sub`; anything else comes
            # from `pkg` itself.
            targets = [
                f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                for alias in node.names
            ]
        for target in targets:
            # `import a.b.c` is (at least) a.b.c: the deepest module of ours on the path.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.split(".")[0] != package:
                continue
            # A module's own parent packages are always imported before it runs: not an edge.
            if target and not name.startswith(target + ".") and target != name:
                found.add(target)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    modules = set(files)
    return {name: imports_of(path, name, modules, package) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SRC, "ueo")


def layer(module: str) -> str:
    if module == "ueo.__main__" or module == "ueo.cli" or module.startswith("ueo.cli."):
        return "cli"  # the command, and `python -m ueo`
    for sub in ("bench", "demo"):
        if module == f"ueo.{sub}" or module.startswith(f"ueo.{sub}."):
            return sub
    return "core"


def test_the_graph_sees_every_module_and_import(graph):
    """The reader itself: it finds modules, relative imports and imports inside functions."""
    assert {"ueo", "ueo.api", "ueo.cli", "ueo.bench.sweep", "ueo.demo.runner"} <= set(graph)
    assert "ueo.clip" in graph["ueo.api"]
    assert "ueo.api" in graph["ueo"]  # the lazy import inside ueo.__getattr__
    assert "ueo.jobs" in graph["ueo.cli.adapt"]  # imported inside its `run`
    assert "ueo.inference" not in graph["ueo.diagnostics"]  # only under TYPE_CHECKING
    assert "ueo.recipe" not in graph["ueo.methods"] and "ueo.methods" in graph["ueo.recipe"]


def imports_outside(graph, of: str, allowed: tuple[str, ...]) -> list[str]:
    """The imports of layer `of`'s modules that land in a layer not in `allowed`."""
    return sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if layer(m) == of
        for t in targets
        if layer(t) not in allowed
    )


def test_core_imports_neither_the_harness_nor_the_demo(graph):
    wrong = imports_outside(graph, "core", ("core",))
    assert not wrong, f"the core reaches up a layer: {wrong}"


def test_harness_imports_only_the_core(graph):
    wrong = imports_outside(graph, "bench", ("core", "bench"))
    assert not wrong, f"ueo.bench reaches the demo or the CLI: {wrong}"


def test_only_the_command_line_imports_the_command_line(graph):
    users = {m for m, targets in graph.items() if any(layer(t) == "cli" for t in targets)}
    assert {layer(m) for m in users} == {"cli"} and "ueo.__main__" in users


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    """The check can fail: a cycle closed by an import inside a function, and a relative one."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    assert find_cycle(import_graph(tmp_path, "pkg")) is None


def _heavy_modules_after(code: str) -> dict:
    """Run `code` in a fresh interpreter; which heavy libraries did it import?"""
    probe = "\n".join(
        [
            "import json, sys",
            "try:",
            textwrap.indent(textwrap.dedent(code).strip(), "    "),
            "except SystemExit as exc:",
            "    code = exc.code",
            "else:",
            "    code = None",
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]",
            "print('\\nRESULT ' + json.dumps({'exit': code, 'heavy': heavy}))",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return {**json.loads(line[len("RESULT ") :]), "stdout": done.stdout}


def test_building_the_parser_imports_no_heavy_library():
    result = _heavy_modules_after("from ueo.cli import build_parser\nbuild_parser()")
    assert result["heavy"] == []


@pytest.mark.parametrize(
    "argv", [["--help"], ["adapt", "--help"], ["bench", "--help"], ["--version"]]
)
def test_help_and_version_import_no_heavy_library(argv):
    result = _heavy_modules_after(f"from ueo.cli import main\nmain({argv!r})")
    assert result["exit"] == 0
    assert result["heavy"] == [], f"ueo {' '.join(argv)} imported {result['heavy']}"
    assert ("usage: ueo" in result["stdout"]) or ("ueo 0.1.0" in result["stdout"])


def test_the_core_runs_without_matplotlib():
    """matplotlib is the harness's extra: the whole core loads without it. (The probe can
    fail: the core does import torch.)"""
    result = _heavy_modules_after("import ueo.api, ueo.jobs, ueo.reports")
    assert "torch" in result["heavy"] and "matplotlib" not in result["heavy"]


def test_ueo_module_entry_point_help_stays_light():
    """`python -m ueo.cli --help` as a user runs it: -X importtime lists every import."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ueo.cli", "adapt", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--lr-prompt" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "ueo.recipe" in imported  # the trace is real
    assert not {m for m in imported if m.split(".")[0] in HEAVY}
