import json

import pytest
from conftest import ROOT, notebook_namespace

from course_utils import publish, release
from course_utils.checks import TODO, evaluate, exercises


def test_committed_student_copies_are_up_to_date():
    assert release.release(ROOT, check=True) == [], "run `python -m course_utils.release` and commit notebooks/student/"


def test_release_is_idempotent(tmp_path):
    (tmp_path / "notebooks").mkdir()
    for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        (tmp_path / "notebooks" / path.name).write_bytes(path.read_bytes())
    assert release.release(tmp_path) != []
    first = {p.name: p.read_bytes() for p in (tmp_path / "notebooks" / "student").iterdir()}
    assert release.release(tmp_path) == []
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "notebooks" / "student").iterdir()}


def test_stub_keeps_indentation_and_names_the_exercise():
    source = 'def f(x):\n    """doc"""\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n\nprint(1)'
    assert release.strip_solutions(source) == (
        'def f(x):\n    """doc"""\n    # YOUR CODE HERE\n'
        '    raise NotImplementedError("exercise f: write your solution here")\n\nprint(1)'
    )


@pytest.mark.parametrize(
    "source, message",
    [
        ("### BEGIN SOLUTION\nx = 1", "never closed"),
        ("x = 1\n### END SOLUTION", "without"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
    ],
)
def test_malformed_markers_are_clear_errors(source, message):
    with pytest.raises(release.ReleaseError, match=message):
        release.strip_solutions(source, where="lab.ipynb, code cell 3")


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.name)
def test_student_copy_differs_only_in_solutions_badge_and_setup(path):
    complete = json.loads(path.read_text(encoding="utf-8"))["cells"]
    student = json.loads((ROOT / "notebooks" / "student" / path.name).read_text(encoding="utf-8"))["cells"]
    assert len(complete) == len(student)
    for a, b in zip(complete, student, strict=True):
        a_src, b_src = "".join(a["source"]), "".join(b["source"])
        if release.BEGIN in a_src:
            assert release.BEGIN not in b_src and "raise NotImplementedError" in b_src
            assert "SOLUTION" not in b_src
        elif publish.BADGE_PATTERN.search(a_src):
            assert publish.colab_url(f"notebooks/student/{path.name}") in b_src
        else:
            assert a_src == b_src


@pytest.mark.parametrize(
    "path", sorted((ROOT / "notebooks" / "student").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.name
)
def test_student_copies_fail_every_check_as_not_implemented(path):
    namespace = notebook_namespace(path, "# YOUR CODE HERE")
    lab_exercises = exercises(path.name[:2])
    assert lab_exercises
    for ex in lab_exercises:
        verdict = evaluate(ex.name, namespace[ex.name])
        assert verdict.status == TODO, (ex.name, verdict.message)
