"""Recipes: the commands that build the course's reference artefacts, on top of the library.

The library (every other module of ``course_utils``) is what the notebooks import; a recipe chains
library functions into one command that makes one artefact, as a training script does. Nothing in the
library imports a recipe. Every recipe

* is a module with ``main(argv) -> int`` (tests call it with small settings);
* resumes from its run folder under ``runs/`` when it was cut off;
* ends through :func:`finish`, which writes the artefact's card: the command, the code version, the
  hashes of the data it was made from, the wall time and the measured metrics.

    python -m course_utils.recipes                   # list the recipes, in the order of the chain
    python -m course_utils.recipes all               # rebuild the shipped chain in order (hours on a CPU)
    python -m course_utils.recipes base-model --max-steps 1500

``make artefacts`` runs ``all``.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artefacts import write_card


@dataclass(frozen=True)
class Recipe:
    name: str
    module: str  # course_utils.recipes.<module>
    args: tuple[str, ...]  # the arguments that make the shipped artefact
    what: str
    shipped: bool = True  # part of the chain that `all` rebuilds


#: The chain, in the order its artefacts depend on each other.
RECIPES = (
    Recipe("tokenizer", "tokenizer", (), "the course tokenizer (Labs 01-05): data/artefacts/tokenizer.json"),
    Recipe(
        "base-tokenizer",
        "tokenizer",
        ("--world-seed", "0"),
        "the base model's tokenizer: data/artefacts/base_tokenizer.json",
    ),
    Recipe("base-model", "base_model", (), "the reference base model (Labs 06-09): data/artefacts/base_model.pt"),
    Recipe("sft-model", "sft_model", (), "the reference SFT model (Labs 06-09): data/artefacts/sft_model.pt"),
    Recipe(
        "scaling-sweep", "scaling_sweep", (), "Lab 05's IsoFLOP sweep: data/artefacts/scaling_sweep.csv", shipped=False
    ),
    Recipe(
        "grpo",
        "grpo",
        (),
        "a GRPO run from the SFT model (Lab 09's gpu profile): runs/grpo/summary.json",
        shipped=False,
    ),
)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran: ``python -m course_utils.recipes.<module> <arguments>``."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m course_utils.recipes." + module, *args])


def finish(
    artefact: Path,
    *,
    module: str,
    argv: list[str] | None,
    data: dict[str, str],
    metrics: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """The end of every recipe: write ``artefact``'s card (command, code version, data hashes, the wall
    time since ``started`` (a ``time.perf_counter()`` reading) and ``metrics``) and print the metrics."""
    seconds = time.perf_counter() - started
    write_card(Path(artefact), command=command_line(module, argv), data=data, metrics=metrics, wall_seconds=seconds)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {artefact} and its card in {seconds / 60:.1f} min")
    return metrics


def _runner(recipe: Recipe) -> Callable[[list[str]], int]:
    """The recipe's ``main``; its module is imported only when it runs."""
    return importlib.import_module(f"{__name__}.{recipe.module}").main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    by_name = {r.name: r for r in RECIPES}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n")
        for r in RECIPES:
            print(f"  {r.name:15s} {r.what}" + ("" if r.shipped else "  (not part of `all`)"))
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        if rest:
            print("error: `all` takes no arguments; run a single recipe to change its settings", file=sys.stderr)
            return 2
        for recipe in (r for r in RECIPES if r.shipped):
            print(
                f"== {recipe.name}: python -m course_utils.recipes.{recipe.module} {' '.join(recipe.args)}", flush=True
            )
            code = _runner(recipe)(list(recipe.args))
            if code:
                return code
        return 0
    if name not in by_name:
        print(f"error: no recipe called {name!r}; choose from all, {', '.join(by_name)}", file=sys.stderr)
        return 2
    return _runner(by_name[name])(list(by_name[name].args) + rest)
