"""The layer rule of docs/architecture.md holds for every import in craft/, lazy ones included.

The layers are read from the document itself (its numbered "Layers" list), so the document and
the code cannot drift apart: a module in no layer, a layer naming a path that does not exist, or
an import of a higher layer fails here with the file and line.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "craft"
DOC = REPO / "docs" / "architecture.md"


def documented_layers(text: str) -> dict[str, int]:
    """{`craft/x/` or `craft/x.py`: layer number} from the numbered list of the Layers section."""
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    # An item: "N. " and its indented continuation lines; its paths come before " — ".
    for m in re.finditer(r"^(\d+)\. (.*(?:\n[ \t]+.*)*)", section, flags=re.M):
        head = m.group(2).split(" — ", 1)[0]
        for path in re.findall(r"`(craft/[\w/.]*)`", head):
            layers[path] = int(m.group(1))
    return layers


def unit_of(rel: str, units: dict[str, int]) -> str | None:
    """The documented path that holds the file `rel` (`craft/a/b.py`): longest match wins."""
    found = [u for u in units if rel == u or (u.endswith("/") and rel.startswith(u))]
    return max(found, key=len, default=None)


@functools.cache
def module_file(name: str) -> str | None:
    """`craft/x/y.py` or `craft/x/__init__.py` of a dotted module name, when it is a source file."""
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(REPO).as_posix()
    return None


def imported_file(name: str) -> str:
    """The source file an import of `name` loads, falling back to the nearest enclosing package
    (an extension module like `craft._C` counts as its package)."""
    parts = name.split(".")
    while parts:
        found = module_file(".".join(parts))
        if found is not None:
            return found
        parts.pop()
    raise AssertionError(f"{name}: not a module of the craft package")


def imports_of(source: str, rel: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every craft import in the source of file `rel`: top level, in
    functions, under TYPE_CHECKING, and `importlib.import_module("craft...")` with a literal."""
    package = Path(rel).parent.parts  # what a relative import starts from
    out: list[tuple[int, str]] = []
    tree = ast.parse(source, rel)
    # Imports are statements: walk statement bodies only (whole-tree walks are 10x slower), and
    # expressions only where `import_module` is called.
    nodes = list(_statements(tree.body))
    if "import_module" in source:
        nodes += [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package upwards
                base = list(package[: len(package) - node.level + 1])
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for a in node.names:  # `from craft import ops` imports the module craft.ops
                sub = f"{module}.{a.name}"
                out.append((node.lineno, sub if module_file(sub) else module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in out if name == "craft" or name.startswith("craft.")]


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    for stmt in body:
        yield stmt
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            inner = getattr(stmt, field, None)
            if isinstance(inner, list):
                yield from _statements(inner)


@pytest.fixture(scope="module")
def layers() -> dict[str, int]:
    found = documented_layers(DOC.read_text(encoding="utf-8"))
    # The document must still hold the list this test reads (a reworded list fails, not passes).
    assert len(set(found.values())) >= 8 and "craft/training/" in found, found
    return found


def test_every_documented_path_exists_and_every_module_has_a_layer(layers: dict[str, int]) -> None:
    missing = [u for u in layers if not (REPO / u).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"
    unplaced = [
        p.relative_to(REPO).as_posix()
        for p in sorted(PACKAGE.rglob("*.py"))
        if unit_of(p.relative_to(REPO).as_posix(), layers) is None
    ]
    assert not unplaced, f"modules in no layer of docs/architecture.md: {unplaced}"


def test_no_module_imports_a_higher_layer(layers: dict[str, int]) -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        here = unit_of(rel, layers)
        for line, name in imports_of(path.read_text(encoding="utf-8"), rel):
            there = unit_of(imported_file(name), layers)
            if here is None or there is None or layers[there] > layers[here]:
                violations.append(
                    f"{rel}:{line} imports {name} (layer {layers.get(there or '', '?')}) from "
                    f"layer {layers.get(here or '', '?')}"
                )
    assert not violations, "imports against the layer rule:\n" + "\n".join(violations)


def test_the_scan_sees_lazy_relative_and_aliased_imports() -> None:
    """The scanner itself: an import hidden in a function, a relative one, `from craft import x`
    and a literal `import_module` are all found (a scanner that missed them would pass anything)."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from craft.training.trainer import Trainer\n"
        "def f():\n"
        "    from craft.generation import generate\n"
        "    from .. import evaluation\n"
        "    from . import step\n"
        "    import importlib\n"
        "    importlib.import_module('craft.cli.main')\n"
    )
    found = sorted(name for _, name in imports_of(source, "craft/training/x.py"))
    assert found == [
        "craft.cli.main",
        "craft.evaluation",
        "craft.generation",
        "craft.training.step",
        "craft.training.trainer",
    ]
