"""Corpora shipped in ``data/``: the TinyStories subset, split into training and validation stories.

The subset's 15,922 stories were shuffled with a fixed seed before they were shipped, so the last
5% of them (in file order) is a fair validation set. Every lab uses this same split.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from .lab import SetupError, data_dir

ENDOFTEXT_LINE = "<|endoftext|>"
VAL_FRACTION = 0.05


def data_root() -> Path:
    return data_dir()


@lru_cache(maxsize=2)
def _stories(folder: str) -> tuple[str, ...]:
    files = sorted(Path(folder).glob("stories_*.txt"))
    if not files:
        raise SetupError(f"no stories_*.txt in {folder}; restore the shipped TinyStories subset with git checkout data/tinystories")
    stories: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        stories.extend(s.strip("\n") for s in text.split("\n" + ENDOFTEXT_LINE + "\n"))
    return tuple(s for s in stories if s.strip() and s.strip() != ENDOFTEXT_LINE)


def tinystories(split: str = "train", data: Path | None = None) -> list[str]:
    """The stories of ``split`` (``"train"``, ``"val"`` or ``"all"``) as a list of strings, each
    without its end-of-text marker."""
    stories = _stories(str((data or data_dir()) / "tinystories"))
    n_val = max(1, int(len(stories) * VAL_FRACTION))
    if split == "train":
        return list(stories[:-n_val])
    if split == "val":
        return list(stories[-n_val:])
    if split == "all":
        return list(stories)
    raise ValueError(f"split={split!r}: use 'train', 'val' or 'all'")


def tinystories_sha256(split: str = "train", data: Path | None = None) -> str:
    """Hash of a split's text: changes whenever the stories or the split do."""
    digest = hashlib.sha256()
    for story in tinystories(split, data):
        digest.update(story.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
