"""In-context learning (Lab 07): what a model does with what is in its prompt, and how to see it.

* **Copying.** A span of random ordinary tokens, then the same span again: nothing predicts the first
  copy, but a model that reads its context predicts the second one by finding where the current token
  stood before and copying what followed (an induction head, Olsson et al. 2022). :func:`copy_losses`
  measures the loss on each copy; their ratio is the copy score.
* **Loss against position** (:func:`loss_by_position`): if later tokens are predicted better than
  early ones, the model uses what it has read so far.
* **Few-shot prompts** (:func:`few_shot_prompt`): questions and answers before the question asked;
  the examples say which attribute and which format are wanted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import BatchSampler
from .model import GPT, generate_batched
from .tokenizer import ENDOFTEXT
from .world import ANSWER_TEMPLATES, PROBED, QUESTION_TEMPLATES, World, answer_matches, fresh_people


def repeated_sequences(vocabulary: np.ndarray, n_rows: int, length: int, separator: int, seed: int = 0) -> torch.Tensor:
    """(n_rows, 1 + 2 * length) ids: ``separator``, a span of ``length`` random ids from ``vocabulary``,
    the same span again."""
    rng = np.random.default_rng(seed)
    spans = rng.choice(vocabulary, (n_rows, length))
    return torch.from_numpy(np.concatenate([np.full((n_rows, 1), separator), spans, spans], axis=1).astype(np.int64))


def copy_halves(token_losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-token losses (B, 2L) of :func:`repeated_sequences` rows (the loss of predicting ids
    1 .. 2L) into the first and the second copy, each without its first token, which nothing can
    predict: two (B, L - 1) tensors."""
    length = token_losses.size(1) // 2
    return token_losses[:, 1:length], token_losses[:, length + 1 :]


def copy_ratio(token_losses: torch.Tensor) -> float:
    """Mean loss on the second copy over mean loss on the first: about 1 for a model that does not
    copy, near 0 for one that does."""
    first, second = copy_halves(token_losses)
    return (second.mean() / first.mean()).item()


@torch.no_grad()
def token_losses(model: GPT, rows: torch.Tensor) -> torch.Tensor:
    """The loss of predicting each token of ``rows`` (B, T) from the ones before it: (B, T - 1)."""
    was_training = model.training
    model.eval()
    logits, _ = model(rows[:, :-1].to(next(model.parameters()).device))
    model.train(was_training)
    return F.cross_entropy(logits.float().transpose(1, 2), rows[:, 1:].to(logits.device), reduction="none").cpu()


def copy_losses(model: GPT, rows: torch.Tensor) -> tuple[float, float]:
    """Mean loss on the first and on the second copy of :func:`repeated_sequences` rows."""
    first, second = copy_halves(token_losses(model, rows))
    return first.mean().item(), second.mean().item()


def copy_score(model: GPT, rows: torch.Tensor) -> float:
    """:func:`copy_ratio` of ``model`` on ``rows``: the in-context score logged during pretraining."""
    return copy_ratio(token_losses(model, rows))


@torch.no_grad()
def loss_by_position(
    model: GPT, tokens, seq_len: int | None = None, batches: int = 8, batch_size: int = 16
) -> np.ndarray:
    """Mean next-token loss at each position 0..seq_len-1 over fixed random windows of ``tokens``: (seq_len,)."""
    seq_len = seq_len or model.config.context_length
    sampler = BatchSampler(tokens, batch_size, seq_len, seed=0, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    total = torch.zeros(seq_len)
    for _ in range(batches):
        x, y = sampler.next()
        logits, _ = model(x)
        total += F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").mean(0).cpu()
    model.train(was_training)
    return (total / batches).numpy()


def few_shot_prompt(examples: Sequence[tuple[str, str]], question: str, template: str = "Q: {q}\nA: {a}") -> str:
    """``examples`` (question, answer) written with ``template``, one per paragraph, then ``question``
    with its answer left open: the model's continuation is its answer."""
    if not question.strip():
        raise ValueError("the question is empty")
    shots = [template.format(q=q, a=a) for q, a in examples]
    open_end = template.format(q=question, a="").rstrip()
    return "\n\n".join(shots + [open_end])


# ---------------------------------------------------------------------------------------------
# Few-shot questions about the world, and facts given only in the prompt
# ---------------------------------------------------------------------------------------------


def complete(
    model: GPT, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 64
) -> list[str]:
    """Greedy continuations of ``prompts`` (each after ``<|endoftext|>``), cut at the first line break:
    the answer of a ``Q: … A:`` prompt."""
    eot = tokenizer.special_tokens[ENDOFTEXT]
    context = model.config.context_length
    encoded = []
    for prompt in prompts:
        if not prompt.strip():
            raise ValueError("a prompt is empty: give the model something to continue")
        ids = [eot, *tokenizer.encode_ordinary(prompt)]
        if len(ids) + max_new_tokens > context:
            raise ValueError(
                f"a prompt of {len(ids)} tokens leaves no room for a {max_new_tokens}-token answer in the context of "
                f"{context}; use fewer or shorter examples"
            )
        encoded.append(ids)
    rows = generate_batched(model, encoded, max_new_tokens, stop_id=eot, batch_size=batch_size)
    return [tokenizer.decode([t for t in row if t != eot]).split("\n")[0].strip() for row in rows]


def fact_questions(world: World, split: str, attributes: Sequence[str] = PROBED, seed: int = 0) -> list[dict]:
    """One question per person of ``split`` and attribute (a phrasing drawn at random), with its short
    answer: ``{"question", "answer", "name", "attribute"}``."""
    rng = random.Random(f"{world.seed}:questions:{split}:{seed}")
    return [
        {
            "question": rng.choice(QUESTION_TEMPLATES[a]).format(name=p.name),
            "answer": p.fact(a),
            "name": p.name,
            "attribute": a,
        }
        for p in world.split(split)
        for a in attributes
    ]


def few_shot_prompts(
    items: Sequence[dict],
    pool: Sequence[dict],
    shots: int,
    seed: int = 0,
    template: str = "Q: {q}\nA: {a}",
    order: int | None = None,
) -> list[str]:
    """For each item, a prompt of ``shots`` examples drawn from ``pool`` (other people, same attribute),
    then the item's question, written with ``template``. ``seed`` chooses the examples; ``order``, when
    given, shuffles the same examples into another order. Raises if the pool has too few examples."""
    rng = random.Random(f"shots:{shots}:{seed}")
    by_attribute: dict[str, list[dict]] = {}
    for example in pool:
        by_attribute.setdefault(example["attribute"], []).append(example)
    prompts = []
    for k, item in enumerate(items):
        candidates = [e for e in by_attribute.get(item["attribute"], []) if e["name"] != item["name"]]
        if shots > len(candidates):
            raise ValueError(f"{shots} shots asked for, but only {len(candidates)} examples of {item['attribute']!r}")
        examples = rng.sample(candidates, shots)
        if order is not None:
            random.Random(f"order:{order}:{k}").shuffle(examples)
        prompts.append(few_shot_prompt([(e["question"], e["answer"]) for e in examples], item["question"], template))
    return prompts


def exact_match(predictions: Sequence[str], items: Sequence[dict]) -> float:
    """Share of predictions that give the item's answer (:func:`~course_utils.world.answer_matches`:
    case, punctuation and articles aside, the answer or the answer followed by more words)."""
    if len(predictions) != len(items) or not items:
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items: give one per item")
    return sum(answer_matches(p, i["answer"]) for p, i in zip(predictions, items, strict=True)) / len(items)


def in_context_facts(
    n_items: int, n_people: int = 5, attribute: str = "birth_city", seed: int = 0, exclude=frozenset()
):
    """Prompts that state one fact about each of ``n_people`` invented people (:func:`fresh_people`),
    then ask it about one of them: only reading the prompt can answer. Returns items with
    ``prompt`` and ``answer`` (chance: one in ``n_people``, less where two share a value)."""
    rng = random.Random(f"in-context:{seed}")
    people = fresh_people(n_items * n_people, 1_000 + seed, exclude)
    items = []
    for k in range(n_items):
        group = people[k * n_people : (k + 1) * n_people]
        asked = rng.choice(group)
        facts = " ".join(ANSWER_TEMPLATES[attribute].format(name=p.name, value=p.fact(attribute)) for p in group)
        question = rng.choice(QUESTION_TEMPLATES[attribute]).format(name=asked.name)
        items.append({"prompt": f"{facts}\nQ: {question}\nA:", "answer": asked.fact(attribute), "name": asked.name})
    return items
