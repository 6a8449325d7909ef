"""Lab 05's IsoFLOP sweep and its held-out run, as a CSV with its card::

    python -m course_utils.recipes.scaling_sweep --profile cpu     # data/artefacts/scaling_sweep.csv

Each finished run is appended to the CSV at once and skipped when the command runs again, so a sweep
that was cut off resumes where it stopped. The card records the Chinchilla fit on the sweep and how
well it predicts the held-out run, which no fit sees.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..data import tinystories_sha256, tokenizer_fingerprint
from ..lab import data_dir
from ..scaling import (
    SWEEPS,
    Run,
    bootstrap_exponent,
    check_sweep,
    chinchilla_loss,
    fit_chinchilla,
    fit_power_law,
    frontier,
    isoflop_runs,
    nearest_shape,
    run_sweep,
    sweep_corpus,
)
from . import finish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run Lab 05's IsoFLOP sweep and its held-out run; write the CSV and its card."
    )
    parser.add_argument("--profile", choices=tuple(SWEEPS), default="gpu")
    parser.add_argument("--out", type=Path, default=None, help="default: data/artefacts/scaling_sweep.csv")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    plan = SWEEPS[args.profile]
    out = args.out or data_dir() / "artefacts" / "scaling_sweep.csv"
    tokenizer, train, val = sweep_corpus()
    settings = {"context_length": plan["context_length"], "batch_size": plan["batch_size"]}
    try:
        rows = run_sweep(
            isoflop_runs(plan["budgets"], plan["shapes"]), train, val, tokenizer.n_vocab, out=out, **settings
        )
        check_sweep(rows)
        front = frontier(rows)
        k, a = fit_power_law(list(front), [n for n, _ in front.values()])
        shape = nearest_shape(k * plan["heldout_budget"] ** a, tokenizer.n_vocab)
        held = Run(plan["heldout_budget"], shape[0], shape[1], max(1, shape[1] // 64), heldout=True)
        rows = run_sweep(
            isoflop_runs(plan["budgets"], plan["shapes"]) + [held], train, val, tokenizer.n_vocab, out=out, **settings
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    fit = fit_chinchilla(
        *zip(*[(r["params"], r["tokens"], r["val_loss"]) for r in rows if not r["heldout"]], strict=True)
    )
    last = [r for r in rows if r["heldout"]][-1]
    predicted = float(chinchilla_loss(last["params"], last["tokens"], fit))
    budgets = sorted({r["budget"] for r in rows if not r["heldout"]})
    lowest = [min(r["val_loss"] for r in rows if r["budget"] == c and not r["heldout"]) for c in budgets]
    scale, slope = fit_power_law(budgets, lowest)
    power_law_prediction = scale * last["budget"] ** slope
    exponents = bootstrap_exponent(rows, 1000)
    front = frontier(rows)
    metrics = {
        "runs": len(rows),
        "n_star_exponent": round(fit_power_law(list(front), [n for n, _ in front.values()])[1], 4),
        "n_star_exponent_bootstrap_90": [round(float(v), 4) for v in np.percentile(exponents, [5, 95])],
        "tokens_per_parameter_at_optimum": {f"{c:.0e}": round(d / n, 1) for c, (n, d) in front.items()},
        "fit": {k: round(v, 5) for k, v in fit.items()},
        "heldout_measured": round(last["val_loss"], 4),
        "heldout_predicted": round(predicted, 4),
        "heldout_error": round(predicted / last["val_loss"] - 1, 4),
        # Kaplan's form on the same sweep: the lowest loss at each budget as a power law of C
        "heldout_predicted_power_law": round(power_law_prediction, 4),
        "heldout_error_power_law": round(power_law_prediction / last["val_loss"] - 1, 4),
        "seconds": round(sum(r["seconds"] for r in rows), 1),
    }
    finish(
        out,
        module="scaling_sweep",
        argv=argv,
        data={"tinystories_train": tinystories_sha256("train"), "tokenizer": tokenizer_fingerprint(tokenizer)},
        metrics=metrics,
        started=started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
