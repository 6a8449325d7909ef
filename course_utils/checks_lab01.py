"""Checks for Lab 01 (tokenisation): BPE from scratch, byte level, no pre-splitting.

Reference answers come from :mod:`course_utils.tokenizer`. ``bpe_encode`` and ``bpe_decode`` are
:meth:`Tokenizer.encode_ordinary` and :meth:`Tokenizer.decode` there (methods, not functions).
"""

from __future__ import annotations

import random
from typing import Any

from .checks import call, exercise, expect, expect_equal
from .tokenizer import Tokenizer, merge_pair, pair_counts, train_bpe

LAB = "01"

_CORPUS = (
    "the cat sat on the mat. the cat ate the rat. then the cat sat on the hat.\n"
    "a good invention, a better invention, a less good invention.\n"
)
_ENCODE_CASES = [
    "",
    "t",
    "the cat",
    "the cat sat on the mat.",
    "a bat",
    "then the rat ate the hat",
    "naïve café ✨",
    "aaaa",
]


def _random_ids(rng: random.Random, n: int, high: int) -> list[int]:
    return [rng.randrange(high) for _ in range(n)]


def _reference_merges() -> dict[tuple[int, int], int]:
    tok = train_bpe(_CORPUS, 256 + 40, pattern=None, special_tokens=())
    return {pair: 256 + i for i, pair in enumerate(tok.merges)}


def _as_plain_dict(value: Any, case: str, what: str) -> dict:
    expect(isinstance(value, dict), f"on {case}: return a dict {what}, got {type(value).__name__}")
    return dict(value)


@exercise(LAB, "pair_counts", "count adjacent pairs")
def _check_pair_counts(fn) -> None:
    rng = random.Random(1)
    cases = {
        "an empty list": [],
        "a single id [5]": [5],
        "[1, 2, 3, 1, 2]": [1, 2, 3, 1, 2],
        "[7, 7, 7] (overlapping pairs count twice)": [7, 7, 7],
        **{f"a random list of {n} ids": _random_ids(rng, n, 6) for n in (20, 200)},
    }
    for case, ids in cases.items():
        got = _as_plain_dict(call(fn, list(ids), case=case), case, "mapping (a, b) -> count")
        expect_equal(got, dict(pair_counts(ids)), case)


@exercise(LAB, "merge_pair", "merge one pair")
def _check_merge_pair(fn) -> None:
    cases = [
        ("merging (1, 2) in [1, 2, 3, 1, 2]", [1, 2, 3, 1, 2], (1, 2), 99),
        ("merging (7, 7) in [7, 7, 7] (left to right, no overlap)", [7, 7, 7], (7, 7), 256),
        ("merging (7, 7) in [7, 7, 7, 7]", [7, 7, 7, 7], (7, 7), 256),
        ("a pair that does not occur", [1, 2, 3], (3, 1), 300),
        ("a pair at the very end", [5, 1, 2], (1, 2), 257),
        ("an empty list", [], (1, 2), 256),
        ("a pair in the wrong order", [2, 1, 2, 1], (1, 2), 256),
    ]
    for case, ids, pair, new_id in cases:
        original = list(ids)
        got = call(fn, ids, pair, new_id, case=case)
        expect(ids == original, f"on {case}: your function changed the list it was given; build a new list instead")
        expect_equal(got, merge_pair(original, pair, new_id), case)


def _verify_training(text: str, vocab_size: int, merges: Any, case: str) -> None:
    merges = _as_plain_dict(merges, case, "mapping (a, b) -> new id, in the order learned")
    ids = list(text.encode("utf-8"))
    wanted = vocab_size - 256
    expect(
        len(merges) <= wanted, f"on {case}: vocab_size={vocab_size} allows {wanted} merges, you learned {len(merges)}"
    )
    for k, (pair, new_id) in enumerate(merges.items()):
        expect_equal(
            new_id, 256 + k, f"{case}, merge number {k}", "new ids count up from 256 in the order merges are learned"
        )
        counts = pair_counts(ids)
        expect(bool(counts), f"on {case}: merge number {k} is {pair}, but no pairs are left; stop when none remain")
        best = max(counts.values())
        top = min(p for p, c in counts.items() if c == best)
        expect(
            counts.get(pair, 0) == best,
            f"on {case}: merge number {k} is {pair}, which occurs {counts.get(pair, 0)} times, but {top} occurs {best} "
            "times; always merge the most frequent pair",
        )
        ids = merge_pair(ids, pair, new_id)
    if len(merges) < wanted:
        expect(
            not pair_counts(ids),
            f"on {case}: vocab_size={vocab_size} asks for {wanted} merges, you learned {len(merges)} while pairs were "
            "still left",
        )


@exercise(LAB, "train_bpe", "train byte-level BPE")
def _check_train_bpe(fn) -> None:
    cases = [
        ("the classic 'aaabdaaabac', vocab_size=259", "aaabdaaabac", 259),
        ("vocab_size=256 (no merges)", "hello", 256),
        ("an empty text", "", 260),
        ("a text with fewer pairs than merges asked for ('abab', vocab_size=300)", "abab", 300),
        ("a short story, vocab_size=296", _CORPUS, 296),
        ("accented text 'naïve café, café naïve', vocab_size=262", "naïve café, café naïve", 262),
    ]
    for case, text, vocab_size in cases:
        _verify_training(text, vocab_size, call(fn, text, vocab_size, case=case), case)


@exercise(LAB, "bpe_encode", "encode with learned merges")
def _check_bpe_encode(fn) -> None:
    merges = _reference_merges()
    reference = Tokenizer(list(merges), pattern=None)
    for text in _ENCODE_CASES:
        case = f"encode({text!r}, merges)"
        got = call(fn, text, dict(merges), case=case)
        expect(isinstance(got, list), f"on {case}: return a list of ints, got {type(got).__name__}")
        expect_equal(
            got,
            reference.encode_ordinary(text),
            case,
            "merge the pair with the lowest new id first, until none applies",
        )


@exercise(LAB, "bpe_decode", "decode ids to text")
def _check_bpe_decode(fn) -> None:
    merges = _reference_merges()
    reference = Tokenizer(list(merges), pattern=None)
    cases = [("an empty list", [])]
    cases += [(f"the ids of {text!r}", reference.encode_ordinary(text)) for text in _ENCODE_CASES[1:]]
    cases.append(("[195], the first byte of 'é' alone (invalid UTF-8)", [195]))
    for case, ids in cases:
        got = call(fn, list(ids), dict(merges), case=case)
        hint = "decode the joined bytes with errors='replace'" if ids == [195] else ""
        expect_equal(got, reference.decode(ids), case, hint)
