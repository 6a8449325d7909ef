"""Checks for Lab 08 (retrieval-augmented generation). References: :mod:`course_utils.retrieval`, where
``bm25_scores`` is the method ``BM25.scores`` (over words already split) and ``top_k`` the ranking inside
``BM25.search``."""

from __future__ import annotations

import math

from .checks import call, exercise, expect
from .retrieval import BM25, rag_prompt, recall_at_k, words

LAB = "08"

_CORPORA = [
    (["the cat sat on the mat", "the dog sat", "a cat and a cat and a dog", "birds fly south in winter"], "cat sat"),
    (
        [
            "Tara Voss was born in Tollmere.",
            "Tara Voss works for Orbis Maps. She studied at Cray University.",
            "Ada Bell was born in Selvin.",
        ],
        "Where was Tara Voss born?",
    ),
    (["one", "one one one one one one one one", "two three"], "one"),
]


@exercise(LAB, "bm25_scores", "BM25 scores of every document for a query")
def _check_bm25_scores(fn) -> None:
    for documents, query in _CORPORA:
        for k1, b in [(1.5, 0.75), (1.2, 0.0), (0.9, 1.0)]:
            case = f"query {query!r} over {len(documents)} documents with k1={k1}, b={b}"
            expected = BM25(documents, k1=k1, b=b).scores(query)
            got = call(fn, words(query), [words(d) for d in documents], k1, b, case=case)
            expect(
                isinstance(got, list | tuple) and len(got) == len(documents),
                f"on {case}: return one score per document, got {got!r}",
            )
            if not all(
                math.isclose(float(g), e, rel_tol=1e-6, abs_tol=1e-9) for g, e in zip(got, expected, strict=True)
            ):
                hint = (
                    "with b=0 the length of a document must not matter"
                    if b == 0
                    else "IDF is log(1 + (N - df + 0.5) / (df + 0.5)); each matching term adds "
                    "IDF * f * (k1 + 1) / (f + k1 * (1 - b + b * |d| / avgdl))"
                )
                expect(
                    False,
                    f"on {case}: expected {[round(e, 4) for e in expected]}, got {[round(float(g), 4) for g in got]}; "
                    f"{hint}",
                )


@exercise(LAB, "top_k", "the k best documents, best first")
def _check_top_k(fn) -> None:
    cases = [
        ("a tie between documents 1 and 3 (the lower index first)", [0.1, 2.0, 0.5, 2.0, 1.0], 3, [1, 3, 4]),
        ("k larger than the number of documents (return them all)", [3.0, 1.0], 5, [0, 1]),
        ("k = 1", [0.0, 0.0, 0.2], 1, [2]),
    ]
    for case, scores, k, expected in cases:
        got = call(fn, list(scores), k, case=case)
        expect(
            list(got) == expected,
            f"on {case}: scores {scores}, k={k}: expected indices {expected}, got {got!r}. "
            "Sort indices by score, highest first, ties by the lower index, and keep at most k",
        )


@exercise(LAB, "recall_at_k", "recall@k of a retriever")
def _check_recall_at_k(fn) -> None:
    rankings = [[3, 1, 2], [0, 2, 1], [2, 0, 1], [1, 2, 0]]
    relevant = [{1}, {1}, {5}, {0, 1}]
    for k in (1, 2, 3):
        case = f"rankings {rankings}, relevant {relevant}, k={k}"
        got = call(fn, rankings, relevant, k, case=case)
        expected = recall_at_k(rankings, relevant, k)
        expect(
            isinstance(got, int | float) and math.isclose(got, expected),
            f"on {case}: expected {expected}, got {got!r}. A query counts when any relevant document is among its "
            "first k results; "
            "divide by the number of queries",
        )


@exercise(LAB, "rag_prompt", "the retrieval-augmented prompt")
def _check_rag_prompt(fn) -> None:
    cases = [
        ("Where was Tara Voss born?", ["Tara Voss was born in Tollmere.", "Ada Bell works for Orbis Maps."]),
        ("What did Ada Bell study?", ["Ada Bell majored in history."]),
        ("Who works for Orbis Maps?", ["A.", "B was born in Selvin.", "C works for Orbis Maps."]),
    ]
    for question, documents in cases:
        case = f"question {question!r} with {len(documents)} documents"
        got = call(fn, question, list(documents), case=case)
        expected = rag_prompt(question, documents)
        expect(
            got == expected,
            f"on {case}: expected {expected!r}, got {got!r}. The line 'Read this text and answer the question.', "
            "then each document on its own line, then 'Question: ' and the question, joined by newlines",
        )
