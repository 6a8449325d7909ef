"""Cards for the reference artefacts in ``data/artefacts/``: how each was made and what it scored.

A card sits beside its artefact (``tokenizer.json`` -> ``tokenizer.card.json``) and records the
exact command, the code version (package version and git commit), hashes of the data it was
made from, and its measured metrics.
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from pathlib import Path
from typing import Any

from . import __version__


def code_version() -> str:
    """``<package version>+<git commit>`` (with ``-dirty`` if uncommitted changes), or the version alone."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "course_utils"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return __version__
    return f"{__version__}+{commit}" + ("-dirty" if dirty else "")


def card_path(artefact: Path) -> Path:
    return artefact.with_name(artefact.name.split(".")[0] + ".card.json")


def write_card(artefact: Path, *, command: str, data: dict[str, str], metrics: dict[str, Any]) -> Path:
    card = {
        "artefact": artefact.name,
        "command": command,
        "code_version": code_version(),
        "created": _dt.date.today().isoformat(),
        "data_sha256": data,
        "metrics": metrics,
    }
    path = card_path(artefact)
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def read_card(artefact: Path) -> dict[str, Any]:
    return json.loads(card_path(artefact).read_text(encoding="utf-8"))
