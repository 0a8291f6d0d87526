"""scvi_fast imports one way: floors that import only from below, and no import cycles.

The floors (DESIGN.md, "Layout and dependency direction"), ground first:

    0  reference, data, _native (with the compiled scvi_fast._C)
    1  kernels
    2  functional
    3  module
    4  train, compat, analysis, metrics (side by side: they do not import each other)
    5  model (the user-facing SCVI class)
    6  scvi_fast/__init__.py (the package facade: re-exports SCVI, data, functional)
    7  cli

``metrics`` (integration metrics of an embedding) is analysis by DESIGN's layout; it is its own
unit on that floor. Every module is parsed with ``ast``: imports at module level, imports inside
functions (they run too, only later) and ``importlib.import_module`` calls whose name is a
literal (an f-string counts by its literal package prefix, e.g. ``f"scvi_fast.kernels.{name}"``
is an import of the kernels floor). Cycles are looked for over literal names only, imports
inside functions included: a circle hidden in a function is still a circle.

Known violations outside the ground floor are listed in ALLOWED_UPWARD / ALLOWED_CYCLES with
the reason each exists; the list is what the refactor towards DESIGN's layout must remove. An
entry that no longer matches a violation fails the test too, so the list stays honest.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "scvi_fast"

#: unit -> floor; a unit is the first name below ``scvi_fast`` ("" is the package facade)
FLOORS = {
    "reference": 0, "data": 0, "_native": 0,
    "kernels": 1,
    "functional": 2,
    "module": 3,
    "train": 4, "compat": 4, "analysis": 4, "metrics": 4,
    "model": 5,
    "": 6,
    "cli": 7,
}
#: modules that are not Python files here but belong to a unit
UNIT_OF_EXTRA = {"scvi_fast._C": "_native"}

#: Imports that break the floors today: (file, imported module) -> why it is there. Every
#: entry is for the refactor towards DESIGN's layout to remove; do not add to this list.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

#: Import cycles today: the set of modules in the cycle -> why it is there.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the repository root
    line: int
    source: str  # importing module
    target: str  # imported module (the longest name that is a module of the package)
    literal: bool  # False for an f-string whose tail is not known


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
KNOWN = set(MODULES) | set(UNIT_OF_EXTRA)


def _unit(module: str) -> str:
    if module in UNIT_OF_EXTRA:
        return UNIT_OF_EXTRA[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _longest_module(name: str) -> str:
    """``name`` itself if it is a module, else the closest enclosing module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in KNOWN:
            return candidate
    return name


def _literal_prefix(node: ast.expr, module: str) -> tuple[str | None, bool]:
    """The module name an ``import_module`` argument spells: ``(name, fully literal)``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value, True
    if isinstance(node, ast.JoinedStr):
        text = ""
        for part in node.values:
            if isinstance(part, ast.Constant):
                text += str(part.value)
            elif (isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name)
                  and part.value.id == "__name__"):
                text += module
            else:  # unknown tail: keep the package the literal part names
                return text.rpartition(".")[0] or None, False
        return text, True
    return None, False


def _imports_in(text: str, module: str, is_package: bool, rel: str) -> list[Import]:
    """The package imports of one module's source ``text``, wherever they are."""
    package = module if is_package else module.rpartition(".")[0]
    out = []

    def add(node, target, literal=True):
        if target and (target == "scvi_fast" or target.startswith("scvi_fast.")):
            out.append(Import(rel, node.lineno, module, _longest_module(target), literal))

    for node in ast.walk(ast.parse(text, filename=rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            for alias in node.names:
                sub = f"{base_name}.{alias.name}"
                # ``from pkg import sub`` imports the submodule; ``from pkg import attr`` pkg
                add(node, sub if sub in KNOWN else base_name)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in ("import_module", "__import__") and node.args:
                target, literal = _literal_prefix(node.args[0], module)
                add(node, target, literal)
    return out


def _imports(path: Path) -> list[Import]:
    return _imports_in(path.read_text(), _module_name(path), path.name == "__init__.py",
                       str(path.relative_to(ROOT)))


ALL_IMPORTS = [imp for p in MODULES.values() for imp in _imports(p)]


def _floor_rule(imp: Import) -> str | None:
    """Why ``imp`` breaks the floors, or None."""
    a, b = _unit(imp.source), _unit(imp.target)
    if a == b:
        return None
    fa, fb = FLOORS[a], FLOORS[b]
    name_a, name_b = a or "the package facade", b or "the package facade"
    if fb > fa:
        return (f"{name_a} (floor {fa}) imports {imp.target} ({name_b}, floor {fb}): "
                "nothing imports upwards")
    if fb == fa:
        return (f"{name_a} imports {imp.target} ({name_b}); both are on floor {fa}, side by "
                "side, and do not import each other")
    return None


def test_every_unit_has_a_floor():
    units = {_unit(m) for m in KNOWN}
    assert units <= set(FLOORS), f"place these in FLOORS (and DESIGN.md): {units - set(FLOORS)}"


def test_the_parser_sees_every_kind_of_import():
    # the layer test passes by seeing nothing if the walk misses a kind of import
    text = (
        "import numpy\n"
        "import scvi_fast\n"
        "from scvi_fast import data as _data, SCVI\n"
        "from . import _hvg\n"
        "from ..module import VAE\n"
        "def f(name):\n"
        "    import scvi_fast.train._trainer\n"
        "    import importlib\n"
        "    importlib.import_module('scvi_fast.analysis')\n"
        "    importlib.import_module(f'scvi_fast.kernels.{name}')\n"
        "    importlib.import_module(f'{__name__}._store')\n"
        "    importlib.import_module(name)\n"
    )
    got = [(i.line, i.target, i.literal)
           for i in _imports_in(text, "scvi_fast.data", True, "scvi_fast/data/__init__.py")]
    assert sorted(got) == [
        (2, "scvi_fast", True),
        (3, "scvi_fast", True),  # SCVI is an attribute of the facade
        (3, "scvi_fast.data", True),  # data is a submodule
        (4, "scvi_fast.data._hvg", True),
        (5, "scvi_fast.module", True),  # two dots from a package: one level up
        (7, "scvi_fast.train._trainer", True),
        (9, "scvi_fast.analysis", True),
        (10, "scvi_fast.kernels", False),  # known package, unknown module in it
        (11, "scvi_fast.data._store", True),
    ]


def test_floor_rule():
    def rule(source, target):
        return _floor_rule(Import("f.py", 1, source, target, True))

    assert rule("scvi_fast.model", "scvi_fast.data") is None
    assert rule("scvi_fast.data._open", "scvi_fast.data._store") is None  # inside a unit
    assert rule("scvi_fast.cli", "scvi_fast") is None  # the facade sits below the CLI
    assert "nothing imports upwards" in rule("scvi_fast.data._hvg", "scvi_fast.model")
    assert "nothing imports upwards" in rule("scvi_fast.model", "scvi_fast")
    assert "side by side" in rule("scvi_fast.analysis._de", "scvi_fast.train")
    assert "side by side" in rule("scvi_fast.data", "scvi_fast.reference")
    assert "nothing imports upwards" in rule("scvi_fast._native", "scvi_fast.kernels")


def test_no_upward_or_sideways_imports():
    found: dict[tuple[str, str], list[str]] = {}
    for imp in ALL_IMPORTS:
        why = _floor_rule(imp)
        if why is not None:
            found.setdefault((imp.file, imp.target), []).append(f"{imp.file}:{imp.line}: {why}")
    new = [msg for key, msgs in found.items() if key not in ALLOWED_UPWARD for msg in msgs]
    gone = [f"{file} importing {target} breaks no rule now: remove it from ALLOWED_UPWARD"
            for file, target in ALLOWED_UPWARD if (file, target) not in found]
    assert not new and not gone, "\n".join(new + gone)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    edges: dict[str, set[str]] = {m: set() for m in KNOWN}
    where: dict[tuple[str, str], str] = {}
    for imp in ALL_IMPORTS:
        if imp.literal and imp.target != imp.source:
            edges[imp.source].add(imp.target)
            where.setdefault((imp.source, imp.target), f"{imp.file}:{imp.line}")
    found = {frozenset(c): c for c in _cycles(edges)}
    new = []
    for key, comp in found.items():
        if key not in ALLOWED_CYCLES:
            links = [f"  {where[(a, b)]}: {a} imports {b}"
                     for a in comp for b in sorted(edges[a]) if b in key]
            new.append(f"import cycle between {', '.join(comp)} (no module may import, even "
                       "inside a function, a module that imports it back):\n" + "\n".join(links))
    gone = [f"the cycle {sorted(key)} is gone: remove it from ALLOWED_CYCLES"
            for key in ALLOWED_CYCLES if key not in found]
    assert not new and not gone, "\n".join(new + gone)
