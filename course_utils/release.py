"""Write the student copies of the labs.

Every solution between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` in a complete notebook
``notebooks/NN_name.ipynb`` becomes ``# YOUR CODE HERE`` and a ``raise NotImplementedError`` naming
the exercise, in ``notebooks/student/NN_name.ipynb``; every other cell is kept as it is, except that
the Colab badge and set-up cell point at the student copy. Running it twice changes nothing::

    python -m course_utils.release            # (re)write notebooks/student/
    python -m course_utils.release --check    # exit 1 if a student copy is out of date

The markers are those of nbgrader and otter-grader, so the complete notebooks also work with them.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

from . import publish

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUDENT_FOLDER = "student"


class ReleaseError(ValueError):
    """A complete notebook's markers are malformed; the message names the notebook and cell."""


def _exercise_name(source: str) -> str:
    match = re.search(r"^def (\w+)\(", source, flags=re.MULTILINE)
    return match.group(1) if match else "this exercise"


def strip_solutions(source: str, where: str = "a cell") -> str:
    """Replace each solution block of one cell's source by a stub that raises NotImplementedError."""
    lines = source.split("\n")
    out: list[str] = []
    inside = False
    name = _exercise_name(source)
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ReleaseError(f"{where}, line {number}: {BEGIN} inside another solution")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f'{indent}raise NotImplementedError("exercise {name}: write your solution here")')
        elif stripped == END:
            if not inside:
                raise ReleaseError(f"{where}, line {number}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ReleaseError(f"{where}: {BEGIN} is never closed by {END}")
    return "\n".join(out)


def student_copy(nb: dict, student_path: str, name: str = "notebook") -> dict:
    """The student version of a complete notebook (a new dict; ``nb`` is unchanged)."""
    student = copy.deepcopy(nb)
    for index, cell in enumerate(student["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if BEGIN in source or END in source:
            cell["source"] = strip_solutions(source, where=f"{name}, code cell {index}")
    publish.rewrite_notebook(student, student_path)
    return student


def release(root: Path, check: bool = False) -> list[str]:
    """Write (or with ``check``, compare) every student copy; returns the paths that were stale."""
    stale = []
    out_dir = root / "notebooks" / STUDENT_FOLDER
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        rel = f"notebooks/{STUDENT_FOLDER}/{path.name}"
        text = json.dumps(student_copy(nb, rel, path.name), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        target = out_dir / path.name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            stale.append(rel)
            if not check:
                out_dir.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the student copies of the labs into notebooks/student/.")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a copy is out of date")
    args = parser.parse_args(argv)
    stale = release(args.root, check=args.check)
    for rel in stale:
        print(("out of date: " if args.check else "wrote ") + rel)
    if args.check and stale:
        print("run `python -m course_utils.release` and commit notebooks/student/")
        return 1
    if not stale:
        print("student copies are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
