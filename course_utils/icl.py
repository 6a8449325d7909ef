"""In-context learning (Lab 07): what a model does with what is in its prompt, and how to see it.

* **Copying.** A span of random ordinary tokens, then the same span again: nothing predicts the first
  copy, but a model that reads its context predicts the second one by finding where the current token
  stood before and copying what followed (an induction head, Olsson et al. 2022). :func:`copy_losses`
  measures the loss on each copy; their ratio is the copy score.
* **Loss against position** (:func:`loss_by_position`): if later tokens are predicted better than
  early ones, the model uses what it has read so far.
* **Few-shot prompts** (:func:`few_shot_prompt`): questions and answers before the question asked;
  the examples say which attribute and which format are wanted.
* **Lookups** (:func:`lookup_rows`, ``python -m course_utils.icl``): keys of several tokens, the same
  words after each, then a value; finding the value of a key asked again needs more than one token
  matched, which the short convolution (``GPTConfig.conv_width``) makes learnable.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import BatchSampler
from .model import GPT, GPTConfig, generate_batched
from .tokenizer import ENDOFTEXT
from .world import ANSWER_TEMPLATES, PROBED, QUESTION_TEMPLATES, World, answer_matches, fresh_people, normalise_answer


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
    case, punctuation and articles aside, the answer or the answer followed by more words). An item
    with a ``lead`` (``"Hivor Seinwell was born in"``) also takes a whole-sentence reply: the lead,
    then the answer."""
    if len(predictions) != len(items) or not items:
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items: give one per item")
    return sum(_gives_answer(p, i) for p, i in zip(predictions, items, strict=True)) / len(items)


def _gives_answer(prediction: str, item: dict) -> bool:
    if answer_matches(prediction, item["answer"]):
        return True
    lead = item.get("lead")
    if not lead:
        return False
    words, lead_words = normalise_answer(prediction).split(), normalise_answer(lead).split()
    return words[: len(lead_words)] == lead_words and answer_matches(" ".join(words[len(lead_words) :]), item["answer"])


def in_context_facts(
    n_items: int,
    n_people: int = 5,
    attribute: str = "birth_city",
    seed: int = 0,
    exclude=frozenset(),
    start_answer: bool = False,
):
    """Prompts that state one fact about each of ``n_people`` invented people (:func:`fresh_people`),
    then ask it about one of them: only reading the prompt can answer. Returns items with
    ``prompt``, ``answer`` and ``lead`` (the answer may come bare or as the statement's whole sentence;
    chance: one in ``n_people``, less where two share a value).

    With ``start_answer`` the prompt also begins the answer in the words the facts were stated in
    (``A: Hivor Seinwell was born in``), so the words before the wanted value are the same as in the
    statement: a model that matches the last few tokens against its context finds it there."""
    rng = random.Random(f"in-context:{seed}")
    people = fresh_people(n_items * n_people, 1_000 + seed, exclude)
    items = []
    for k in range(n_items):
        group = people[k * n_people : (k + 1) * n_people]
        asked = rng.choice(group)
        facts = " ".join(ANSWER_TEMPLATES[attribute].format(name=p.name, value=p.fact(attribute)) for p in group)
        question = rng.choice(QUESTION_TEMPLATES[attribute]).format(name=asked.name)
        lead = ANSWER_TEMPLATES[attribute].split("{value}")[0].format(name=asked.name).rstrip()
        prompt = f"{facts}\nQ: {question}\nA:" + (" " + lead if start_answer else "")
        item = {"prompt": prompt, "answer": asked.fact(attribute), "name": asked.name}
        items.append(item if start_answer else {**item, "lead": lead})
    return items


def lookup_rows(
    n_rows: int,
    pairs: int = 6,
    key_length: int = 6,
    gap: int = 3,
    generator: torch.Generator | None = None,
    vocabulary: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic lookup (multi-query associative recall, Arora et al. 2023) shaped like a prompt of
    facts: ``pairs`` keys of ``key_length`` random ids, each followed by the same ``gap`` ids (the
    "was born in") and a value; a separator; then every key again in a new order, with the gap, and its
    value. Returns ``(ids, targets)``, (n_rows, length) each; targets are -1 except at the values asked
    for, so a loss or an accuracy on them measures the lookup alone. Ids: keys from 10–199, gap from
    200–, values from 300–(vocabulary - 1), separator 1."""
    keys_from, gap_ids, values_from, separator = 10, torch.arange(200, 200 + gap), 300, 1
    if vocabulary <= values_from + pairs or gap > 100:
        raise ValueError(f"a vocabulary of {vocabulary} ids and a gap of {gap} leave no room for the values")
    rows, targets = [], []
    for _ in range(n_rows):
        keys = torch.randint(keys_from, 200, (pairs, key_length), generator=generator)
        values = torch.randint(values_from, vocabulary, (pairs,), generator=generator)
        stated = [torch.cat([k, gap_ids, v.view(1)]) for k, v in zip(keys, values, strict=True)]
        order = torch.randperm(pairs, generator=generator)
        asked = [torch.cat([keys[i], gap_ids, values[i].view(1)]) for i in order]
        row = torch.cat([*stated, torch.tensor([separator]), *asked])
        target = torch.full_like(row, -1)
        start = len(row) - pairs * (key_length + gap + 1)
        for j, i in enumerate(order):  # the value of query j is predicted from the position just before it
            at = start + (j + 1) * (key_length + gap + 1) - 2
            target[at] = values[i]
        rows.append(row)
        targets.append(target)
    return torch.stack(rows), torch.stack(targets)


def lookup_accuracy(model: GPT, ids: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of the asked values (``targets`` >= 0) that the model predicts first (greedy)."""
    with torch.no_grad():
        logits, _ = model(ids)
    asked = targets >= 0
    return (logits.argmax(-1)[asked] == targets[asked]).float().mean().item()


def train_lookup(
    config: GPTConfig, steps: int, *, batch_size: int = 32, lr: float = 3e-3, every: int = 100, seed: int = 0, **rows
) -> list[tuple[int, float]]:
    """Train ``config`` from scratch on :func:`lookup_rows` (loss on the asked values only) and return
    ``(step, accuracy)`` on fresh rows every ``every`` steps."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    curve = []
    for step in range(1, steps + 1):
        ids, targets = lookup_rows(batch_size, generator=g, vocabulary=config.vocab_size, **rows)
        logits, _ = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            model.eval()
            curve.append(
                (step, lookup_accuracy(model, *lookup_rows(128, generator=g, vocabulary=config.vocab_size, **rows)))
            )
            model.train()
    return curve


def main(argv: list[str] | None = None) -> int:
    """``python -m course_utils.icl``: the synthetic lookup, learned with and without the short
    convolution, same model and budget otherwise."""
    parser = argparse.ArgumentParser(description="Synthetic lookups with and without the short convolution")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--key-length", type=int, default=6)
    parser.add_argument("--gap", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="+", default=[0, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the transition's timing varies by seed")
    args = parser.parse_args(argv)
    rows = {"key_length": args.key_length, "gap": args.gap}
    length = lookup_rows(1, **rows)[0].size(1)
    for seed, width in ((s, w) for s in args.seeds for w in args.widths):
        config = GPTConfig(
            vocab_size=512,
            context_length=length,
            n_layer=2,
            n_head=4,
            n_embd=128,
            position="rope",
            smear_keys=True,
            conv_width=width,
        )
        curve = train_lookup(config, args.steps, seed=seed, **rows)
        print(f"seed {seed}, conv_width {width}: accuracy " + ", ".join(f"{a:.2f}@{s}" for s, a in curve), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
