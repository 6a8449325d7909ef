"""Byte-level BPE: a readable reference implementation, a fast trainer, and export to tiktoken.

Lab 01 builds these ideas from scratch; this module is the finished version later labs import.

* :func:`train_bpe` is the reference trainer, written to be read: split the text into chunks with a
  regex, count chunks, then repeatedly merge the most frequent adjacent pair of ids. Ties go to the
  smallest pair ``(a, b)``, the rule the ``rustbpe`` package uses, so both learn identical merges.
* :func:`train_bpe_fast` trains the same tokenizer with ``rustbpe`` (Rust, parallel), which takes
  seconds for the TinyStories subset.
* :class:`Tokenizer` encodes and decodes in pure Python with exactly the algorithm of tiktoken, and
  :meth:`Tokenizer.to_tiktoken` exports it as a ``tiktoken.Encoding`` that gives the same ids, fast.

Sennrich et al. 2016 (BPE for NMT); Radford et al. 2019 (byte-level BPE, GPT-2).

The shipped tokenizers are made by ``python -m course_utils.recipes tokenizer`` (and ``base-tokenizer``).
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import regex
import rustbpe
import tiktoken
from tqdm.auto import tqdm

from .lab import data_dir, runs_dir

#: GPT-4's pre-splitting pattern (tiktoken ``cl100k_base``; also ``rustbpe``'s default): contractions,
#: letters with one leading non-letter, numbers of up to 3 digits, punctuation runs, whitespace.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
#: Used when a tokenizer has no pre-splitting (``pattern=None``): the whole text is one chunk.
WHOLE_TEXT_PATTERN = r"[\s\S]+"
ENDOFTEXT = "<|endoftext|>"
FILE_FORMAT = "course_utils.tokenizer"
FILE_VERSION = 1

Pair = tuple[int, int]


class TokenizerError(ValueError):
    """Bad input to a tokenizer: the message names what was wrong and what to do."""


# ---------------------------------------------------------------------------------------------
# The two operations BPE is made of
# ---------------------------------------------------------------------------------------------


def pair_counts(ids: Sequence[int], counts: Counter[Pair] | None = None, weight: int = 1) -> Counter[Pair]:
    """Count adjacent pairs, overlapping ones included: ``[1, 1, 1]`` has ``(1, 1)`` twice.

    ``counts`` is updated in place when given, each pair adding ``weight``.
    """
    counts = Counter() if counts is None else counts
    for pair in zip(ids, ids[1:], strict=False):
        counts[pair] += weight
    return counts


def merge_pair(ids: Sequence[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids``, left to right without overlap, by ``new_id``."""
    out: list[int] = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# ---------------------------------------------------------------------------------------------
# Splitting text before BPE
# ---------------------------------------------------------------------------------------------


def _special_regex(tokens: Iterable[str]) -> regex.Pattern[str] | None:
    tokens = sorted(tokens, key=len, reverse=True)  # longest first, so overlapping tokens split right
    return regex.compile("|".join(regex.escape(t) for t in tokens)) if tokens else None


def split_chunks(text: str, pattern: str | None) -> list[str]:
    """The chunks BPE works inside: merges never cross a chunk boundary."""
    if pattern is None:
        return [text] if text else []
    return regex.findall(pattern, text)


def count_chunks(texts: Iterable[str], pattern: str | None, special_tokens: Iterable[str] = ()) -> Counter[str]:
    """How often each chunk occurs in ``texts``. Special-token strings are cut out first, so no
    merge is ever learned across or inside them."""
    special = _special_regex(special_tokens)
    counts: Counter[str] = Counter()
    for text in _as_texts(texts):
        for piece in special.split(text) if special else [text]:
            counts.update(split_chunks(piece, pattern))
    return counts


def _as_texts(texts: str | Iterable[str]) -> Iterator[str]:
    if isinstance(texts, str):
        yield texts
        return
    for text in texts:
        if not isinstance(text, str):
            raise TokenizerError(f"training data must be strings, got {type(text).__name__}")
        yield text


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """A byte-level BPE tokenizer: ``merges[i]`` is the pair of ids that became id ``256 + i``.

    Special tokens get the ids after the merged tokens. Encoding follows tiktoken exactly: inside
    each chunk, repeatedly merge the adjacent pair whose concatenated bytes form the token of lowest
    id (leftmost on a tie); a chunk that is itself a token becomes that token at once.

    The ids equal those of :meth:`to_tiktoken` for any text whose characters are assigned in both
    regex engines' Unicode tables; a code point assigned only in a newer Unicode version can be a
    letter to the ``regex`` module and unassigned to tiktoken's Rust regex, and split differently.
    Decoding an encoding always returns the text.
    """

    def __init__(
        self,
        merges: Sequence[Pair],
        pattern: str | None = GPT4_SPLIT_PATTERN,
        special_tokens: Iterable[str] = (),
        name: str = "course-bpe",
        *,
        cache: bool = True,
    ):
        self.merges: list[Pair] = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self.name = name
        self.vocab: list[bytes] = [bytes([i]) for i in range(256)]  # id -> bytes
        for i, (a, b) in enumerate(self.merges):
            new_id = 256 + i
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise TokenizerError(f"merge {i} is {(a, b)}, but only ids below {new_id} exist at that point")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.ranks: dict[bytes, int] = {token: i for i, token in enumerate(self.vocab)}
        if len(self.ranks) != len(self.vocab):
            raise TokenizerError("two merges produce the same bytes; tiktoken needs every token's bytes to be unique")
        specials = list(dict.fromkeys(special_tokens))
        self.special_tokens: dict[str, int] = {t: len(self.vocab) + j for j, t in enumerate(specials)}
        self._compiled = regex.compile(pattern) if pattern is not None else None
        self._cache: dict[str, list[int]] | None = {} if cache else None  # chunk -> ids, as text repeats words

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        """Number of ids, special tokens included (the model's vocabulary size before padding)."""
        return len(self.vocab) + len(self.special_tokens)

    def __repr__(self) -> str:
        specials = list(self.special_tokens)
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, merges={len(self.merges)}, special={specials})"

    # -- encoding ------------------------------------------------------------------------------
    def _encode_chunk(self, chunk: bytes) -> list[int]:
        token = self.ranks.get(chunk)
        if token is not None:  # tiktoken's shortcut: a whole chunk that is a token stays whole
            return [token]
        parts = [chunk[i : i + 1] for i in range(len(chunk))]
        while len(parts) > 1:
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                rank = self.ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_i = rank, i
            if best_rank is None:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return [self.ranks[p] for p in parts]

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` treating special-token strings as plain text."""
        ids: list[int] = []
        chunks = self._compiled.findall(text) if self._compiled is not None else ([text] if text else [])
        for chunk in chunks:
            cached = self._cache.get(chunk) if self._cache is not None else None
            if cached is None:
                cached = self._encode_chunk(chunk.encode("utf-8", errors="surrogatepass"))
                if self._cache is not None and len(self._cache) < 200_000:
                    self._cache[chunk] = cached
            ids.extend(cached)
        return ids

    def encode(
        self, text: str, *, allowed_special: str | Iterable[str] = (), disallowed_special: str | Iterable[str] = "all"
    ) -> list[int]:
        """Encode ``text`` with tiktoken's rules for special tokens.

        A special-token string in ``text`` is an error unless it is in ``allowed_special`` (then it
        becomes its special id) or removed from ``disallowed_special`` (then it is plain text).
        Text from users should never silently become a control token.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(
                f"allowed_special names {sorted(unknown)}, which this tokenizer does not have; it has "
                f"{sorted(self.special_tokens)}"
            )
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed:
            found = _special_regex(disallowed).search(text)
            if found:
                token = found.group()
                raise TokenizerError(
                    f"the text contains the special token {token!r}. If it should be that special token, "
                    f"pass allowed_special={{{token!r}}}; if it is ordinary text, pass disallowed_special=() "
                    "or use encode_ordinary()."
                )
        special = _special_regex(allowed)
        if special is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in special.finditer(text):
            ids.extend(self.encode_ordinary(text[start : match.start()]))
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids.extend(self.encode_ordinary(text[start:]))
        return ids

    # -- decoding ------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        id_to_special = {i: t.encode("utf-8") for t, i in self.special_tokens.items()}
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < len(self.vocab):
                out += self.vocab[i]
            elif i in id_to_special:
                out += id_to_special[i]
            else:
                raise TokenizerError(f"id {i} is not in this tokenizer (ids run from 0 to {self.n_vocab - 1})")
        return bytes(out)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode to text; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self, i: int) -> bytes:
        return self.decode_bytes([i])

    # -- tiktoken --------------------------------------------------------------------------------
    def to_tiktoken(self):
        """The same tokenizer as a ``tiktoken.Encoding`` (Rust, tens of times faster)."""
        return tiktoken.Encoding(
            name=self.name,
            pat_str=self.pattern if self.pattern is not None else WHOLE_TEXT_PATTERN,
            mergeable_ranks=dict(self.ranks),
            special_tokens=dict(self.special_tokens),
        )

    # -- files -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": list(self.special_tokens),
            "merges": [list(m) for m in self.merges],
        }

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON (atomically: a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "tokenizer data") -> Tokenizer:
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise TokenizerError(f'{source} is not a course tokenizer file (no "format": "{FILE_FORMAT}")')
        version = data.get("version")
        if version != FILE_VERSION:
            newer = isinstance(version, int) and version > FILE_VERSION
            hint = "upgrade course_utils" if newer else "re-create it with this version's Tokenizer.save"
            raise TokenizerError(
                f"{source} has format version {version!r}, this course_utils reads version {FILE_VERSION}: {hint}"
            )
        try:
            merges = [(int(a), int(b)) for a, b in data["merges"]]
            specials = [str(t) for t in data.get("special_tokens", [])]
            pattern = data["pattern"]
            if pattern is not None:
                regex.compile(pattern)
        except (KeyError, TypeError, ValueError, regex.error) as e:
            raise TokenizerError(
                f"{source} is damaged ({type(e).__name__}: {e}); re-create it or restore it with git checkout"
            ) from e
        return cls(merges, pattern=pattern, special_tokens=specials, name=str(data.get("name", "course-bpe")))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.exists():
            raise TokenizerError(
                f"no tokenizer at {path}; train one (Lab 01) or use the shipped data/artefacts/tokenizer.json"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(
                f"{path} is not valid JSON ({e}); it is damaged: re-create it or restore it with git checkout"
            ) from e
        return cls.from_dict(data, source=str(path))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _merge_budget(vocab_size: int, special_tokens: Sequence[str]) -> int:
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: 256 byte tokens and {len(special_tokens)} special tokens need at "
            f"least {256 + len(special_tokens)}"
        )
    return n_merges


def train_bpe(
    texts: str | Iterable[str],
    vocab_size: int,
    *,
    pattern: str | None = GPT4_SPLIT_PATTERN,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    name: str = "course-bpe",
    progress: bool = False,
) -> Tokenizer:
    """Reference BPE training: ``vocab_size`` counts the 256 bytes, the merges and the special tokens.

    Each step counts pairs over the distinct chunks (weighted by how often each chunk occurs)
    and merges the most frequent pair; ties go to the smallest pair. Training stops early if no
    pair is left. Cost: O(merges x distinct chunk length), fine for a megabyte, slow beyond.
    """
    special_tokens = list(special_tokens)
    n_merges = _merge_budget(vocab_size, special_tokens)
    chunks = count_chunks(texts, pattern, special_tokens)
    if not chunks:
        raise TokenizerError("the training corpus is empty: give train_bpe some text")
    words = [list(chunk.encode("utf-8")) for chunk in chunks]
    weights = list(chunks.values())
    merges: list[Pair] = []
    steps = range(n_merges)
    if progress:
        steps = tqdm(steps, desc="reference BPE", unit="merge")
    for step in steps:
        counts: Counter[Pair] = Counter()
        for word, weight in zip(words, weights, strict=False):
            pair_counts(word, counts, weight)
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent; ties -> smallest pair
        new_id = 256 + step
        words = [merge_pair(w, best, new_id) if len(w) > 1 else w for w in words]
        merges.append(best)
    return Tokenizer(merges, pattern=pattern, special_tokens=special_tokens, name=name)


def merges_from_ranks(vocab: Sequence[bytes]) -> list[Pair]:
    """Recover the merge pairs from token bytes listed in id order (ids 0-255 the single bytes).

    Token ``t`` is encoded using only the tokens before it; BPE guarantees this ends in two parts.
    """
    ranks: dict[bytes, int] = {}
    merges: list[Pair] = []
    for i, token in enumerate(vocab):
        if i < 256:
            if token != bytes([i]):
                raise TokenizerError(f"token {i} should be the single byte {i}")
            ranks[token] = i
            continue
        parts = [token[j : j + 1] for j in range(len(token))]
        while len(parts) > 2:
            scored = [(ranks.get(parts[j] + parts[j + 1]), j) for j in range(len(parts) - 1)]
            scored = [(r, j) for r, j in scored if r is not None]
            if not scored:
                break
            _, j = min(scored)
            parts[j : j + 2] = [parts[j] + parts[j + 1]]
        if len(parts) != 2:
            raise TokenizerError(f"token {i} ({token!r}) is not a merge of two earlier tokens")
        merges.append((ranks[parts[0]], ranks[parts[1]]))
        ranks[token] = i
    return merges


def train_bpe_fast(
    texts: str | Iterable[str],
    vocab_size: int,
    *,
    pattern: str | None = GPT4_SPLIT_PATTERN,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    name: str = "course-bpe",
) -> Tokenizer:
    """Same result as :func:`train_bpe`, trained by ``rustbpe`` in Rust on all cores."""
    special_tokens = list(special_tokens)
    n_merges = _merge_budget(vocab_size, special_tokens)
    special = _special_regex(special_tokens)

    # rustbpe knows nothing of special tokens: feed it the text between them.
    n_pieces = 0

    def pieces() -> Iterator[str]:
        nonlocal n_pieces
        for text in _as_texts(texts):
            for piece in special.split(text) if special else [text]:
                if piece:
                    n_pieces += 1
                    yield piece

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(
        pieces(), 256 + n_merges, pattern=pattern if pattern is not None else WHOLE_TEXT_PATTERN
    )
    if n_pieces == 0:
        raise TokenizerError("the training corpus is empty: give train_bpe_fast some text")
    vocab = [token for token, _ in sorted(trainer.get_mergeable_ranks(), key=lambda item: item[1])]
    return Tokenizer(merges_from_ranks(vocab), pattern=pattern, special_tokens=special_tokens, name=name)


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Compression: UTF-8 bytes of ``texts`` divided by their number of tokens (higher is better)."""
    encoding = tokenizer.to_tiktoken()
    n_bytes = n_tokens = 0
    for text in _as_texts(texts):
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(encoding.encode_ordinary(text))
    if n_tokens == 0:
        raise TokenizerError("no text to measure compression on")
    return n_bytes / n_tokens


# ---------------------------------------------------------------------------------------------
# The course tokenizer
# ---------------------------------------------------------------------------------------------

COURSE_VOCAB_SIZE = 4096


def load_course_tokenizer(runs: Path | None = None, data: Path | None = None, *, quiet: bool = False) -> Tokenizer:
    """The student's own tokenizer (``runs/tokenizer.json``) when present, else the shipped one."""
    data = data or data_dir()
    runs = runs or runs_dir(data)
    for path, who in (
        (runs / "tokenizer.json", "your own"),
        (data / "artefacts" / "tokenizer.json", "the shipped reference"),
    ):
        if path.exists():
            tok = Tokenizer.load(path)
            if not quiet:
                print(f"using {who} tokenizer: {path} ({tok.n_vocab} ids)")
            return tok
    raise TokenizerError(f"no tokenizer found in {runs} or {data / 'artefacts'}; run Lab 01 or restore data/artefacts")


# ---------------------------------------------------------------------------------------------
# Showing tokens
# ---------------------------------------------------------------------------------------------


def token_pieces(encoding: Any, ids: Sequence[int]) -> list[str]:
    """Each id as readable text: works for :class:`Tokenizer` and ``tiktoken.Encoding``. A token
    that is part of a multi-byte character shows as its bytes, e.g. ``<e4 bd>``."""
    get = encoding.decode_single_token_bytes if hasattr(encoding, "decode_single_token_bytes") else encoding.token_bytes
    pieces = []
    for i in ids:
        raw = get(i)
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            pieces.append("<" + raw.hex(" ") + ">")
    return pieces


def show_tokens(encoding: Any, text: str, **encode_kwargs: Any):
    """Display ``text`` with each token on its own coloured background (HTML in a notebook)."""
    ids = encoding.encode(text, **encode_kwargs)
    colours = ["#fde2a7", "#b8e0d2", "#d6c8f0", "#f7c6c7", "#c9e4f6"]
    spans = "".join(
        f'<span title="id {i}" style="background:{colours[k % len(colours)]};padding:1px 0;white-space:pre">'
        f"{html.escape(p)}</span>"
        for k, (i, p) in enumerate(zip(ids, token_pieces(encoding, ids), strict=False))
    )
    try:
        from IPython.display import HTML, display  # optional: only in a notebook

        display(
            HTML(
                f'<div style="font-family:monospace;line-height:1.9">{spans}</div>'
                f"<small>{len(ids)} tokens: {ids}</small>"
            )
        )
    except ImportError:
        print("|".join(token_pieces(encoding, ids)), f"({len(ids)} tokens)")
    return ids
