"""Scaling laws: count a run's compute, fit power laws, IsoFLOP minima and the Chinchilla form.

Three fits, as in Hoffmann et al. (2022):

* a power law ``y = a * x**b`` is a straight line in log-log space, fitted by least squares there;
* approach 2: at each compute budget the final loss against ``log N`` is close to a parabola; its
  vertex is the compute-optimal size ``N*(C)``, and ``D*(C) = C / (6 N*)``; power laws through the
  vertices give ``N* ∝ C^a`` and ``D* ∝ C^b``;
* approach 3: ``L(N, D) = E + A / N**alpha + B / D**beta``, fitted by minimising a Huber loss
  (delta 1e-3) between the predicted and measured *log* losses, with L-BFGS started from a grid.
"""

from __future__ import annotations

import csv
import itertools
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import tinystories, token_cache
from .model import GPT, GPTConfig
from .tokenizer import train_bpe_fast
from .train import TrainConfig, Trainer

#: The fit published by Hoffmann et al. (2022), approach 3 (their eq. 10), for N and D in parameters and tokens.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def fit_power_law(x, y) -> tuple[float, float]:
    """``(a, b)`` with ``y ≈ a * x**b``: a least-squares line through ``(log x, log y)``. x, y: (n,) positive."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need two 1-D arrays of equal length >= 2, got shapes {x.shape} and {y.shape}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("a power law is fitted in log space: every x and y must be positive")
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return float(math.exp(log_a)), float(b)


def isoflop_vertex(n_params, losses) -> tuple[float, np.ndarray]:
    """Fit ``loss ≈ c2 (log N)^2 + c1 log N + c0`` to one budget's runs; return the vertex
    ``N* = exp(-c1 / (2 c2))`` and the coefficients ``(c2, c1, c0)``. Needs three runs or more and a
    parabola that opens upwards (a minimum inside the sweep, not a slope)."""
    n, loss = np.asarray(n_params, dtype=float), np.asarray(losses, dtype=float)
    if len(n) < 3 or n.shape != loss.shape:
        raise ValueError(
            f"an IsoFLOP parabola needs three runs or more with one loss each, got {len(n)} sizes and {len(loss)} "
            "losses"
        )
    log_n = np.log(n)
    coeffs = np.polyfit(log_n, loss, 2)
    span = log_n.max() - log_n.min()
    vertex = -coeffs[1] / (2 * coeffs[0]) if coeffs[0] > 0 else math.inf
    if not log_n.min() - span <= vertex <= log_n.max() + span:
        raise ValueError(
            "the losses do not curve upwards in log N within the sweep, so this budget has no minimum there; "
            "add smaller and larger models"
        )
    return float(math.exp(vertex)), coeffs


def chinchilla_loss(n, d, params: dict[str, float] = CHINCHILLA):
    """``E + A / N**alpha + B / D**beta``, elementwise over arrays ``n`` (parameters) and ``d`` (tokens)."""
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    return params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]


def huber_log_objective(
    theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_loss: torch.Tensor, delta: float = 1e-3
) -> torch.Tensor:
    """The summed Huber loss (``delta``) between predicted and measured log-losses, the objective of
    Chinchilla's approach 3. ``theta = (e, a, b, alpha, beta)`` with ``E = exp(e)``, ``A = exp(a)``,
    ``B = exp(b)``, so ``log L = logsumexp(a - alpha log N, b - beta log D, e)``. theta: (5,) or (S, 5)
    starts at once; log_n, log_d, log_loss: (R,) runs. Returns () or (S,)."""
    e, a, b, alpha, beta = (x.unsqueeze(-1) for x in theta.unbind(-1))
    pred = torch.logsumexp(
        torch.stack(torch.broadcast_tensors(a - alpha * log_n, b - beta * log_d, e + 0 * log_n)), dim=0
    )
    return torch.nn.functional.huber_loss(pred, log_loss.expand_as(pred), delta=delta, reduction="none").sum(-1)


def fit_chinchilla(
    n, d, losses, *, delta: float = 1e-3, grid: dict[str, tuple[float, ...]] | None = None, top_k: int = 5
) -> dict[str, float]:
    """Approach 3: the ``E, A, B, alpha, beta`` whose log-loss best matches ``log(losses)`` under a Huber
    loss. Parameterised as ``a = log A``, ``b = log B``, ``e = log E``, so the prediction is
    ``logsumexp(a - alpha log N, b - beta log D, e)``; the ``top_k`` best starts of the grid are refined
    by L-BFGS and the best end point kept. Returns the parameters and ``"objective"``, the summed Huber loss."""
    n, d, losses = (np.asarray(v, dtype=float) for v in (n, d, losses))
    if not (n.shape == d.shape == losses.shape) or len(n) < 5:
        raise ValueError(f"need N, D and loss for five runs or more (five parameters), got {len(n)}")
    if (n <= 0).any() or (d <= 0).any() or (losses <= 0).any():
        raise ValueError("N, D and the losses must all be positive")
    log_n, log_d, log_l = (torch.tensor(np.log(v), dtype=torch.float64) for v in (n, d, losses))
    grid = grid or {
        "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
        "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
        "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    }  # the grid of Hoffmann et al.

    def objective(theta):
        return huber_log_objective(theta, log_n, log_d, log_l, delta)

    starts = torch.tensor(
        list(itertools.product(grid["e"], grid["a"], grid["b"], grid["alpha"], grid["beta"])), dtype=torch.float64
    )
    with torch.no_grad():  # score the whole grid at once, then refine only the most promising starts
        scores = objective(starts)
    best, best_value = None, math.inf
    for start in starts[torch.argsort(scores)[:top_k]]:
        theta = start.clone().requires_grad_(True)
        optimiser = torch.optim.LBFGS(
            [theta], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe"
        )

        def closure(optimiser=optimiser, theta=theta):
            optimiser.zero_grad()
            value = objective(theta)
            value.backward()
            return value

        optimiser.step(closure)
        with torch.no_grad():
            value = float(objective(theta))
        if math.isfinite(value) and value < best_value:
            best, best_value = theta.detach().clone(), value
    if best is None:
        raise ValueError("no start of the grid converged; check the data for outliers")
    e, a, b, alpha, beta = best.tolist()
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta, "objective": best_value}


def optimal_allocation(params: dict[str, float], compute) -> tuple[np.ndarray, np.ndarray]:
    """The ``N*`` and ``D*`` that minimise ``L(N, D)`` of ``params`` subject to ``6 N D = C``
    (Hoffmann et al. 2022, eq. 4): ``N* = G (C/6)^(beta/(alpha+beta))`` with
    ``G = (alpha A / (beta B))^(1/(alpha+beta))``, and ``D* = C / (6 N*)``."""
    c = np.asarray(compute, dtype=float)
    alpha, beta = params["alpha"], params["beta"]
    g = (alpha * params["A"] / (beta * params["B"])) ** (1 / (alpha + beta))
    n_opt = g * (c / 6) ** (beta / (alpha + beta))
    return n_opt, c / (6 * n_opt)


# ---------------------------------------------------------------------------------------------
# Sweeps: which runs, how much compute, and their results as CSV
# ---------------------------------------------------------------------------------------------

SWEEP_FIELDS = (
    "budget",
    "n_layer",
    "n_embd",
    "n_head",
    "params",
    "tokens",
    "steps",
    "flops",
    "val_loss",
    "seconds",
    "heldout",
)


@dataclass(frozen=True)
class Run:
    """One point of a sweep: a model shape trained for a compute budget (FLOPs)."""

    budget: float
    n_layer: int
    n_embd: int
    n_head: int
    heldout: bool = False  # a run kept out of the fits, to test a prediction


def load_sweep(path: Path | str) -> list[dict[str, float]]:
    """Rows of a sweep CSV (:data:`SWEEP_FIELDS`), numbers as floats."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run the sweep (see its card) or restore data/artefacts")
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    missing = set(SWEEP_FIELDS) - set(rows[0] if rows else SWEEP_FIELDS)
    if not rows or missing:
        raise ValueError(
            f"{path} is not a sweep CSV: {'no rows' if not rows else f'columns {sorted(missing)} missing'}"
        )
    return rows


def save_sweep(rows: list[dict[str, float]], path: Path | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in SWEEP_FIELDS})


def run_params(n_layer: int, n_embd: int, vocab_size: int) -> int:
    """N of a model shape: every weight a token's computation multiplies by (the blocks, the final norm
    and the tied embedding/output matrix), not the position table. ``6 N`` is then its FLOPs per token
    without attention, matching :meth:`GPT.flops_per_token`."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = GPT(GPTConfig(vocab_size=vocab_size, context_length=8, n_layer=n_layer, n_head=1, n_embd=n_embd))
    return model.num_parameters() - model.position_parameters()


def run_sweep(
    runs: list[Run],
    train_tokens,
    val_tokens,
    vocab_size: int,
    *,
    context_length: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    eval_batches: int = 10,
    device: str = "auto",
    out: Path | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train every run for its compute budget and record its final validation loss.

    A run's FLOPs per token are ``GPT.flops_per_token`` (6N plus attention); its tokens are
    ``D = budget / flops_per_token``, rounded to whole steps of ``batch_size * context_length``. Each
    run warms up for 10% of its steps and decays on a cosine to 10% of ``lr``. With ``out`` each row is
    appended to that CSV as soon as it is done, and runs already in it are skipped, so an interrupted
    sweep resumes where it stopped."""
    done = {
        (r["budget"], r["n_layer"], r["n_embd"]): r for r in (load_sweep(out) if out and Path(out).exists() else [])
    }
    rows: list[dict[str, float]] = []
    for run in tqdm(runs, desc="sweep", unit="run", disable=not progress):
        key = (float(run.budget), float(run.n_layer), float(run.n_embd))  # resuming: a row per run
        if key in done:
            rows.append(done[key])
            continue
        shape = GPTConfig(
            vocab_size=vocab_size,
            context_length=context_length,
            n_layer=run.n_layer,
            n_head=run.n_head,
            n_embd=run.n_embd,
        )
        cfg = TrainConfig(
            model=shape,
            out_dir=tempfile.mkdtemp(prefix="sweep-"),
            batch_size=batch_size,
            max_steps=1,
            lr=lr,
            eval_every=0,
            eval_batches=eval_batches,
            checkpoint_every=0,
            seed=seed,
            device=device,
        )
        trainer = Trainer(cfg, train_tokens, val_tokens)
        per_step = trainer.model.flops_per_token(context_length) * trainer.tokens_per_step
        steps = max(1, round(run.budget / per_step))
        if steps < 10:
            raise ValueError(
                f"budget {run.budget:.2e} gives the {run.n_layer}x{run.n_embd} model only {steps} steps; raise the "
                "budget or drop the size"
            )
        cfg.max_steps, cfg.warmup_steps = steps, max(1, steps // 10)
        start = time.perf_counter()
        trainer.fit(progress=False)
        shutil.rmtree(cfg.out_dir, ignore_errors=True)  # the per-step log of a sweep run is not kept
        row = {
            "budget": float(run.budget),
            "n_layer": run.n_layer,
            "n_embd": run.n_embd,
            "n_head": run.n_head,
            "params": float(trainer.model.num_parameters() - trainer.model.position_parameters()),
            "tokens": float(steps * trainer.tokens_per_step),
            "steps": steps,
            "flops": steps * per_step,
            "val_loss": trainer.evaluate(),
            "seconds": time.perf_counter() - start,
            "heldout": float(run.heldout),
        }
        rows.append(row)
        if out:
            existing = load_sweep(out) if Path(out).exists() else []
            save_sweep(existing + [row], out)
    return rows


def isoflop_runs(budgets, shapes: list[tuple[int, int]], head_dim: int = 64) -> list[Run]:
    """Every (budget, shape) pair as a :class:`Run`; ``shapes`` are ``(n_layer, n_embd)``."""
    return [Run(float(c), n_layer, n_embd, max(1, n_embd // head_dim)) for c in budgets for n_layer, n_embd in shapes]


# ---------------------------------------------------------------------------------------------
# The sweeps of Lab 05, per profile, and the command that makes the shipped one
# ---------------------------------------------------------------------------------------------

#: Sweep vocabulary. With the course's 4,096 ids the embedding would be most of every small model
#: here; 512 ids keep the blocks, where the scaling happens, the larger part.
SWEEP_VOCAB = 512

#: Per profile: compute budgets (FLOPs), model shapes (n_layer, n_embd), the held-out budget, and the
#: context and batch every run uses.
SWEEPS = {
    "gpu": {
        "budgets": (1e13, 3e13, 1e14, 3e14),
        "shapes": ((2, 64), (2, 96), (3, 128), (4, 192), (6, 256), (6, 384)),
        "heldout_budget": 1e15,
        "context_length": 256,
        "batch_size": 32,
    },
    "cpu": {
        "budgets": (3e11, 1e12, 3e12, 1e13),
        "shapes": ((1, 16), (1, 32), (2, 48), (2, 64), (3, 96), (4, 128)),
        "heldout_budget": 3e13,
        "context_length": 128,
        "batch_size": 16,
    },
    "smoke": {
        "budgets": (1e10, 3e10),
        "shapes": ((1, 8), (1, 16), (1, 32), (2, 48)),
        "heldout_budget": 1e11,
        "context_length": 64,
        "batch_size": 16,
    },
}

#: Shapes the held-out run may take: the one whose N is nearest the predicted N* is trained.
CANDIDATE_SHAPES = (
    (1, 32),
    (2, 48),
    (2, 64),
    (3, 96),
    (4, 128),
    (4, 160),
    (4, 192),
    (6, 256),
    (6, 320),
    (6, 384),
    (8, 512),
)


def sweep_corpus(vocab_size: int = SWEEP_VOCAB):
    """``(tokenizer, train_tokens, val_tokens)`` for sweeps: a ``vocab_size`` tokenizer trained on the
    training stories (deterministic, about a second) and the cached token arrays."""
    tokenizer = train_bpe_fast(tinystories("train"), vocab_size, name=f"sweep-bpe-{vocab_size}")
    return tokenizer, token_cache(tokenizer, "train"), token_cache(tokenizer, "val")


def frontier(rows: list[dict[str, float]]) -> dict[float, tuple[float, float]]:
    """Approach 2 over a sweep: ``{budget: (N*, D*)}`` from each budget's IsoFLOP parabola, where it has one."""
    out = {}
    for budget in sorted({r["budget"] for r in rows if not r.get("heldout")}):
        pts = [
            (r["params"], r["val_loss"], r["flops"] / r["params"] / r["tokens"])
            for r in rows
            if r["budget"] == budget and not r.get("heldout")
        ]
        try:
            n_opt, _ = isoflop_vertex([p[0] for p in pts], [p[1] for p in pts])
        except ValueError:
            continue
        flops_per_param_token = float(np.mean([p[2] for p in pts]))  # ~6, a little more with attention
        out[budget] = (n_opt, budget / (flops_per_param_token * n_opt))
    return out


def check_sweep(rows: list[dict[str, float]]) -> None:
    """Raise a ValueError that says what to fix unless the sweep can be fitted: two budgets or more,
    three sizes or more at each, positive losses, and each budget's smallest loss at an interior size
    (a smaller and a larger model both did worse)."""
    fitted = [r for r in rows if not r.get("heldout")]
    bad = [r for r in fitted if not r["val_loss"] > 0 or not r["params"] > 0 or not r["tokens"] > 0]
    if bad:
        r = bad[0]
        raise ValueError(
            f"{len(bad)} run(s) with a loss, size or token count that is not positive (first: budget "
            f"{r['budget']:.0e}, {r['n_layer']:.0f}x{r['n_embd']:.0f}, loss {r['val_loss']}); rerun or drop them"
        )
    budgets = sorted({r["budget"] for r in fitted})
    if len(budgets) < 2:
        raise ValueError(
            f"the sweep has {len(budgets)} budget(s); how N* grows with compute needs two or more: add a budget"
        )
    for budget in budgets:
        runs = sorted((r for r in fitted if r["budget"] == budget), key=lambda r: r["params"])
        if len(runs) < 3:
            raise ValueError(f"budget {budget:.0e} has {len(runs)} sizes; an IsoFLOP curve needs three or more")
        best = int(np.argmin([r["val_loss"] for r in runs]))
        if best in (0, len(runs) - 1):
            side = "smaller" if best == 0 else "larger"
            raise ValueError(
                f"budget {budget:.0e} has its lowest loss at its {'smallest' if best == 0 else 'largest'} size "
                f"({runs[best]['params']:,.0f} parameters), so its minimum is not inside the sweep: add {side} models"
            )


def bootstrap_exponent(rows: list[dict[str, float]], samples: int = 1000, seed: int = 0) -> np.ndarray:
    """The exponent of ``N* ∝ C^a`` refitted on ``samples`` resamples of the sweep (each budget's runs
    drawn with replacement); resamples in which a budget has no IsoFLOP vertex are dropped."""
    rng = np.random.default_rng(seed)
    fitted = [r for r in rows if not r.get("heldout")]
    budgets = sorted({r["budget"] for r in fitted})
    by_budget = {c: [r for r in fitted if r["budget"] == c] for c in budgets}
    out = []
    with warnings.catch_warnings():  # a resample that repeats one size fits a parabola poorly: dropped below
        warnings.simplefilter("ignore", getattr(np, "exceptions", np).RankWarning)
        for _ in range(samples):
            vertices = []
            for c in budgets:
                pick = [by_budget[c][i] for i in rng.integers(0, len(by_budget[c]), len(by_budget[c]))]
                try:
                    vertices.append(isoflop_vertex([r["params"] for r in pick], [r["val_loss"] for r in pick])[0])
                except (ValueError, np.linalg.LinAlgError):
                    break
            if len(vertices) == len(budgets):
                out.append(fit_power_law(budgets, vertices)[1])
    return np.array(out)


def nearest_shape(n_params: float, vocab_size: int, shapes=CANDIDATE_SHAPES) -> tuple[int, int]:
    """The shape whose N (:func:`run_params`) is nearest ``n_params`` on a log scale."""
    return min(shapes, key=lambda s: abs(math.log(run_params(*s, vocab_size)) - math.log(n_params)))
