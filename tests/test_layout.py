"""The package's import graph reads as the syllabus: a module imports only modules of its own lab or
earlier ones, there are no cycles, the recipes sit on top where nothing in the library imports them,
and an import inside a function is only ever for an optional or heavy dependency, saying so."""

import ast
import re
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "course_utils"

#: The lab each library module belongs to: 0 for what every lab uses, 90 for the instructors' tools,
#: 99 for the recipes. A module may import modules of its own level or below.
LEVELS = {
    "course_utils": 0,
    "lab": 0,
    "publish": 0,
    "checks": 0,
    "tokenizer": 1,
    "data": 1,
    "model": 2,
    "measure": 2,
    "artefacts": 4,
    "train": 4,
    "bench": 4,
    "plan": 4,
    "gpu_check": 90,
    "scaling": 5,
    "world": 6,
    "sft": 6,
    "icl": 7,
    "retrieval": 8,
    "rl": 9,
    "preference": 9,
    "release": 90,
    "grade": 90,
    "sandbox": 90,
    "recipes": 99,
}


def module_name(path: Path) -> str:
    """``course_utils/recipes/base_model.py`` -> ``recipes.base_model``; the package's own ``__init__``
    -> ``course_utils``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "course_utils"


def level(name: str) -> int:
    top = name.split(".")[0]
    if top.startswith("checks_lab"):
        return int(top.removeprefix("checks_lab"))
    if top not in LEVELS:
        raise AssertionError(f"course_utils.{name} has no level in tests/test_layout.py: add it to LEVELS")
    return LEVELS[top]


def resolve(dotted: str) -> str:
    """The package's module a dotted name lives in: ``artefacts.write_card`` -> ``artefacts``,
    ``__version__`` -> ``course_utils`` (the package itself), ``recipes.finish`` -> ``recipes``."""
    parts = [p for p in dotted.split(".") if p]
    while parts:
        candidate = PACKAGE.joinpath(*parts)
        if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
            return ".".join(parts)
        parts.pop()
    return "course_utils"


def package_imports(path: Path, source: str | None = None) -> list[tuple[str, int, bool]]:
    """(imported module of the package, line, inside a function) for every import in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    inner = {
        id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package not in ("", "course_utils") else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            stem = ".".join(base + ([node.module] if node.module else []))
            targets = [stem] if node.module else [".".join(base + [a.name]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("course_utils"):
            stem = node.module.removeprefix("course_utils").lstrip(".")
            targets = [stem] if stem else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("course_utils.") for a in node.names if a.name.startswith("course_utils.")]
        for target in targets:
            found.append((resolve(target), node.lineno, id(node) in inner))
    return found


def graph(sources: dict[Path, str] | None = None) -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    edges: dict[str, set[str]] = {}
    for path in paths:
        src = (sources or {}).get(path)
        edges[module_name(path)] = {t for t, _, _ in package_imports(path, src) if t != module_name(path)}
    for path, src in (sources or {}).items():
        if path not in paths:
            edges[module_name(path)] = {t for t, _, _ in package_imports(path, src)}
    return edges


def problems(edges: dict[str, set[str]]) -> list[str]:
    """Backward edges (to a later lab) and cycles."""
    found = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            if level(target) > level(module):
                found.append(f"{module} (lab {level(module)}) imports {target} (lab {level(target)}), a later one")
    # cycles: depth-first search, reporting each cycle once by its members
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            nxt_key = nxt if nxt in edges else nxt.split(".")[0]
            if state.get(nxt_key) == 1:
                cycle = stack[stack.index(nxt_key) :] + [nxt_key]
                found.append("cycle: " + " -> ".join(cycle))
            elif nxt_key in edges and not state.get(nxt_key):
                visit(nxt_key)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if not state.get(node):
            visit(node)
    return found


def test_every_module_has_a_level():
    for path in PACKAGE.rglob("*.py"):
        level(module_name(path))


def test_imports_point_to_earlier_labs_and_never_cycle():
    assert problems(graph()) == []


@pytest.mark.parametrize(
    "plant, expected",
    [
        ("from .sft import render_conversation\n", "tokenizer (lab 1) imports sft (lab 6), a later one"),
        ("from .recipes import finish\n", "tokenizer (lab 1) imports recipes (lab 99), a later one"),
    ],
)
def test_a_planted_backward_import_is_caught(plant, expected):
    path = PACKAGE / "tokenizer.py"
    assert expected in problems(graph({path: plant + path.read_text(encoding="utf-8")}))


def test_a_planted_cycle_is_caught():
    path = PACKAGE / "lab.py"  # lab is imported by data, tokenizer, ...; make it import tokenizer back
    found = problems(graph({path: "from .tokenizer import ENDOFTEXT\n" + path.read_text(encoding="utf-8")}))
    assert any(p.startswith("cycle:") and "lab" in p and "tokenizer" in p for p in found), found


def test_imports_inside_functions_are_only_for_optional_or_heavy_dependencies():
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line, inner in package_imports(path):
            assert not inner, (
                f"{path.name}:{line} imports course_utils.{target} inside a function; import it at the top"
            )
        tree = ast.parse("\n".join(lines))
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    text = lines[node.lineno - 1]
                    assert re.search(r"#\s*(optional|heavy)", text), (
                        f"{path.name}:{node.lineno} imports inside a function without saying why: {text.strip()!r}; "
                        "move it to the top, or add '# optional: …' or '# heavy: …'"
                    )
