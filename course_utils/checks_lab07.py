"""Checks for Lab 07 (in-context learning). References: :mod:`course_utils.icl` and, for
``normalise_answer``, :mod:`course_utils.world`."""

from __future__ import annotations

import math

import torch

from .checks import call, exercise, expect
from .icl import copy_ratio, few_shot_prompt
from .world import normalise_answer

LAB = "07"


@exercise(LAB, "few_shot_prompt", "a few-shot prompt")
def _check_few_shot_prompt(fn) -> None:
    cases = [
        ("no examples (zero-shot)", [], "Where was Ada Bell born?"),
        ("one example", [("Where was Tara Voss born?", "Tollmere")], "Where was Ada Bell born?"),
        (
            "three examples",
            [
                ("Who does A work for?", "Orbis Maps"),
                ("Who does B work for?", "Kelvane Bank"),
                ("Who does C work for?", "Ostro Motors"),
            ],
            "Who does D work for?",
        ),
    ]
    for case, examples, question in cases:
        got = call(fn, list(examples), question, case=case)
        expected = few_shot_prompt(examples, question)
        if got != expected:
            hint = (
                "Each example is 'Q: question', a line break, 'A: answer'; examples and the question are "
                "separated by an empty line"
            )
            if isinstance(got, str) and got.rstrip() == expected and got != expected:
                hint = (
                    "end the prompt with 'A:' and nothing after it: a trailing space would be a token the model "
                    "never saw there"
                )
            elif isinstance(got, str) and got.replace("\n\n", "\n") == expected.replace("\n\n", "\n"):
                hint = (
                    "separate the examples with an empty line ('\\n\\n'), so each question and answer is one paragraph"
                )
            expect(False, f"on {case}: expected {expected!r}, got {got!r}. {hint}")


@exercise(LAB, "normalise_answer", "normalising answers before comparing them")
def _check_normalise_answer(fn) -> None:
    cases = [
        ("an answer with a full stop and capitals", "Tollmere."),
        ("an article to drop", "The Corran Institute"),
        ("an ampersand and spaces", "  Marlow &  Finch "),
        ("a date", "March 4, 1961"),
        ("articles inside words are kept", "Anthea and Theo"),
    ]
    for case, text in cases:
        got = call(fn, text, case=case)
        expected = normalise_answer(text)
        if got != expected:
            hint = "lower case, '&' as 'and', punctuation removed, the words a/an/the removed, single spaces"
            if isinstance(got, str) and " the " in f" {got} ":
                hint = "remove the articles a, an and the as whole words (\\b in a regular expression)"
            elif isinstance(got, str) and got.split() == expected.split():
                hint = "join the words with single spaces and strip the ends"
            expect(False, f"on {case} ({text!r}): expected {expected!r}, got {got!r}. {hint}")


@exercise(LAB, "copy_ratio", "the copy score from per-token losses")
def _check_copy_ratio(fn) -> None:
    g = torch.Generator().manual_seed(0)
    cases = [
        ("a model that does not copy", torch.full((2, 10), 6.0) + 0.1 * torch.rand(2, 10, generator=g)),
        ("a model that copies", torch.cat([torch.full((3, 8), 6.0), torch.full((3, 8), 0.5)], dim=1)),
        ("random losses", 5 * torch.rand(4, 24, generator=g)),
    ]
    for case, losses in cases:
        losses[:, 0] = 9.0  # the first token of each copy cannot be predicted: leave it out
        losses[:, losses.size(1) // 2] = 9.0
        got = call(fn, losses.clone(), case=case)
        expected = copy_ratio(losses)
        if not (isinstance(got, int | float) and math.isclose(float(got), expected, rel_tol=1e-5)):
            length = losses.size(1) // 2
            hint = (
                "the losses are of predicting tokens 1 .. 2L: the first copy is columns 1 .. L-1 and the second "
                "L+1 .. 2L-1 (each copy's first token cannot be predicted); return mean(second) / mean(first)"
            )
            if isinstance(got, int | float) and math.isclose(
                float(got), losses[:, length:].mean().item() / losses[:, :length].mean().item(), rel_tol=1e-5
            ):
                hint = "leave out the first token of each copy: nothing in the context predicts where a copy begins"
            elif isinstance(got, int | float) and got and math.isclose(1 / float(got), expected, rel_tol=1e-5):
                hint = "divide the second copy's loss by the first's, not the other way round"
            expect(False, f"on {case}: expected {expected:.4f}, got {got!r}. {hint}")
