"""The documentation site and the README stay true: the site builds with ``--strict`` (a broken
link, anchor or config reference fails), the generated config reference covers every field of
every config section, the YAML examples in the docs are configs the loader accepts, the files,
modules and class members the pages name exist, and the README's commands, links and demo
output match the Makefile, the files and the code."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import typing
from pathlib import Path

import yaml
from mkdocs.commands.build import build
from mkdocs.config import load_config

from distill.config import SECTIONS, RunConfig, from_mapping
from distill.eval.config import EvalConfig
from distill.eval.gate import gate
from distill.eval.report import summary_line

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
PACKAGES = ("distill", "storage", "pipelines")
# the pages whose code names are checked; results.md keeps history, which names what is gone
MANUAL = [README, REPO / "deploy" / "README.md", *sorted(p for p in DOCS.glob("*.md") if p.name != "results.md")]


def _reference_directives() -> list[str]:
    """The objects docs/config.md renders (``::: module.Class`` lines)."""
    return re.findall(r"^::: (\S+)$", (DOCS / "config.md").read_text(), re.M)


def _resolve(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _config_classes(cls: type, seen: set[type]) -> set[type]:
    """``cls`` and every dataclass its fields hold, directly or in a tuple (``teacher.models``)."""
    seen.add(cls)
    for hint in typing.get_type_hints(cls).values():
        for arg in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(arg) and arg not in seen:
                _config_classes(arg, seen)
    return seen


def test_site_builds_strict_with_every_config_field(tmp_path):
    site = tmp_path / "site"
    build(load_config(config_file=str(REPO / "mkdocs.yml"), strict=True, site_dir=str(site)))
    page = (site / "config.html").read_text()
    directives = _reference_directives()
    documented = {_resolve(path): path for path in directives}
    missing = _config_classes(RunConfig, set()) - set(documented)
    assert not missing, f"config sections without a reference in docs/config.md: {sorted(c.__name__ for c in missing)}"
    for cls, path in documented.items():
        for field in dataclasses.fields(cls):
            assert f'id="{path}.{field.name}"' in page, f"{path}.{field.name} is not in the generated reference"


def _yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", path.read_text(), re.M | re.S)


def test_yaml_examples_in_docs_are_valid_configs():
    checked = 0
    for path in [README, *sorted(DOCS.glob("*.md"))]:
        for block in _yaml_blocks(path):
            data = yaml.safe_load(block)
            assert isinstance(data, dict) and set(data) <= set(SECTIONS), (
                f"{path.name}: a yaml example that is not a run config (use another fence): {block[:80]!r}"
            )
            from_mapping(data, where=f"{path.name} example")
            checked += 1
    assert checked >= 5  # quick start, labelling (3), on-policy


def test_readme_commands_and_links_exist():
    text = README.read_text()
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.M))
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", text))
    assert {"demo", "test", "test-fast", "docs"} <= named
    assert named <= targets, f"the README names make targets the Makefile lacks: {sorted(named - targets)}"
    links = re.findall(r"\]\((?!https?://)([^)#\s]+)", text)
    assert links
    assert [link for link in links if not (REPO / link).exists()] == []


def _demo_lines(path: Path) -> tuple[str, str]:
    text = path.read_text()
    summary = re.search(r"^teacher_ppl=\d.*$", text, re.M).group(0)
    gate_line = re.search(r"^gate passed: .*$", text, re.M).group(0)
    return summary, gate_line


def test_readme_demo_output_is_what_the_code_prints():
    """The README's summary and gate lines (a recorded demo run) are exactly what
    ``summary_line`` and ``gate`` print for those numbers, and the results page records the
    same run."""
    summary, gate_line = _demo_lines(README)
    assert _demo_lines(DOCS / "results.md") == (summary, gate_line)
    values = {key: float(value) for key, value in re.findall(r"(\w+)=([\d.]+)", summary)}
    results = {
        name: {
            metric: values[f"{name}_{metric}"]
            for metric in ("ppl", "kl", "top1", "bpb", "kl_full")
            if f"{name}_{metric}" in values
        }
        for name in ("teacher", "student", "baseline")
    }
    init = re.search(r"vs student_init ([\d.]+): ok; bpb .* vs student_init ([\d.]+): ok$", gate_line)
    results["student_init"] = {"ppl": float(init.group(1)), "bpb": float(init.group(2))}
    assert summary_line(results) == summary
    passed, legs = gate(results, EvalConfig())
    assert passed and f"gate passed: {legs}" == gate_line


def _code_spans(path: Path) -> set[str]:
    """Inline code of a page (```` `...` ````), a call's arguments dropped: ``f(x)`` -> ``f``."""
    return {re.sub(r"\(.*\)$", "", span) for span in re.findall(r"`([^`\n]+)`", path.read_text())}


def _members(node: ast.AST) -> set[str]:
    """Names a module or class body defines: functions, classes, assignments, annotated fields, imports."""
    names = set()
    for child in node.body:
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(child.name)
        elif isinstance(child, ast.Assign):
            names |= {n.id for target in child.targets for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(child, ast.AnnAssign) and isinstance(child.target, ast.Name):
            names.add(child.target.id)
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in child.names}
    return names


def _classes() -> dict[str, tuple[set[str], list[str]]]:
    """Every class of our packages by name: the members it defines and the names of its bases."""
    found: dict[str, tuple[set[str], list[str]]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                    members, old = _members(node), found.get(node.name, (set(), []))
                    found[node.name] = (old[0] | members, old[1] + bases)
    return found


def _has_member(classes: dict, cls: str, name: str) -> bool:
    members, bases = classes[cls]
    return name in members or any(b in classes and _has_member(classes, b, name) for b in bases)


def _resolves(dotted: str, classes: dict) -> bool:
    """Whether ``pkg.module.name[.member]`` is a module of ours, or a name it defines (a member of
    a class it defines), or a string constant in our code (a footer key such as ``distill.shard``)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:cut])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.is_file():
            rest = parts[cut:]
            if not rest:
                return True
            if rest[0] not in _members(ast.parse(module.read_text())):
                break
            return len(rest) == 1 or (rest[0] in classes and _has_member(classes, rest[0], rest[1]))
    quoted = (f'"{dotted}"', f"'{dotted}'")
    return any(q in p.read_text() for package in PACKAGES for p in (REPO / package).rglob("*.py") for q in quoted)


def test_docs_name_files_modules_and_members_that_exist():
    """A page that names ``distill/run/pipeline.py``, ``distill.pipeline.x`` or ``ShardMeta.k``
    after the code moved fails here, naming the page and the name."""
    classes = _classes()
    path_name = re.compile(r"^(distill|storage|pipelines|benchmarks|configs|examples|tests|deploy|docs)/[\w./-]*$")
    missing = []
    for page in [*MANUAL, DOCS / "results.md"]:
        for span in sorted(_code_spans(page)):
            if path_name.match(span) and not (REPO / span).exists():
                missing.append(f"{page.name}: {span} (no such file)")
            if page not in MANUAL:
                continue  # history names what is gone
            if re.match(r"^(distill|storage|pipelines)\.[\w.]+$", span) and not _resolves(span, classes):
                missing.append(f"{page.name}: {span} (not defined in the code)")
            member = re.match(r"^([A-Z]\w+)\.(\w+)$", span)
            if member and member.group(1) in classes and not _has_member(classes, *member.groups()):
                missing.append(f"{page.name}: {span} (no such member)")
    assert missing == []
