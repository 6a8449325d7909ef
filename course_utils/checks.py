"""Exercise checks: one API for every lab.

In a notebook, after the student's function::

    from course_utils.checks import check
    check(get_pair_counts)          # the exercise is found from the function's name

prints a verdict a student can act on (which case, what was expected, what came back) and a
running score for the lab. A wrong answer never ends in a bare traceback.

A grader calls :func:`evaluate` with a function taken from an executed notebook; it prints nothing
and returns a :class:`Verdict`. Checks live here, not in the notebook, so a student who redefines
``check`` changes nothing that a fresh import of this module does.

Writing a check: decorate a function ``_check_<exercise>`` that takes the student's function, calls it
through :func:`call` once per case (which turns exceptions into a verdict, and counts the case by its
label) and compares with :func:`expect_equal`, :func:`expect_close` or :func:`expect`. Case tables
put the label first: ``(case, *arguments)``.
"""

from __future__ import annotations

import importlib
import os
import random
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PASSED, FAILED, TODO = "passed", "failed", "not implemented"


@dataclass(frozen=True)
class Exercise:
    lab: str  # "01"
    name: str  # the function the student writes; unique across the course
    title: str
    checker: Callable[[Callable[..., Any]], None]
    points: float = 1.0


@dataclass(frozen=True)
class Verdict:
    lab: str
    exercise: str
    status: str  # PASSED, FAILED or TODO
    message: str
    points: float
    max_points: float

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def line(self) -> str:
        mark = {PASSED: "✅", FAILED: "❌", TODO: "⏳"}[self.status]
        return f"{mark} {self.exercise}: {self.message}"


class CheckFailed(AssertionError):
    """A case failed; the message is the verdict the student sees."""


class NotYetImplemented(Exception):
    """The student's function still raises NotImplementedError."""


class RemoteProblem(Exception):
    """A function called in another process (by the grader) could not give a result; the message completes
    "on <case>, ..."."""


class StrictCheckError(AssertionError):
    """Raised after a failing verdict when COURSE_STRICT_CHECKS is set (CI on the complete notebooks)."""


EXERCISES: dict[str, Exercise] = {}
SCOREBOARD: dict[str, Verdict] = {}


def exercise(lab: str, name: str, title: str, points: float = 1.0):
    """Register ``checker`` as the check of exercise ``name`` of ``lab``."""

    def register(checker: Callable[[Callable[..., Any]], None]) -> Callable[[Callable[..., Any]], None]:
        if name in EXERCISES:
            raise ValueError(f"exercise {name!r} is registered twice")
        EXERCISES[name] = Exercise(lab, name, title, checker, points)
        return checker

    return register


def exercises(lab: str | None = None) -> list[Exercise]:
    _load_all_labs()
    return [e for e in EXERCISES.values() if lab is None or e.lab == lab]


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


#: The case labels :func:`call` has seen during the running check: the number of cases it ran.
_CASES: set[str] = set()


def call(fn: Callable[..., Any], *args: Any, case: str) -> Any:
    """Call the student's function on one case; an exception becomes a verdict naming the case."""
    _CASES.add(case)
    try:
        return fn(*args)
    except NotImplementedError as e:
        raise NotYetImplemented(str(e)) from None
    except RemoteProblem as e:
        raise CheckFailed(f"on {case}, {e}") from None
    except TimeoutError:
        raise
    except Exception as e:  # the student's bug, reported with where it happened in their code
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "course_utils" not in f.filename]
        where = f" (line {frames[-1].lineno}: {frames[-1].line})" if frames and frames[-1].line else ""
        raise CheckFailed(f"on {case}, your function raised {type(e).__name__}: {e}{where}") from None


def expect_equal(got: Any, expected: Any, case: str, hint: str = "") -> None:
    if got != expected:
        raise CheckFailed(f"on {case}: expected {_short(expected)}, got {_short(got)}" + (f". {hint}" if hint else ""))


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def expect_close(got: Any, expected: Any, case: str, hint: str = "", atol: float = 1e-5) -> None:
    """``got`` is a tensor of ``expected``'s shape, finite, and within ``atol`` of it everywhere."""
    import torch  # optional here: Lab 01's checks run without torch

    expect(isinstance(got, torch.Tensor), f"on {case}: return a tensor, got {type(got).__name__}")
    expect(
        tuple(got.shape) == tuple(expected.shape),
        f"on {case}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}",
    )
    expect(bool(torch.isfinite(got).all()), f"on {case}: your result has inf or nan values. {hint}")
    diff = (got.float() - expected.float()).abs().max().item()
    expect(diff <= atol, f"on {case}: values differ from the expected ones by up to {diff:.2e}. {hint}")


def gradient(result: Any, wrt: Any, case: str) -> Any:
    """The gradient of the student's scalar ``result`` with respect to ``wrt``, or a verdict saying it has none."""
    import torch  # optional here: Lab 01's checks run without torch

    try:
        (grad,) = torch.autograd.grad(result, wrt, allow_unused=True)
    except RuntimeError as e:
        raise CheckFailed(
            f"on {case}: your result cannot be differentiated ({e}); compute it with torch operations"
        ) from None
    return torch.zeros_like(wrt) if grad is None else grad


def evaluate(name: str, fn: Any) -> Verdict:
    """Run exercise ``name``'s check on ``fn`` and return the verdict; prints nothing."""
    _load_all_labs()
    if name not in EXERCISES:
        raise KeyError(f"no exercise is called {name!r}; known: {', '.join(sorted(EXERCISES))}")
    ex = EXERCISES[name]

    def verdict(status: str, message: str) -> Verdict:
        return Verdict(ex.lab, name, status, message, ex.points if status == PASSED else 0.0, ex.points)

    if not callable(fn):
        return verdict(FAILED, f"expected a function called {name}, got {type(fn).__name__}")
    state = random.getstate()
    random.seed(0)  # checks draw their random cases from a fixed seed
    _CASES.clear()
    try:
        ex.checker(fn)
        n_cases = len(_CASES)
    except NotYetImplemented:
        return verdict(TODO, "not implemented yet: replace the `raise NotImplementedError` in its cell with your code")
    except CheckFailed as e:
        return verdict(FAILED, str(e))
    finally:
        random.setstate(state)
    return verdict(PASSED, f"passed all {n_cases} cases")


def check(fn: Callable[..., Any], name: str | None = None) -> None:
    """Check the student's ``fn`` (exercise found from its name), print the verdict and the lab's score."""
    name = name or getattr(fn, "__name__", "")
    try:
        result = evaluate(name, fn)
    except KeyError:
        print(f"❌ there is no exercise called {name!r}: keep the function name the exercise gives")
        return
    SCOREBOARD[name] = result
    print(result.line())
    lab_exercises = exercises(result.lab)
    done = sum(SCOREBOARD[e.name].points for e in lab_exercises if e.name in SCOREBOARD)
    total = sum(e.points for e in lab_exercises)
    print(f"   Lab {result.lab} score so far: {done:g}/{total:g}")
    if not result.passed and result.status == FAILED and os.environ.get("COURSE_STRICT_CHECKS"):
        raise StrictCheckError(result.line())


def score(lab: str) -> dict[str, Verdict]:
    """Print and return this session's verdicts for every exercise of ``lab``."""
    rows = {}
    for ex in exercises(lab):
        v = SCOREBOARD.get(ex.name)
        rows[ex.name] = v
        print(v.line() if v else f"·  {ex.name}: not checked yet")
    return rows


LAB_MODULES = (
    "course_utils.checks_lab01",
    "course_utils.checks_lab02",
    "course_utils.checks_lab03",
    "course_utils.checks_lab04",
    "course_utils.checks_lab05",
    "course_utils.checks_lab06",
    "course_utils.checks_lab07",
    "course_utils.checks_lab08",
    "course_utils.checks_lab09",
)


def _load_all_labs() -> None:
    """Import each lab's check module (importing registers its exercises). After a reload of this
    module the registry is empty, so the lab modules are reloaded too."""
    if EXERCISES and all(m in sys.modules for m in LAB_MODULES):
        return
    for module in LAB_MODULES:
        if module in sys.modules and not any(e.checker.__module__ == module for e in EXERCISES.values()):
            importlib.reload(sys.modules[module])
        else:
            importlib.import_module(module)
