"""Checkpoints and reference artefacts: written atomically, read back with a clear message when damaged.

* A *checkpoint* is a training run's whole state (:func:`save_checkpoint`, :func:`load_checkpoint`),
  written so that a run killed mid-write keeps the previous one.
* A *model artefact* (``data/artefacts/*.pt``) is a model's fp16 weights, its config and the fingerprint
  of its tokenizer (:func:`save_model`, :func:`load_model`).
* Every shipped artefact has a *card* beside it (``tokenizer.json`` -> ``tokenizer.card.json``): the
  exact command that made it, the code version (package version and git commit), hashes of the data it
  was made from, the wall time, and its measured metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .model import GPT, GPTConfig


class ArtefactError(RuntimeError):
    """An artefact is missing, damaged or does not belong with its tokenizer; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a temporary file, flushed to disk, then renamed over the old one, so a run
    killed mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(
    path: Path,
    fmt: Any,
    *,
    what: str = "checkpoint",
    fix: str = "delete it to start afresh",
    error: type[Exception] = ArtefactError,
    weights_only: bool = False,
) -> dict[str, Any]:
    """The dict stored at ``path`` whose ``"format"`` entry is ``fmt`` (a checkpoint, or with
    ``weights_only`` a model artefact). A file that cannot be read, or holds something else, raises
    ``error`` saying so and what to do (``fix``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        raise error(f"{path} is damaged and cannot be read ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise error(f"{path} is not a {what} of this course (format {fmt}); {fix}")
    return state


# ---------------------------------------------------------------------------------------------
# Cards
# ---------------------------------------------------------------------------------------------


def code_version() -> str:
    """``<package version>+<git commit>`` (with ``-dirty`` if uncommitted changes), or the version alone."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "course_utils"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return __version__
    return f"{__version__}+{commit}" + ("-dirty" if dirty else "")


def card_path(artefact: Path) -> Path:
    return artefact.with_name(artefact.name.split(".")[0] + ".card.json")


def write_card(
    artefact: Path, *, command: str, data: dict[str, str], metrics: dict[str, Any], wall_seconds: float | None = None
) -> Path:
    card = {
        "artefact": artefact.name,
        "command": command,
        "code_version": code_version(),
        "created": _dt.date.today().isoformat(),
        "data_sha256": data,
        "metrics": metrics,
    }
    if wall_seconds is not None:
        card["wall_seconds"] = round(wall_seconds, 1)
    path = card_path(artefact)
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def read_card(artefact: Path) -> dict[str, Any]:
    return json.loads(card_path(artefact).read_text(encoding="utf-8"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Model artefacts: 16-bit weights, checked against the card's hash when loaded
# ---------------------------------------------------------------------------------------------

MODEL_FORMAT = 1


def save_model(model: GPT, path: Path, *, tokenizer_id: str) -> int:
    """Store ``model`` with fp16 weights, its config and the fingerprint of its tokenizer; returns
    the file's size in bytes. Tied weights are stored once."""
    half = copy.deepcopy(model).to("cpu").half()  # converting the module keeps the tied matrix shared
    payload = {
        "format": MODEL_FORMAT,
        "model_config": dataclasses.asdict(model.config),
        "tokenizer": tokenizer_id,
        "model": half.state_dict(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path.stat().st_size


def load_model(
    path: Path, *, tokenizer_id: str | None = None, device: str = "cpu", dtype=None, verify: bool = True
) -> GPT:
    """Load a model stored by :func:`save_model`, in float32 (or ``dtype``) on ``device``.

    With ``verify`` the file's sha256 must equal the one in its card (``model_sha256`` in the card's
    metrics), so a truncated or altered file fails here with a clear message, not later with
    nonsense; with ``tokenizer_id`` the model must have been trained with that tokenizer."""
    path = Path(path)
    restore = "restore it with `git checkout data/artefacts` (or re-run the command in its card)"
    if not path.exists():
        raise ArtefactError(f"{path} is missing; {restore}")
    if verify:
        card = card_path(path)
        if not card.exists():
            raise ArtefactError(f"{card} (the card of {path.name}) is missing; {restore}")
        expected = read_card(path).get("metrics", {}).get("model_sha256")
        if expected and file_sha256(path) != expected:
            raise ArtefactError(f"{path} does not match the hash in its card: it is damaged or was replaced; {restore}")
    payload = load_checkpoint(path, MODEL_FORMAT, what="model artefact", fix=restore, weights_only=True)
    if tokenizer_id is not None and payload["tokenizer"] != tokenizer_id:
        raise ArtefactError(
            f"{path} was trained with another tokenizer than the one given; load the tokenizer that ships beside it"
        )
    model = GPT(GPTConfig(**payload["model_config"]))
    model.load_state_dict({k: v.float() for k, v in payload["model"].items()})
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
