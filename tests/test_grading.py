"""End to end: grade a folder of crafted Lab 01 submissions and assert the exact gradebook."""

import copy
import json
from pathlib import Path

import pytest
from conftest import ROOT

from course_utils import grade

LAB01 = "01_tokenisation.ipynb"


def cells_of(name: str) -> dict:
    return json.loads((ROOT / "notebooks" / name).read_text(encoding="utf-8"))


def find_cell(nb: dict, text: str) -> dict:
    matches = [c for c in nb["cells"] if text in "".join(c["source"])]
    assert len(matches) == 1, text
    return matches[0]


def replace_in_cell(nb: dict, anchor: str, old: str, new: str) -> dict:
    nb = copy.deepcopy(nb)
    cell = find_cell(nb, anchor)
    source = "".join(cell["source"])
    assert old in source
    cell["source"] = source.replace(old, new)
    return nb


def make_submissions(folder: Path) -> None:
    complete, student = cells_of(LAB01), cells_of("student/" + LAB01)

    def write(rel: str, nb) -> None:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(nb if isinstance(nb, str) else json.dumps(nb), encoding="utf-8")

    write("alice_01_tokenisation.ipynb", complete)
    write("bob/01_tokenisation.ipynb", student)  # untouched student copy, in a folder named after the student

    carol = copy.deepcopy(student)  # partly solved: the first two exercises
    for name in ("def pair_counts(", "def merge_pair("):
        find_cell(carol, name)["source"] = find_cell(complete, name)["source"]
    write("carol_01_tokenisation.ipynb", carol)

    write(
        "dave_01_tokenisation.ipynb",
        replace_in_cell(complete, "def train_bpe(", "    return merges", "    return merges\n\ndef oops(:\n    pass"),
    )
    write(
        "erin_01_tokenisation.ipynb",
        replace_in_cell(
            complete,
            "def bpe_decode(",
            "    vocab = {i: bytes([i]) for i in range(256)}",
            "    while True:\n        pass",
        ),
    )

    frank = copy.deepcopy(student)  # nothing solved, but the check is redefined and the package patched
    cheat = (
        "import course_utils.checks as _c\n"
        "def check(fn, name=None):\n    print('✅', fn.__name__, ': passed all cases')\n"
        "_c.evaluate = lambda name, fn: _c.Verdict('01', name, _c.PASSED, 'passed', 1.0, 1.0)\n"
        "_c.check = check"
    )
    frank["cells"].insert(
        3, {"id": "cheat", "cell_type": "code", "metadata": {}, "source": cheat, "outputs": [], "execution_count": None}
    )
    write("frank_01_tokenisation.ipynb", frank)

    write("gina_01_tokenisation.ipynb", '{"cells": [ this is not json')
    hank = replace_in_cell(complete, "def pair_counts(", "def pair_counts(", "def count_pairs(")
    write("hank_01_tokenisation.ipynb", hank)
    for name, source in FORGERIES.items():
        write(f"{name}_01_tokenisation.ipynb", minimal_notebook(source))
    sam = minimal_notebook(HOG)
    sam["cells"].insert(1, find_cell(complete, "def pair_counts(") | {"outputs": [], "execution_count": None})
    write("sam_01_tokenisation.ipynb", sam)
    ivan = replace_in_cell(
        complete,
        "def merge_pair(",
        "    out: list[int] = []",
        "    if pair == (0, 0):\n        return list(ids)\n    out: list[int] = []",
    )
    write("ivan_01_tokenisation.ipynb", ivan)


def minimal_notebook(source: str) -> dict:
    return {
        "cells": [
            {"id": "title", "cell_type": "markdown", "metadata": {}, "source": "# Lab 01 — Tokenisation"},
            {
                "id": "forgery",
                "cell_type": "code",
                "metadata": {},
                "source": source,
                "outputs": [],
                "execution_count": None,
            },
        ],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


# Wrong answers under each exercise's name: a forgery must make these pass to gain anything.
STUBS = """
def pair_counts(ids):
    return {}
def merge_pair(ids, pair, new_id):
    return []
def train_bpe(text, vocab_size):
    return {}
def bpe_encode(text, merges):
    return []
def bpe_decode(ids, merges):
    return ""
"""
NAMES = ["pair_counts", "merge_pair", "train_bpe", "bpe_encode", "bpe_decode"]
FORGED_REPORT = (
    "import json\n"
    f"verdicts = {{n: ['passed', 1.0, 1.0, 'passed all cases'] for n in {NAMES!r}}}\n"
    "print(json.dumps(verdicts))\n"
    "print('@@course-grade@@' + json.dumps(verdicts))\n"
)
# One submission per way a determined student might try to forge a grade (each earns 0, with a reason).
FORGERIES = {
    "kim": STUBS  # the import system: checks can no longer be reloaded, and are patched to pass
    + "import importlib\nimport course_utils.checks as c\n"
    "importlib.reload = lambda module: module\n"
    "c.evaluate = lambda name, fn: c.Verdict('01', name, c.PASSED, 'passed', 1.0, 1.0)\n",
    "lena": STUBS  # a standard-library module the grader's code in the kernel uses
    + "import pathlib\n_write = pathlib.Path.write_text\n"
    + FORGED_REPORT.replace("print(", "_ = (")
    + "def forged_write(self, text, *args, **kwargs):\n"
    "    return _write(self, json.dumps(verdicts) if self.name.startswith('reply') else text, *args, **kwargs)\n"
    "pathlib.Path.write_text = forged_write\n",
    "mona": STUBS  # a fake course_utils in the working folder, first on sys.path
    + "import os, sys\nos.makedirs('course_utils', exist_ok=True)\n"
    "open('course_utils/__init__.py', 'w').write('')\n"
    "open('course_utils/checks.py', 'w').write('def evaluate(name, fn):\\n    return None\\n')\n"
    "sys.path.insert(0, os.getcwd())\n"
    "for m in [m for m in sys.modules if m.startswith('course_utils')]:\n    del sys.modules[m]\n",
    "nina": STUBS  # IPython itself: every later cell replaced by a forged report
    + "report = "
    + repr(FORGED_REPORT)
    + "\n"
    "get_ipython().input_transformers_post.append(lambda lines: report.splitlines(keepends=True))\n",
    "omar": STUBS + FORGED_REPORT,  # a report printed where the old grader read its verdicts
    "pia": (  # results whose comparisons always succeed, and one that is no data at all
        "class YesDict(dict):\n    __eq__ = lambda self, other: True\n    __ne__ = lambda self, other: False\n"
        "class YesList(list):\n    __eq__ = lambda self, other: True\n    __ne__ = lambda self, other: False\n"
        "class Forged:\n    __eq__ = lambda self, other: True\n    __ne__ = lambda self, other: False\n"
        "def pair_counts(ids):\n    return YesDict()\n"
        "def merge_pair(ids, pair, new_id):\n    return YesList()\n"
        "def train_bpe(text, vocab_size):\n    return YesDict()\n"
        "def bpe_encode(text, merges):\n    return YesList()\n"
        "def bpe_decode(ids, merges):\n    return Forged()\n"
    ),
    "quin": STUBS.replace(  # functions that disarm the checks when they are called
        "    return",
        "    import sys\n"
        "    for m in list(sys.modules.values()):\n"
        "        if getattr(m, '__name__', '').startswith('course_utils.checks'):\n"
        "            m.expect = m.expect_equal = lambda *a, **k: None\n"
        "    return",
    ),
    "rosa": STUBS + FORGED_REPORT + "import os\nos._exit(0)\n",  # a forged report, then the kernel is gone
}
HOG = "hog = bytearray(16 * 2**30)  # more than the grader's memory limit\n"

PRIVATE = """
from course_utils.checks import call, expect_equal

def extra_merge_pair(fn):
    expect_equal(call(fn, [0, 0, 0], (0, 0), 256, case="a private case"), [256, 0], "a private case")
    return 1
"""

EXPECTED = """\
student,lab,pair_counts,merge_pair,train_bpe,bpe_encode,bpe_decode,total,max
alice,01,1,1,1,1,1,5,5
bob,01,0,0,0,0,0,0,5
carol,01,1,1,0,0,0,2,5
dave,01,1,1,0,1,1,4,5
erin,01,1,1,1,1,0,4,5
frank,01,0,0,0,0,0,0,5
gina,01,0,0,0,0,0,0,5
hank,01,0,1,0,0,1,2,5
ivan,01,1,0,1,1,1,4,5
kim,01,0,0,0,0,0,0,5
lena,01,0,0,0,0,0,0,5
mona,01,0,0,0,0,0,0,5
nina,01,0,0,0,0,0,0,5
omar,01,0,0,0,0,0,0,5
pia,01,0,0,0,0,0,0,5
quin,01,0,0,0,0,0,0,5
rosa,01,0,0,0,0,0,0,5
sam,01,1,0,0,0,0,1,5
"""


def checkout_files() -> dict[str, int]:
    skip = {".git", ".venv", ".pytest_cache", ".hypothesis", ".ruff_cache", "__pycache__"}
    return {
        str(p.relative_to(ROOT)): p.stat().st_mtime_ns
        for p in ROOT.rglob("*")
        if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)
    }


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("submissions")
    make_submissions(folder)
    private = folder.parent / "private.py"
    private.write_text(PRIVATE)
    out = folder.parent / "out" / "gradebook.csv"
    before = checkout_files()
    results = grade.grade_folder(
        folder, out, extra_tests=private, cell_timeout=20, check_timeout=5, memory_limit_gb=4, progress=False
    )
    assert checkout_files() == before, "grading wrote into the course checkout"
    return out, results


def test_exact_gradebook(graded):
    out, _ = graded
    assert out.read_text(encoding="utf-8") == EXPECTED


def feedback(graded, student: str) -> str:
    out, _ = graded
    return (out.parent / "feedback" / f"{student}.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "student, phrases",
    [
        ("alice", ["Total: 5/5"]),
        ("bob", ["⏳ pair_counts (0/1): not implemented yet"]),
        ("carol", ["✅ merge_pair (1/1)", "⏳ train_bpe"]),
        ("dave", ["no function named train_bpe", "SyntaxError"]),
        ("erin", ["❌ bpe_decode (0/1): timed out after 5 s while checking", "time limit and was interrupted"]),
        ("frank", ["⏳ bpe_decode (0/1): not implemented yet"]),
        ("gina", ["not a valid notebook", "JSONDecodeError"]),
        ("hank", ["no function named pair_counts", "NameError"]),
        ("ivan", ["failed a private test case", "expected [256, 0]"]),
        ("kim", ["❌ pair_counts (0/1): on ", "expected"]),
        ("lena", ["❌ bpe_decode (0/1)", "not an answer"]),
        ("mona", ["❌ train_bpe (0/1)", "did not run in your notebook's kernel"]),
        ("nina", ["❌ bpe_encode (0/1)", "did not run in your notebook's kernel"]),
        ("omar", ["❌ merge_pair (0/1): on ", "expected"]),
        ("pia", ["❌ pair_counts (0/1): on ", "❌ bpe_decode (0/1)", "returned a Forged, which cannot be checked"]),
        ("quin", ["❌ train_bpe (0/1): on ", "expected"]),
        ("rosa", ["❌ pair_counts (0/1)", "not running any more"]),
        ("sam", ["✅ pair_counts (1/1)", "MemoryError", "no function named merge_pair"]),
    ],
)
def test_feedback_says_why(graded, student, phrases):
    text = feedback(graded, student)
    for phrase in phrases:
        assert phrase in text, (student, phrase, text)


def test_time_per_submission_is_reported(graded):
    _, results = graded
    assert all(r.seconds > 0 for r in results)
    assert "Graded in" in feedback(graded, "alice")
    assert max(r.seconds for r in results if r.student != "gina") < 300


@pytest.mark.parametrize(
    "rel, expected",
    [
        ("alice_01_tokenisation.ipynb", "alice"),
        ("Jane Doe - 01_tokenisation.ipynb", "Jane Doe"),
        ("jdoe/01_tokenisation.ipynb", "jdoe"),
        ("01_tokenisation.ipynb", "01_tokenisation"),
    ],
)
def test_student_names_from_file_names(tmp_path, rel, expected):
    labs = {"01": "01_tokenisation"}
    assert grade.student_name(tmp_path / rel, tmp_path, labs) == expected


def test_network_is_refused_inside_graded_kernels(tmp_path):
    script = tmp_path / "site"
    script.mkdir()
    (script / "sitecustomize.py").write_text(grade.NO_NETWORK)
    import subprocess
    import sys

    code = (
        "import socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), timeout=1)\n"
        "except OSError as e:\n    print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(script)}, capture_output=True, text=True, timeout=60
    )
    assert "network access is disabled while grading" in out.stdout
