"""The house rules a reader relies on: imports point one way (pipelines -> distill -> storage; the
run layer over the teacher, train and eval libraries), no module is part of an import cycle
(function-local imports counted: they hide a cycle, they do not remove it), and loading a config
imports neither torch nor vLLM nor transformers. That every shipped config builds is
``tests/distill/test_config.py::test_shipped_config_loads``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "storage", "pipelines")
# what a config load must not import: torch, vLLM and transformers each cost seconds, and the
# datasets library most of a second; a config error should come back at once
HEAVY = ("torch", "vllm", "transformers", "datasets")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """Every module ``name`` imports, anywhere in its body (function-local imports included), by
    its full dotted name, with the line of the first such import: ``from pkg import sub`` names
    ``pkg.sub`` when that is one of our modules, else ``pkg``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """Our modules and, for each, the modules it imports (ours and third-party) with a line."""
    modules = our_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle among our modules (``[a, b, ..., a]``), or None: depth-first search,
    a cycle is an edge back to a module still on the stack."""
    ours = {n: sorted(t for t in targets if t in graph and t != n) for n, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in ours[node]:
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(ours):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def path_of(name: str) -> str:
    return str(our_modules()[name].relative_to(REPO))


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    modules = our_modules()
    return (
        " -> ".join(f"{a} ({modules[a].relative_to(REPO)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:]))
        + f" -> {cycle[-1]}"
    )


def violations(graph: dict[str, dict[str, int]], importer: str, forbidden: tuple[str, ...]) -> list[str]:
    """``module:line imports target`` for each import by a module in ``importer`` (a package or
    module prefix) of a module under one of the ``forbidden`` prefixes."""
    modules = our_modules()
    out = []
    for name, targets in sorted(graph.items()):
        if name != importer and not name.startswith(importer + "."):
            continue
        for target, line in sorted(targets.items()):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                out.append(f"{modules[name].relative_to(REPO)}:{line} imports {target}")
    return out


def test_the_graph_sees_function_local_and_relative_imports(tmp_path):
    """The parser counts what hides a cycle: an import inside a function, and a relative one."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from . import a\nimport numpy\n")
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["pkg.a"] == {"pkg.b": 2} and graph["pkg.b"] == {"pkg.a": 1, "numpy": 2}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    del graph["pkg.b"]["pkg.a"]
    assert find_cycle(graph) is None


def test_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {describe(cycle, graph)}"


@pytest.mark.parametrize(
    "importer,forbidden",
    [
        ("storage", ("distill", "pipelines", "dagster")),  # the shard format knows no models or orchestration
        # the library and run layer never depend on the Dagster shell; dagster_pipes (the
        # dependency-free client of the Pipes protocol a torchrun rank reports through) is not dagster
        ("distill", ("pipelines", "dagster")),
        # the libraries (teacher, train, eval) never call back into the run layer that drives them
        ("distill.teacher", ("distill.run",)),
        ("distill.train", ("distill.run",)),
        ("distill.eval", ("distill.run",)),
    ],
)
def test_imports_point_one_way(importer, forbidden):
    assert violations(import_graph(), importer, forbidden) == []


def test_nothing_a_config_load_reaches_imports_a_heavy_library():
    """Every module of ours that ``distill.config`` reaches (through any import, function-local
    ones included) imports none of ``HEAVY``, not even lazily: a config module that needs one
    is in the wrong place."""
    graph = import_graph()
    reached, todo = set(), ["distill.config"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += [t for t in graph[name] if t in graph]
    assert {"distill.configbase", "distill.data", "distill.run.config", "distill.teacher.config"} <= reached
    assert [v for name in sorted(reached) for v in violations(graph, name, HEAVY) if v.startswith(path_of(name))] == []


def test_loading_a_config_imports_no_heavy_library():
    """In a fresh interpreter (this one has imported torch for other tests): load the demo config
    and list what of ``HEAVY`` is imported."""
    code = (
        "import json, sys\n"
        "from distill.config import load_config\n"
        "load_config('configs/demo.yaml')\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
