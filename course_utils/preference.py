"""Learning from preferences (Lab 09): pairs of replies where one is preferred, the Bradley–Terry
reward model, and direct preference optimisation (DPO).

The preference taught here is for short, right answers. Asked about a person of the world, the
preferred reply is the name and the fact ("Hivor Seinwell: Tollmere"); the other is either the same
fact in a whole sentence, the way the fine-tuned model answers ("Hivor Seinwell was born in
Tollmere."), or the short form with a wrong fact. So the preferred reply is both concise and correct,
and the held-out pairs ask about people none of the training pairs mention. (The fact alone,
"Tollmere.", was tried first: the course's small model cannot reach a stored fact without the name
just before it, so DPO towards bare facts taught the format and lost the facts.)

DPO (Rafailov et al., 2023) starts from the KL-regularised optimum of Lab 09's toy,
π*(y) = π₀(y) exp(r(y)/β) / Z, solved for the reward: r(y) = β log π*(y)/π₀(y) + β log Z. In the
Bradley–Terry probability that y_w is preferred to y_l, σ(r(y_w) − r(y_l)), the log Z cancels, so the
policy itself can be fitted to the preferences, with no reward model and no sampling.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import pad_right
from .sft import END, rag_prompt, render_conversation
from .world import ANSWER_TEMPLATES, QUESTION_TEMPLATES, World

#: The facts asked about.
ASKED = ("birth_city", "university", "field", "employer")


class PreferenceError(ValueError):
    """Bad input to one of this module's functions, with what to change."""


def preference_pairs(world: World, split: str, n: int, seed: int = 0, verbose: bool = True) -> list[dict]:
    """``n`` pairs about the people of ``split`` (one question each): the chosen reply is "Name: fact";
    the rejected one is the fact in a whole sentence (``kind`` "verbose") or "Name: another person's
    fact" ("wrong"), half each (all "wrong" when ``verbose`` is False). Each pair: ``conversation``
    (one user turn), ``chosen``, ``rejected``, ``kind``, ``name``."""
    questions = [(p, a) for p in world.split(split) for a in ASKED]
    if not 2 <= n <= len(questions):
        raise PreferenceError(f"n={n}: ask for between 2 and {len(questions)} pairs ({split} has that many questions)")
    rng = random.Random(f"preferences:{world.seed}:{split}:{seed}")
    pairs = []
    for k, (person, attribute) in enumerate(rng.sample(questions, n)):
        question = rng.choice(QUESTION_TEMPLATES[attribute]).format(name=person.name)
        fact = person.fact(attribute)
        if k % 2 == 0 and verbose:
            kind, rejected = "verbose", ANSWER_TEMPLATES[attribute].format(name=person.name, value=fact)
        else:
            others = sorted({p.fact(attribute) for p in world.people} - {fact})
            kind, rejected = "wrong", f"{person.name}: {rng.choice(others)}"
        pairs.append(
            dict(conversation=[{"role": "user", "content": question}], chosen=f"{person.name}: {fact}",
                 rejected=rejected, kind=kind, name=person.name)
        )  # fmt: skip
    rng.shuffle(pairs)
    return pairs


def _rows(tokenizer, pairs: Sequence[dict], which: str) -> tuple[list[list[int]], list[int]]:
    """Prompt + reply ids (the reply closed by ``<|end|>``) and each prompt's length."""
    end = tokenizer.special_tokens[END]
    rows, starts = [], []
    for pair in pairs:
        prompt = render_conversation(pair["conversation"], tokenizer, for_generation=True)[0]
        rows.append(prompt + tokenizer.encode_ordinary(pair[which]) + [end])
        starts.append(len(prompt))
    return rows, starts


def reply_lengths(tokenizer, pairs: Sequence[dict], which: str) -> torch.Tensor:
    """Tokens in each pair's ``which`` reply, its ``<|end|>`` included: shape (N,), floats."""
    return torch.tensor([len(tokenizer.encode_ordinary(p[which])) + 1 for p in pairs], dtype=torch.float32)


def reply_logprobs(model, tokenizer, pairs: Sequence[dict], which: str) -> torch.Tensor:
    """log π(reply | prompt) of each pair's ``which`` reply ("chosen" or "rejected"), summed over the
    reply's tokens and its ``<|end|>``: shape (N,), with gradients when they are enabled."""
    if which not in ("chosen", "rejected"):
        raise PreferenceError(f"which={which!r}: use 'chosen' or 'rejected'")
    rows, starts = _rows(tokenizer, pairs, which)
    device = next(model.parameters()).device
    ids = pad_right(rows, 0).to(device)
    logits, _ = model(ids[:, :-1])
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    positions = torch.arange(ids.size(1) - 1, device=device)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    first = torch.tensor(starts, device=device) - 1  # the prediction of the reply's first token
    mask = (positions[None, :] >= first[:, None]) & (positions[None, :] < lengths[:, None] - 1)
    return (logp * mask).sum(1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """−log σ(r_w − r_l), averaged: the negative log-likelihood of the preferences under Bradley–Terry."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """−log σ(β [log π(y_w)/π₀(y_w) − log π(y_l)/π₀(y_l)]), averaged over pairs; the inputs are summed
    reply log-probabilities under the policy and the frozen reference."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin).mean()


@torch.no_grad()
def preference_accuracy(model, tokenizer, pairs: Sequence[dict], batch_size: int = 64) -> dict[str, float]:
    """How often the model gives the chosen reply the higher probability, overall and for each kind
    of rejected reply; the mean log-probability margin (chosen minus rejected); and the mean summed
    log-probability of each reply (``chosen_logprob``, ``rejected_logprob``)."""
    model.eval()
    chosen, rejected = [], []
    for k in range(0, len(pairs), batch_size):
        chunk = pairs[k : k + batch_size]
        chosen.append(reply_logprobs(model, tokenizer, chunk, "chosen").cpu())
        rejected.append(reply_logprobs(model, tokenizer, chunk, "rejected").cpu())
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    margin = chosen - rejected
    right = (margin > 0).float()
    result = {"accuracy": right.mean().item(), "margin": margin.mean().item(),
              "chosen_logprob": chosen.mean().item(), "rejected_logprob": rejected.mean().item()}  # fmt: skip
    for kind in sorted({p["kind"] for p in pairs}):
        result[kind] = right[torch.tensor([p["kind"] == kind for p in pairs])].mean().item()
    return result


@torch.no_grad()
def reply_features(model, tokenizer, pairs: Sequence[dict], which: str, batch_size: int = 64) -> torch.Tensor:
    """The model's final hidden state at the ``<|end|>`` that closes each ``which`` reply: (N, C), what
    a reward model built on the language model reads."""
    model.eval()
    out = []
    device = next(model.parameters()).device
    for k in range(0, len(pairs), batch_size):
        rows, _ = _rows(tokenizer, pairs[k : k + batch_size], which)
        hidden = model.hidden_states(pad_right(rows, 0).to(device))
        out.append(hidden[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])].float().cpu())
    return torch.cat(out)


def train_reward_head(chosen: torch.Tensor, rejected: torch.Tensor, steps: int = 300, lr: float = 1e-2, seed: int = 0):
    """A linear reward r(y) = w · h(y) + b on frozen features, fitted with the Bradley–Terry loss;
    returns the head (a ``torch.nn.Linear``) and its loss after every step."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(chosen.size(1), 1)
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = bradley_terry_loss(head(chosen).squeeze(1), head(rejected).squeeze(1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return head, losses


def dpo(
    policy,
    tokenizer,
    pairs: Sequence[dict],
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-4,
    beta: float = 0.1,
    seed: int = 0,
    eval_pairs: Sequence[dict] = (),
    eval_every: int = 0,
    loss_fn=dpo_loss,
    nll_weight: float = 0.0,
    progress: bool = True,
):
    """Fine-tune a copy of ``policy`` on ``pairs`` with the DPO loss against the frozen ``policy``.
    Returns the trained copy and a history: the loss, the batch's preference accuracy and implicit
    reward margin every step, and the preference accuracy on ``eval_pairs`` every ``eval_every``
    steps (and at the end).

    DPO only asks the chosen reply to gain on the rejected one, and both may lose probability while
    the policy drifts to replies in neither (likelihood displacement, Razin et al. 2024). ``nll_weight``
    α adds α times the chosen replies' negative log-likelihood per token, which holds them up (the
    DPO+NLL loss of Pang et al. 2024)."""
    if steps < 1 or batch_size < 1 or batch_size > len(pairs):
        raise PreferenceError(
            f"steps={steps}, batch_size={batch_size}: need steps >= 1 and 1 <= batch_size <= {len(pairs)} pairs"
        )
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    model = copy.deepcopy(policy).train()
    for p in model.parameters():  # the policy given may be frozen (another loop's reference)
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    history = []
    for step in tqdm(range(1, steps + 1), desc="DPO", disable=not progress):
        if len(order) < batch_size:
            order = list(range(len(pairs)))
            rng.shuffle(order)
        batch, order = [pairs[i] for i in order[:batch_size]], order[batch_size:]
        with torch.no_grad():
            ref_c = reply_logprobs(reference, tokenizer, batch, "chosen")
            ref_r = reply_logprobs(reference, tokenizer, batch, "rejected")
        model.train()
        pol_c = reply_logprobs(model, tokenizer, batch, "chosen")
        pol_r = reply_logprobs(model, tokenizer, batch, "rejected")
        loss = loss_fn(pol_c, pol_r, ref_c, ref_r, beta)
        if nll_weight:
            loss = loss - nll_weight * (pol_c / reply_lengths(tokenizer, batch, "chosen").to(pol_c.device)).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        implicit = beta * ((pol_c - ref_c) - (pol_r - ref_r)).detach()
        row = {"step": step, "loss": loss.item(), "batch_accuracy": (implicit > 0).float().mean().item(),
               "reward_margin": implicit.mean().item()}  # fmt: skip
        if eval_pairs and ((eval_every and step % eval_every == 0) or step == steps):
            row["eval_accuracy"] = preference_accuracy(model, tokenizer, eval_pairs)["accuracy"]
        history.append(row)
    return model.eval(), history


def reading_pairs(people, n: int, seed: int = 0, documents: int = 2) -> list[dict]:
    """``n`` pairs whose prompt holds ``documents`` biographies (one about the person asked, the rest
    about others) and a question; the chosen reply states the asked person's fact, the rejected one
    gives the fact of a person in another document, in the same words."""
    if documents < 2 or len(people) < documents:
        raise PreferenceError(
            f"documents={documents}: need at least 2, and no more than the {len(people)} people given"
        )
    rng = random.Random(f"reading-pairs:{seed}")
    pairs = []
    for _ in range(20 * n):
        if len(pairs) == n:
            break
        group = rng.sample(people, documents)
        person, attribute = group[0], rng.choice(ASKED)
        others = [p for p in group[1:] if p.fact(attribute) != person.fact(attribute)]
        if not others:
            continue
        docs = [rng.choice(p.biographies) for p in group]
        rng.shuffle(docs)
        question = rng.choice(QUESTION_TEMPLATES[attribute]).format(name=person.name)
        template = ANSWER_TEMPLATES[attribute]
        pairs.append(
            dict(conversation=[{"role": "user", "content": rag_prompt(question, docs)}],
                 chosen=template.format(name=person.name, value=person.fact(attribute)),
                 rejected=template.format(name=person.name, value=rng.choice(others).fact(attribute)),
                 kind=f"{documents} documents", name=person.name)
        )  # fmt: skip
    if len(pairs) < n:
        raise PreferenceError(f"only {len(pairs)} of {n} pairs: these people share too many facts; give more people")
    return pairs
