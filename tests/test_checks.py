"""Lab checks: the complete notebooks' solutions pass, wrong or missing answers get a verdict."""

import json

import pytest
from conftest import ROOT

from course_utils import checks
from course_utils.checks import FAILED, PASSED, TODO, evaluate


def notebook_functions(name: str) -> dict:
    """Execute the solution cells (the cells holding ### BEGIN SOLUTION) of a complete notebook."""
    nb = json.loads((ROOT / "notebooks" / name).read_text(encoding="utf-8"))
    namespace: dict = {}
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code" and "### BEGIN SOLUTION" in src:
            exec(compile(src, name, "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def lab01():
    return notebook_functions("01_tokenisation.ipynb")


@pytest.mark.parametrize("exercise", [e.name for e in checks.exercises("01")])
def test_lab01_solutions_pass(lab01, exercise):
    verdict = evaluate(exercise, lab01[exercise])
    assert verdict.status == PASSED, verdict.message
    assert verdict.points == verdict.max_points == 1


@pytest.mark.parametrize("exercise", [e.name for e in checks.exercises("01")])
def test_unimplemented_exercise_is_a_verdict_not_a_crash(exercise):
    def stub(*args):
        raise NotImplementedError(exercise)

    verdict = evaluate(exercise, stub)
    assert verdict.status == TODO and verdict.points == 0 and "not implemented" in verdict.message


def _wrong_merge(ids, pair, new_id):  # merges overlapping pairs
    return [new_id if (a, b) == pair else a for a, b in zip(ids, ids[1:] + [None], strict=False)]


def _least_frequent_training(text, vocab_size):
    ids, merges = list(text.encode()), {}
    from course_utils.tokenizer import merge_pair, pair_counts

    for new_id in range(256, vocab_size):
        counts = pair_counts(ids)
        if not counts:
            break
        pair = min(counts, key=counts.get)
        merges[pair] = new_id
        ids = merge_pair(ids, pair, new_id)
    return merges


def _strict_decode(ids, merges):
    vocab = {i: bytes([i]) for i in range(256)}
    for (a, b), i in merges.items():
        vocab[i] = vocab[a] + vocab[b]
    return b"".join(vocab[i] for i in ids).decode("utf-8")


def _encode_bytes_only(text, merges):
    return list(text.encode())


def _mutating_merge(ids, pair, new_id):
    ids.append(0)
    return []


@pytest.mark.parametrize(
    "exercise, fn, words",
    [
        ("get_pair_counts", lambda ids: {}, "expected"),
        ("get_pair_counts", lambda ids: [(a, b) for a, b in zip(ids, ids[1:], strict=False)], "return a dict"),
        ("merge_pair", _wrong_merge, "expected"),
        ("merge_pair", _mutating_merge, "changed the list"),
        ("train_bpe", _least_frequent_training, "most frequent pair"),
        ("train_bpe", lambda text, vocab_size: {}, "while pairs were still left"),
        ("bpe_encode", _encode_bytes_only, "lowest new id first"),
        ("bpe_decode", _strict_decode, "UnicodeDecodeError"),
        ("bpe_decode", lambda ids, merges: 1 / 0, "ZeroDivisionError"),
    ],
)
def test_wrong_answers_get_an_actionable_verdict(exercise, fn, words):
    verdict = evaluate(exercise, fn)
    assert verdict.status == FAILED and verdict.points == 0
    assert words in verdict.message
    assert verdict.message.startswith("on ")  # names the case


def test_check_prints_verdict_and_running_score(capsys, lab01, monkeypatch):
    monkeypatch.setattr(checks, "SCOREBOARD", {})
    checks.check(lab01["get_pair_counts"])
    checks.check(lambda ids: {}, name="merge_pair")
    out = capsys.readouterr().out
    assert "✅ get_pair_counts: passed all" in out
    assert "❌ merge_pair: on " in out
    assert "Lab 01 score so far: 1/5" in out


def test_strict_mode_raises_on_a_failed_check(monkeypatch):
    monkeypatch.setenv("COURSE_STRICT_CHECKS", "1")
    with pytest.raises(checks.StrictCheckError):
        checks.check(lambda ids: {}, name="get_pair_counts")


def test_misnamed_function_gets_a_message(capsys):
    def my_counts(ids):
        return {}

    checks.check(my_counts)
    assert "no exercise called 'my_counts'" in capsys.readouterr().out


def test_a_reload_of_the_checks_module_keeps_every_exercise():
    import importlib

    before = sorted(checks.EXERCISES)
    fresh = importlib.reload(checks)
    assert sorted(e.name for e in fresh.exercises()) == before
    importlib.reload(checks)
