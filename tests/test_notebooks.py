"""The notebook contract (DESIGN section 3), checked on every complete notebook."""

import json
import re

import pytest
from conftest import ROOT

from course_utils import publish

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_contract(path):
    nb = load(path)
    cells = nb["cells"]
    title = source(cells[0])
    assert cells[0]["cell_type"] == "markdown" and title.startswith(f"# Lab {path.name[:2]} ")
    assert publish.badge(f"notebooks/{path.name}") in title
    for needed in ("**You will learn**", "**Time:**", "**Builds on:**"):
        assert needed in title, f"title cell lacks {needed}"
    code = [c for c in cells if c["cell_type"] == "code"]
    assert source(code[0]) == publish.setup_cell_source(), "first code cell must be the generated set-up cell"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "lab.pick(" in source(params[0])
    assert "## Summary" in source(cells[-1]) and "**Papers.**" in source(cells[-1])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_clean(path):
    nb = load(path)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
        assert set(cell.get("metadata", {})) <= {"tags"}, cell.get("metadata")
    assert set(nb["metadata"]) <= {"kernelspec", "language_info"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_solutions_sit_inside_functions_and_are_checked(path):
    from course_utils.checks import exercises

    cells = [source(c) for c in load(path)["cells"] if c["cell_type"] == "code"]
    solved = []
    for k, src in enumerate(cells):
        if "### BEGIN SOLUTION" not in src:
            continue
        assert src.count("### BEGIN SOLUTION") == src.count("### END SOLUTION") == 1
        name = re.search(r"^def (\w+)\(", src, flags=re.MULTILINE).group(1)
        solved.append(name)
        assert cells[k + 1].strip() == f"check({name})", f"{name} must be followed by its check cell"
    registered = [e.name for e in exercises(path.name[:2])]
    assert sorted(solved) == sorted(registered)
