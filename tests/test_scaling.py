import numpy as np
import pytest

from course_utils import scaling
from course_utils.scaling import (
    CHINCHILLA,
    chinchilla_loss,
    fit_chinchilla,
    fit_power_law,
    isoflop_vertex,
    optimal_allocation,
)


@pytest.mark.parametrize("seed", [0, 1])
def test_approach_3_recovers_the_chinchilla_exponents_from_noisy_losses(seed):
    n = np.repeat(np.geomspace(1e6, 1e9, 8), 8)
    d = np.tile(np.geomspace(1e8, 1e11, 8), 8)
    losses = chinchilla_loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, 0.01, len(n)))  # 1% noise
    fit = fit_chinchilla(n, d, losses)
    assert abs(fit["alpha"] - CHINCHILLA["alpha"]) < 0.03 and abs(fit["beta"] - CHINCHILLA["beta"]) < 0.03, fit
    assert fit["E"] == pytest.approx(CHINCHILLA["E"], rel=0.1)


def test_power_law_is_exact_on_a_power_law_and_rejects_non_positive_values():
    x = np.array([1.0, 10.0, 100.0, 1000.0])
    a, b = fit_power_law(x, 3.0 * x**-0.25)
    assert a == pytest.approx(3.0) and b == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1.0, 2.0], [1.0, 0.0])


def test_isoflop_vertex_and_a_budget_without_a_minimum():
    n = np.geomspace(1e5, 1e8, 7)
    n_opt, _ = isoflop_vertex(n, 2.0 + 0.1 * (np.log(n) - np.log(3e6)) ** 2)
    assert n_opt == pytest.approx(3e6, rel=1e-6)
    with pytest.raises(ValueError, match="no minimum"):
        isoflop_vertex(n, 3.0 - 0.1 * np.log(n))


def test_optimal_allocation_minimises_the_loss_at_fixed_compute():
    c = 1e21
    n_opt, d_opt = optimal_allocation(CHINCHILLA, c)
    assert 6 * n_opt * d_opt == pytest.approx(c)
    sizes = np.geomspace(n_opt / 10, n_opt * 10, 20001)
    assert sizes[np.argmin(chinchilla_loss(sizes, c / (6 * sizes)))] == pytest.approx(n_opt, rel=1e-3)


def test_sweep_csv_round_trip_and_bad_files(tmp_path):
    rows = [{k: float(i + j) for j, k in enumerate(scaling.SWEEP_FIELDS)} for i in range(3)]
    scaling.save_sweep(rows, tmp_path / "s.csv")
    assert scaling.load_sweep(tmp_path / "s.csv") == rows
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing"):
        scaling.load_sweep(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="sweep"):
        scaling.load_sweep(tmp_path / "none.csv")


def test_lab05_checks_accept_the_reference_and_reject_mistakes():
    import torch

    from course_utils.checks import FAILED, PASSED, evaluate

    def objective(theta, log_n, log_d, log_loss, delta):
        return scaling.huber_log_objective(theta, log_n, log_d, log_loss, delta)

    def squared(theta, log_n, log_d, log_loss, delta):  # least squares, not Huber
        e, a, b, alpha, beta = theta
        pred = torch.logsumexp(torch.stack([a - alpha * log_n, b - beta * log_d, e + 0 * log_n]), dim=0)
        return ((pred - log_loss) ** 2).sum()

    assert evaluate("fit_power_law", fit_power_law).status == PASSED
    assert (
        evaluate("fit_power_law", lambda x, y: tuple(np.polyfit(np.log(x), np.log(y), 1))).status == FAILED
    )  # (slope, intercept)
    assert evaluate("isoflop_vertex", lambda n, loss: isoflop_vertex(n, loss)[0]).status == PASSED
    assert (
        evaluate("isoflop_vertex", lambda n, loss: float(n[np.argmin(loss)])).status == FAILED
    )  # the best run, not the vertex
    assert evaluate("huber_log_objective", objective).status == PASSED
    verdict = evaluate("huber_log_objective", squared)
    assert verdict.status == FAILED and "Huber" in verdict.message


def test_a_sweep_records_its_runs_resumes_from_its_csv_and_leaves_no_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokens = np.random.default_rng(0).integers(0, 64, 30_000).astype(np.uint16)
    runs = scaling.isoflop_runs([2e8], [(1, 16), (1, 32)], head_dim=16)
    rows = scaling.run_sweep(
        runs,
        tokens,
        tokens,
        64,
        context_length=16,
        batch_size=4,
        eval_batches=2,
        device="cpu",
        out="s.csv",
        progress=False,
    )
    assert [r["n_embd"] for r in rows] == [16, 32] and all(r["flops"] == pytest.approx(2e8, rel=0.05) for r in rows)
    assert rows[0]["tokens"] > rows[1]["tokens"]  # same compute: the smaller model sees more tokens
    again = scaling.run_sweep(
        runs, tokens, tokens, 64, context_length=16, batch_size=4, device="cpu", out="s.csv", progress=False
    )
    assert again == scaling.load_sweep("s.csv")  # read back, not retrained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]


def _row(budget, params, loss, heldout=0.0):
    return dict(budget=budget, n_layer=1.0, n_embd=params / 1000, n_head=1.0, params=params, tokens=budget / 6 / params,
                steps=10.0, flops=budget, val_loss=loss, seconds=1.0, heldout=heldout)  # fmt: skip


def _bowl(budget, centre):
    return [_row(budget, n, 3.0 + 0.1 * (np.log(n) - np.log(centre)) ** 2) for n in np.geomspace(1e4, 1e6, 5)]


def test_a_sweep_that_cannot_be_fitted_says_what_to_add():
    good = _bowl(1e12, 1e5) + _bowl(1e13, 3e5)
    scaling.check_sweep(good)
    with pytest.raises(ValueError, match="needs two or more: add a budget"):
        scaling.check_sweep(_bowl(1e12, 1e5))
    with pytest.raises(ValueError, match="largest size .* add larger models"):
        scaling.check_sweep(_bowl(1e12, 1e5) + _bowl(1e13, 1e7))
    with pytest.raises(ValueError, match="smallest size .* add smaller models"):
        scaling.check_sweep(_bowl(1e12, 1e3) + _bowl(1e13, 3e5))
    with pytest.raises(ValueError, match="not positive"):
        scaling.check_sweep(good[:-1] + [_row(1e13, 1e6, 0.0)])


def test_the_bootstrap_spreads_around_the_fitted_exponent():
    rng = np.random.default_rng(1)
    budgets = [1e11, 1e12, 1e13, 1e14]
    rows = [r for c in budgets for r in _bowl(c, 1e5 * (c / 1e11) ** 0.5)]
    for r in rows:
        r["val_loss"] += rng.normal(0, 0.002)
    exponents = scaling.bootstrap_exponent(rows, 200, seed=0)
    assert len(exponents) > 100 and abs(np.median(exponents) - 0.5) < 0.05 and exponents.std() > 0
