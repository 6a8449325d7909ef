"""Corpora shipped in ``data/``: the TinyStories subset, split into training and validation stories.

The subset's 15,922 stories were shuffled with a fixed seed before they were shipped, so the last
5% of them (in file order) is a fair validation set. Every lab uses this same split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from .lab import SetupError, data_dir, runs_dir
from .tokenizer import ENDOFTEXT

VAL_FRACTION = 0.05


@lru_cache(maxsize=2)
def _stories(folder: str) -> tuple[str, ...]:
    files = sorted(Path(folder).glob("stories_*.txt"))
    if not files:
        raise SetupError(
            f"no stories_*.txt in {folder}; restore the shipped TinyStories subset with git checkout data/tinystories"
        )
    stories: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        stories.extend(s.strip("\n") for s in text.split("\n" + ENDOFTEXT + "\n"))
    return tuple(s for s in stories if s.strip() and s.strip() != ENDOFTEXT)


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


# ---------------------------------------------------------------------------------------------
# Corpora as `datasets` datasets
# ---------------------------------------------------------------------------------------------

HUB_DATASET = "roneneldan/TinyStories"


def stories_dataset(
    split: str = "train", source: str = "shipped", n_stories: int | None = None, data: Path | None = None
):
    """TinyStories as a Hugging Face ``datasets`` dataset with a ``text`` column.

    ``source="shipped"``: the subset in ``data/`` (offline, the default). ``source="hub"``: the full
    ``roneneldan/TinyStories`` (about 2.1M stories) streamed from the Hugging Face hub, which needs
    network access; ``n_stories`` takes only the first stories of the stream.
    """
    import datasets  # heavy (a second to import): only when a corpus is streamed or cached

    if source == "shipped":
        stories = tinystories(split, data)
        return datasets.Dataset.from_dict({"text": stories[:n_stories] if n_stories else stories})
    if source == "hub":
        hub_split = {"train": "train", "val": "validation"}.get(split)
        if hub_split is None:
            raise ValueError(f"split={split!r}: the hub has 'train' and 'val' (its 'validation')")
        stream = datasets.load_dataset(HUB_DATASET, split=hub_split, streaming=True)
        return stream.take(n_stories) if n_stories else stream
    raise ValueError(f"source={source!r}: use 'shipped' (offline) or 'hub' (network)")


# ---------------------------------------------------------------------------------------------
# Token caches and batches
# ---------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of a tokenizer's merges, pattern and special tokens: what decides the ids."""
    payload = {k: v for k, v in tokenizer.to_dict().items() if k != "name"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def token_cache(
    tokenizer,
    split: str = "train",
    cache_dir: Path | None = None,
    data: Path | None = None,
    *,
    source: str = "shipped",
    n_stories: int | None = None,
):
    """The ids of a TinyStories split as a read-only ``uint16`` memmap, each story followed by
    ``<|endoftext|>``. The stories come through :func:`stories_dataset` and are encoded with tiktoken
    in batches of 1,000, once, then cached under ``runs/cache/``; the file name holds a hash of the
    text (or of the hub source) and of the tokenizer, so a change to either builds a new cache."""
    data = data or data_dir()
    text_id = tinystories_sha256(split, data) if source == "shipped" else f"{HUB_DATASET}:{split}:{n_stories}"
    text_id += f":{n_stories}" if source == "shipped" and n_stories else ""
    batches = (batch["text"] for batch in stories_dataset(split, source, n_stories, data).iter(batch_size=1000))
    return _cached_ids(
        tokenizer,
        f"tinystories-{source}-{split}",
        text_id,
        batches,
        Path(cache_dir) if cache_dir else runs_dir(data) / "cache",
    )


def documents_token_cache(tokenizer, name: str, documents: Sequence[str], cache_dir: Path | None = None):
    """The ids of ``documents``, each followed by ``<|endoftext|>``, cached like :func:`token_cache` as
    ``<name>-<hash>.bin`` under a hash of the text and the tokenizer (a pretraining mixture's other parts)."""
    digest = hashlib.sha256("\0".join(documents).encode("utf-8")).hexdigest()
    return _cached_ids(
        tokenizer, name, digest, [list(documents)], Path(cache_dir) if cache_dir else runs_dir() / "cache"
    )


def _cached_ids(tokenizer, stem: str, text_id: str, batches: Iterable[Sequence[str]], cache_dir: Path):
    """Encode batches of documents once into ``cache_dir/<stem>-<hash>.bin`` and map it read-only."""
    if tokenizer.n_vocab > 2**16:
        raise ValueError(
            f"a vocabulary of {tokenizer.n_vocab} ids does not fit in uint16 token caches (at most 65,536)"
        )
    eot = tokenizer.special_tokens.get(ENDOFTEXT)
    if eot is None:
        raise ValueError(
            f"the tokenizer has no {ENDOFTEXT} token to separate documents; train it with that special token"
        )
    key = hashlib.sha256((text_id + tokenizer_fingerprint(tokenizer)).encode()).hexdigest()[:16]
    path = cache_dir / f"{stem}-{key}.bin"
    if not path.exists():
        encoding = tokenizer.to_tiktoken()
        ids: list[int] = []
        for batch in batches:
            for encoded in encoding.encode_ordinary_batch(list(batch)):
                ids.extend(encoded)
                ids.append(eot)
        if not ids:
            raise ValueError(f"the corpus {stem} is empty; check the data (git checkout data/) or n_stories")
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        np.asarray(ids, dtype=np.uint16).tofile(tmp)
        tmp.replace(path)  # atomic: a half-written cache is never seen
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if len(tokens) == 0:
        raise ValueError(f"{path} is empty; delete it and run again")
    return tokens


class SeededSampler:
    """What every batch sampler of the course shares: one seeded ``torch.Generator`` draws every
    batch, so its state is the exact data position, saved in checkpoints and restored on resume.
    Subclasses define ``next() -> (x, y)``."""

    def __init__(self, seed: int, device="cpu"):
        import torch  # optional here: Lab 01 uses this module without torch

        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class BatchSampler(SeededSampler):
    """Random (B, T) windows of a token array, inputs and next-token targets.

    Every call draws the *global* batch (``batch_size * world_size`` windows) from one seeded
    generator and keeps this rank's slice, so any number of processes sees the same global batch,
    and the generator's state is the exact data position for resuming.

    ``tokens`` may also be a list of arrays with ``weights``: each window then comes from array ``i``
    with probability ``weights[i]`` (a pretraining mixture), drawn from the same generator. ``fade``
    maps an array's index to a number of batches over which its weight falls linearly to zero (a part
    of the mixture that helps early and then gives its share back, annealed), or to ``(batches, floor)``
    to fall to ``floor`` times its weight and stay there. ``ramp`` maps an array's index to
    ``(start, batches)``: its weight is zero for the first ``start`` batches, then rises linearly to
    the full weight over ``batches`` more (a part held back until another has done its work).
    """

    def __init__(
        self,
        tokens,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        device="cpu",
        rank: int = 0,
        world_size: int = 1,
        weights=None,
        fade: dict[int, int | tuple[int, float]] | None = None,
        ramp: dict[int, tuple[int, int]] | None = None,
    ):
        import torch  # optional here: Lab 01 uses this module without torch

        super().__init__(seed, device)
        self.sources = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
        if weights is None and len(self.sources) > 1:
            raise ValueError(f"{len(self.sources)} token arrays need weights, one each")
        if weights is not None and (len(weights) != len(self.sources) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"weights={list(weights)}: give one non-negative weight per token array, not all zero")
        for src in self.sources:
            if len(src) <= seq_len + 1:
                raise ValueError(
                    f"the corpus has {len(src)} tokens, too few for windows of seq_len={seq_len}; lower seq_len"
                )
        self.tokens = self.sources[0]
        self.weights = (
            torch.tensor([float(w) for w in weights]) if weights is not None and len(self.sources) > 1 else None
        )
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.fade = {i: (f, 0.0) if isinstance(f, int) else (int(f[0]), float(f[1])) for i, f in (fade or {}).items()}
        self.draws = 0
        if self.fade and (
            self.weights is None
            or not all(0 <= i < len(self.sources) and n > 0 and 0 <= floor < 1 for i, (n, floor) in self.fade.items())
        ):
            raise ValueError(
                f"fade={fade}: map indices of the mixture's arrays to a positive number of batches "
                "(or to (batches, floor) with 0 <= floor < 1)"
            )
        self.ramp = {i: (int(start), int(n)) for i, (start, n) in (ramp or {}).items()}
        if self.ramp and (
            self.weights is None
            or not all(0 <= i < len(self.sources) and start >= 0 and n > 0 for i, (start, n) in self.ramp.items())
            or sum(w for i, w in enumerate(self.weights.tolist()) if i not in self.ramp) <= 0
        ):
            raise ValueError(
                f"ramp={ramp}: map indices of the mixture's arrays to (start, batches) with start >= 0 and "
                "batches > 0, and keep at least one part with weight that is not held back"
            )

    def weights_now(self):
        """The mixture's weights for the next batch: faded parts lowered and held-back parts raised in
        proportion to the batches drawn."""
        weights = self.weights.clone()
        for i, (until, floor) in self.fade.items():
            weights[i] *= max(floor, 1.0 - self.draws / until)
        for i, (start, n) in self.ramp.items():
            weights[i] *= min(1.0, max(0.0, (self.draws - start) / n))
        return weights

    def next(self):
        import torch  # optional here: Lab 01 uses this module without torch

        n = self.batch_size * self.world_size
        self.draws += 1
        if self.weights is None:
            which = [0] * n
            starts = torch.randint(len(self.tokens) - self.seq_len - 1, (n,), generator=self.generator).tolist()
        else:
            weights = self.weights_now() if self.fade or self.ramp else self.weights
            which = torch.multinomial(weights, n, replacement=True, generator=self.generator).tolist()
            u = torch.rand(n, generator=self.generator).tolist()
            starts = [int(f * (len(self.sources[i]) - self.seq_len - 1)) for i, f in zip(which, u, strict=True)]
        mine = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        windows = torch.from_numpy(
            np.stack(
                [
                    np.asarray(self.sources[which[k]][starts[k] : starts[k] + self.seq_len + 1], dtype=np.int64)
                    for k in mine
                ]
            )
        )
        x, y = windows[:, :-1], windows[:, 1:]
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.draws = state.get("draws", 0)


def pad_right(rows: Sequence[Sequence[int]], value: int, length: int | None = None):
    """Rows of different lengths as one (B, L) ``long`` tensor, each row padded on the right with
    ``value`` up to ``length`` (default: the longest row). Causal attention never looks right, so a
    row's real tokens never see its padding."""
    import torch  # optional here: Lab 01 uses this module without torch

    length = max(len(r) for r in rows) if length is None else length
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------------
# Copy sequences: a part of a pretraining mixture that pays only for reading the context
# ---------------------------------------------------------------------------------------------


def common_tokens(tokens, n: int = 1000, exclude: Sequence[int] = (), sample: int = 2_000_000) -> np.ndarray:
    """The ``n`` most frequent ids among the first ``sample`` tokens of ``tokens``, most frequent
    first, leaving out ``exclude`` (special tokens): ordinary tokens, not rare ones."""
    counts = np.bincount(np.asarray(tokens[:sample], dtype=np.int64), minlength=int(max(tokens[:sample])) + 1)
    counts[list(exclude)] = 0
    return np.argsort(-counts, kind="stable")[:n]


def shrink_vocabulary(tokens, size: int, special: int, sample: int = 2_000_000) -> np.ndarray:
    """A lookup table (one entry per id of ``tokens``' vocabulary) onto ``size`` ids, for small
    experiments: the ``size - 2`` most frequent ordinary tokens become ``0 .. size - 3`` (most frequent
    first), every other token the one shared id ``size - 2`` ("rare"), and ``special`` (the document
    separator) the last id. ``lookup[tokens]`` is then the same text in the small vocabulary; the
    output layer shrinks with it, which is where a tiny model spends most of its time."""
    if size < 3:
        raise ValueError(f"size={size}: keep at least one ordinary token besides 'rare' and the separator")
    tokens = np.asarray(tokens)
    n_vocab = max(int(tokens[:sample].max()), special) + 1
    lookup = np.full(n_vocab, size - 2, dtype=np.uint16)
    kept = common_tokens(tokens, size - 2, exclude=[special], sample=sample)
    lookup[kept] = np.arange(len(kept))
    lookup[special] = size - 1
    return lookup


def copy_sequences(
    vocabulary: np.ndarray, n_tokens: int, separator: int, *, span: tuple[int, int] = (10, 60), seed: int = 0
) -> np.ndarray:
    """About ``n_tokens`` ids of rows ``[separator, s, s]``: a span ``s`` of ``span[0]`` to ``span[1]``
    random ids from ``vocabulary``, then the same span again. Its first copy cannot be predicted at
    all and its second only by looking back (an induction head: find the earlier occurrence of the
    current token, copy what followed it)."""
    rng = np.random.default_rng(seed)
    rows, total = [], 0
    while total < n_tokens:
        s = rng.choice(vocabulary, int(rng.integers(span[0], span[1] + 1)))
        rows.append(np.concatenate([[separator], s, s]))
        total += len(rows[-1])
    return np.concatenate(rows).astype(np.uint16)
