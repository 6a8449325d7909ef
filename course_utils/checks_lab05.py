"""Checks for Lab 05 (scaling laws). References: :mod:`course_utils.scaling`."""

from __future__ import annotations

import math

import numpy as np
import torch

from .checks import call, exercise, expect
from .scaling import fit_power_law, huber_log_objective, isoflop_vertex

LAB = "05"


@exercise(LAB, "fit_power_law", "a power law fitted in log space")
def _check_fit_power_law(fn) -> None:
    rng = np.random.default_rng(0)
    cases = [
        ("an exact law y = 2 x^0.5", np.array([1.0, 4.0, 9.0, 16.0]), None, (2.0, 0.5)),
        ("a falling law y = 50 x^-0.3 over six decades", np.geomspace(1e3, 1e9, 7), None, (50.0, -0.3)),
        ("noisy points", np.geomspace(1e2, 1e6, 12), rng.normal(0, 0.05, 12), None),
    ]
    for case, x, noise, exact in cases:
        a0, b0 = exact or (7.0, -0.2)
        y = a0 * x**b0 * (np.exp(noise) if noise is not None else 1)
        got = call(fn, x, y, case=case)
        expect(isinstance(got, tuple) and len(got) == 2, f"on {case}: return a tuple (a, b), got {got!r}")
        expected = fit_power_law(x, y)
        expect(
            all(math.isclose(float(g), e, rel_tol=1e-6) for g, e in zip(got, expected, strict=True)),
            f"on {case}: expected (a, b) = ({expected[0]:.4g}, {expected[1]:.4g}), got ({float(got[0]):.4g}, "
            f"{float(got[1]):.4g}). "
            "Fit a straight line to (log x, log y) by least squares (np.polyfit(..., 1)); a = exp(intercept), b = "
            "slope",
        )


@exercise(LAB, "isoflop_vertex", "the compute-optimal size of one IsoFLOP curve")
def _check_isoflop_vertex(fn) -> None:
    n = np.geomspace(1e5, 1e7, 6)
    cases = [
        ("a parabola in log N with its minimum at N = 1e6", n, 3.0 + 0.2 * (np.log(n) - np.log(1e6)) ** 2),
        (
            "a lopsided set of runs",
            n[:4],
            2.5 + 0.05 * (np.log(n[:4]) - np.log(4e5)) ** 2 + np.array([0.0, 0.01, -0.01, 0.0]),
        ),
    ]
    for case, sizes, losses in cases:
        got = call(fn, sizes, losses, case=case)
        expected, _ = isoflop_vertex(sizes, losses)
        expect(
            isinstance(got, (float, int, np.floating)) and math.isclose(float(got), expected, rel_tol=1e-4),
            f"on {case}: expected N* = {expected:.4g}, got {got!r}. Fit loss = c2 (log N)^2 + c1 log N + c0 and return "
            "exp(-c1 / (2 c2))",
        )


@exercise(LAB, "huber_log_objective", "the Huber objective of the Chinchilla fit")
def _check_huber_log_objective(fn) -> None:
    g = torch.Generator().manual_seed(0)
    log_n = torch.log(torch.tensor([1e5, 3e5, 1e6, 3e6], dtype=torch.float64))
    log_d = torch.log(torch.tensor([1e7, 1e6, 3e7, 3e6], dtype=torch.float64))
    truth = torch.tensor([math.log(1.69), math.log(406.4), math.log(410.7), 0.34, 0.28], dtype=torch.float64)
    clean = torch.log(1.69 + 406.4 / log_n.exp() ** 0.34 + 410.7 / log_d.exp() ** 0.28)
    cases = [
        ("the published Chinchilla parameters, losses from that same law (objective 0)", truth, 1e-3),
        (
            "random parameters, residuals far beyond delta (the linear part)",
            torch.rand(5, generator=g, dtype=torch.float64),
            1e-3,
        ),
        ("residuals inside delta (the quadratic part)", truth + 0.05, 10.0),
    ]
    for case, theta, delta in cases:
        got = call(fn, theta.clone(), log_n, log_d, clean, delta, case=case)
        expected = huber_log_objective(theta, log_n, log_d, clean, delta)
        expect(
            torch.is_tensor(got) and got.dim() == 0,
            f"on {case}: return a scalar tensor (so L-BFGS can differentiate it), got {got!r}",
        )
        expect(
            math.isclose(float(got), float(expected), rel_tol=1e-6, abs_tol=1e-12),
            f"on {case}: expected {float(expected):.6g}, got {float(got):.6g}. Predict log L with logsumexp over "
            "(a - alpha log N, b - beta log D, e), then sum the Huber losses (delta) of prediction minus log loss",
        )
