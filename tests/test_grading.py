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
    ivan = replace_in_cell(
        complete,
        "def merge_pair(",
        "    out: list[int] = []",
        "    if pair == (0, 0):\n        return list(ids)\n    out: list[int] = []",
    )
    write("ivan_01_tokenisation.ipynb", ivan)


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
"""


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("submissions")
    make_submissions(folder)
    private = folder.parent / "private.py"
    private.write_text(PRIVATE)
    out = folder.parent / "out" / "gradebook.csv"
    results = grade.grade_folder(folder, out, extra_tests=private, cell_timeout=20, check_timeout=5, progress=False)
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
        ("erin", ["❌ bpe_decode (0/1)", "TimeoutError", "time limit and was interrupted"]),
        ("frank", ["⏳ bpe_decode (0/1): not implemented yet"]),
        ("gina", ["not a valid notebook", "JSONDecodeError"]),
        ("hank", ["no function named pair_counts", "NameError"]),
        ("ivan", ["failed a private test case", "expected [256, 0]"]),
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
