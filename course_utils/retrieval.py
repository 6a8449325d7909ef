"""Retrieval from scratch: words, chunks, BM25, dense embeddings from our own model, recall@k, and the
retrieval-augmented prompt.

BM25 scores a document :math:`d` for a query :math:`q` as

.. math:: \\sum_{t \\in q} \\mathrm{IDF}(t)\\,
          \\frac{f(t, d)\\,(k_1 + 1)}{f(t, d) + k_1 (1 - b + b\\,|d| / \\overline{|d|})},
          \\qquad \\mathrm{IDF}(t) = \\ln\\Big(1 + \\frac{N - n(t) + 0.5}{n(t) + 0.5}\\Big)

with :math:`f(t, d)` the count of term :math:`t` in :math:`d`, :math:`|d|` its length in words,
:math:`N` documents of which :math:`n(t)` contain :math:`t` (the IDF of Lucene, always positive). The
fraction saturates: a tenth mention of a word adds little. ``b`` scales the length normalisation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

from .data import pad_right
from .sft import rag_prompt, render_conversation, replies
from .tokenizer import ENDOFTEXT

_WORD = re.compile(r"[a-z0-9]+")


class RetrievalError(ValueError):
    """Bad input to retrieval (an empty query or store, a bad k); the message says what to do."""


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits:
    ``"Born in Tollmere, 1984."`` -> ``["born", "in", "tollmere", "1984"]``."""
    return _WORD.findall(text.lower())


def chunk(text: str, size: int, overlap: int = 0) -> list[str]:
    """Split ``text`` into pieces of at most ``size`` words, each starting ``size - overlap`` words
    after the previous one (the last piece may be shorter)."""
    if size < 1 or not 0 <= overlap < size:
        raise RetrievalError(f"size={size}, overlap={overlap}: use size >= 1 and 0 <= overlap < size")
    tokens = text.split()
    if len(tokens) <= size:
        return [" ".join(tokens)] if tokens else []
    step = size - overlap
    return [" ".join(tokens[i : i + size]) for i in range(0, len(tokens) - overlap, step)]


def _check_k(k: int, n: int) -> int:
    if not isinstance(k, int) or k < 1:
        raise RetrievalError(f"k={k!r}: ask for at least one document")
    return min(k, n)  # more than the store holds: every document, best first


class BM25:
    """A BM25 index over ``documents`` (strings). ``search(query, k)`` returns ``[(index, score)]``,
    best first; a ``k`` above the number of documents returns them all."""

    def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75):
        if not documents:
            raise RetrievalError("the document store is empty: index at least one document")
        if k1 < 0 or not 0 <= b <= 1:
            raise RetrievalError(f"k1={k1}, b={b}: use k1 >= 0 and 0 <= b <= 1")
        self.k1, self.b = k1, b
        self.counts = [Counter(words(d)) for d in documents]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.average_length = sum(self.lengths) / len(self.lengths) or 1.0
        n = len(documents)
        frequency = Counter(t for c in self.counts for t in c)
        self.idf = {t: math.log(1 + (n - df + 0.5) / (df + 0.5)) for t, df in frequency.items()}

    def __len__(self) -> int:
        return len(self.counts)

    def scores(self, query: str) -> list[float]:
        """The BM25 score of every document for ``query`` (repeated query words count each time)."""
        terms = words(query)
        if not terms:
            raise RetrievalError(f"the query {query!r} has no words to search for")
        out = []
        for counts, length in zip(self.counts, self.lengths, strict=True):
            norm = self.k1 * (1 - self.b + self.b * length / self.average_length)
            out.append(sum(self.idf[t] * counts[t] * (self.k1 + 1) / (counts[t] + norm) for t in terms if counts[t]))
        return out

    def search(self, query: str, k: int = 3) -> list[tuple[int, float]]:
        scores = self.scores(query)
        k = _check_k(k, len(scores))
        return sorted(enumerate(scores), key=lambda pair: (-pair[1], pair[0]))[:k]


# ---------------------------------------------------------------------------------------------
# Dense retrieval with our own model
# ---------------------------------------------------------------------------------------------


def embed(model, tokenizer, texts: Sequence[str], *, batch_size: int = 64):
    """Unit-length mean-pooled hidden states (:meth:`GPT.hidden_states`), one row per text:
    (len(texts), C). Texts are cut to the model's context; padding is left out of the mean."""
    if not texts:
        raise RetrievalError("no texts to embed")
    context = model.config.context_length
    eot = tokenizer.special_tokens[ENDOFTEXT]
    ids = [[eot, *tokenizer.encode_ordinary(t)][:context] for t in texts]
    device = next(model.parameters()).device
    rows = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            chunk_ids = ids[i : i + batch_size]
            x = pad_right(chunk_ids, eot).to(device)
            # the leading end-of-text token is the same everywhere: leave it out, and the padding
            mask = pad_right([[0] + [1] * (len(row) - 1) for row in chunk_ids], 0).to(device).unsqueeze(-1).float()
            h = model.hidden_states(x).float()
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1))
    model.train(was_training)
    return torch.cat(rows)


class DenseIndex:
    """Cosine-similarity search over :func:`embed` vectors of ``documents``."""

    def __init__(self, model, tokenizer, documents: Sequence[str]):
        if not documents:
            raise RetrievalError("the document store is empty: index at least one document")
        self.model, self.tokenizer = model, tokenizer
        self.vectors = embed(model, tokenizer, documents)

    def __len__(self) -> int:
        return self.vectors.size(0)

    def search(self, query: str, k: int = 3) -> list[tuple[int, float]]:
        if not words(query):
            raise RetrievalError(f"the query {query!r} has no words to search for")
        k = _check_k(k, len(self))
        similarity = self.vectors @ embed(self.model, self.tokenizer, [query])[0]
        top = similarity.topk(k)
        return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------
# Evaluation and the prompt
# ---------------------------------------------------------------------------------------------


def recall_at_k(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]], k: int) -> float:
    """Share of queries with at least one relevant document among their first ``k`` results."""
    if len(rankings) != len(relevant) or not rankings:
        raise RetrievalError(
            f"{len(rankings)} rankings for {len(relevant)} sets of relevant documents: give one of each per query"
        )
    if k < 1:
        raise RetrievalError(f"k={k}: use k >= 1")
    return sum(bool(set(r[:k]) & rel) for r, rel in zip(rankings, relevant, strict=True)) / len(rankings)


def answer_with_documents(
    model, tokenizer, questions: Sequence[str], documents: Sequence[Sequence[str]], *, max_new_tokens: int = 24
) -> list[str | None]:
    """Greedy replies of a chat model to :func:`rag_prompt` for each question and its documents; a
    prompt that does not fit the model's context gets ``None`` (count it as a miss)."""
    if len(questions) != len(documents):
        raise RetrievalError(
            f"{len(questions)} questions but {len(documents)} document lists: give one list per question"
        )
    context = model.config.context_length
    prompts = [[{"role": "user", "content": rag_prompt(q, d)}] for q, d in zip(questions, documents, strict=True)]
    fits = [len(render_conversation(p, tokenizer, for_generation=True)[0]) + max_new_tokens <= context for p in prompts]
    answers = (
        iter(
            replies(
                model, tokenizer, [p for p, ok in zip(prompts, fits, strict=True) if ok], max_new_tokens=max_new_tokens
            )
        )
        if any(fits)
        else iter(())
    )
    return [next(answers) if ok else None for ok in fits]
