"""Reinforcement learning for reasoning (Lab 09).

A language model is a policy: the state is the prompt and the tokens written so far, an action is
the next token, and a whole reply earns one reward that a program can check. This module holds the
pieces Lab 09 builds: the verifiable reward, a one-step toy problem whose KL-regularised optimum is
known in closed form, and GRPO (group-relative policy optimisation) on the course's models.

The KL-regularised objective  max_π E_π[r] - β KL(π || π₀)  has the optimum
π*(a) ∝ π₀(a) exp(r(a)/β): Bayes' rule with the pretrained model as the prior and exp(r/β) as the
likelihood of "this answer is good".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .artefacts import load_checkpoint, save_checkpoint
from .data import pad_right
from .lab import data_dir, precision_for
from .sft import problem_conversation, replies, sample_replies
from .tokenizer import ENDOFTEXT
from .train import mixed_precision
from .world import normalise_answer

#: The last sentence of a well-formed reply; what follows "The answer is" is the final answer.
_FINAL = re.compile(r"The answer is ([^.]+)\.?\s*$")


class RLError(ValueError):
    """Bad input to one of this module's functions, with what to change."""


# ---------------------------------------------------------------------------------------------
# The verifiable reward
# ---------------------------------------------------------------------------------------------


def extract_answer(text: str) -> str | None:
    """The final answer of a reply that ends ``... The answer is X.``; ``None`` when it does not."""
    match = _FINAL.search(text.strip())
    return match.group(1).strip() if match else None


def reasoning_reward(response: str, answer: str, *, format_bonus: float = 0.1) -> float:
    """1 for a correct final answer, plus ``format_bonus`` when the reply ends with
    ``The answer is X.`` (so a well-formed wrong answer earns a little, a ramble nothing)."""
    final = extract_answer(response)
    if final is None:
        return 0.0
    return float(normalise_answer(final) == normalise_answer(answer)) + format_bonus


#: "Name Surname was born on Month D, YYYY" in a prompt; "Name Surname (was born) in YYYY", "a - b = c"
#: and "so Name Surname is older" in a worked reply.
_PROMPT_BIRTH = re.compile(r"([A-Z][a-z]+ [A-Z][a-z]+) was born on [A-Z][a-z]+ \d{1,2}, (\d{4})")
_STATED_BIRTH = re.compile(r"([A-Z][a-z]+ [A-Z][a-z]+)(?: was born)? in (\d{4})")
_EQUATION = re.compile(r"(\d+)\s*[-\u2212]\s*(\d+)\s*=\s*(-?\d+)")
_ELDER = re.compile(r"so ([A-Z][a-z]+ [A-Z][a-z]+) is older")


def steps_hold(response: str, prompt: str) -> bool:
    """Whether every step of a worked reply that can be checked against ``prompt`` is right: each
    "Name (was born) in YYYY" names someone the prompt gives a birth date for, with that year; each
    "a - b = c" is true and subtracts years that are in the prompt; "so Name is older" names the one
    of the stated people born first. A reply with no such step holds."""
    born = dict(_PROMPT_BIRTH.findall(prompt))
    years = set(re.findall(r"\b\d{4}\b", prompt))
    stated = {}
    for name, year in _STATED_BIRTH.findall(response):
        if born.get(name) != year:
            return False
        stated[name] = int(year)
    for a, b, c in _EQUATION.findall(response):
        if a not in years or b not in years or int(a) - int(b) != int(c):
            return False
    for elder in _ELDER.findall(response):
        if elder not in stated or any(year < stated[elder] for year in stated.values()):
            return False
    return True


def answer_reward(response: str, problem: dict) -> float:
    """:func:`reasoning_reward` on ``problem["answer"]``: the outcome alone, as GRPO uses by default."""
    return reasoning_reward(response, problem["answer"])


def checked_reward(response: str, problem: dict, *, format_bonus: float = 0.1) -> float:
    """The outcome reward, but a right answer earns only the format bonus unless the reply shows its
    steps (the birth year of everyone in ``problem["names"]``, and a subtraction for the age and gap
    kinds) and every step holds (:func:`steps_hold`: no year miscopied, no false subtraction). So a
    lucky guess on a two-way question is not reinforced as if the reasoning had been sound, and
    leaving the steps out, where no check can fail, does not pay."""
    reward = reasoning_reward(response, problem["answer"], format_bonus=format_bonus)
    if reward < 1:
        return reward
    shown = {name for name, _ in _STATED_BIRTH.findall(response)} >= set(problem["names"])
    if problem.get("kind") in ("age", "gap"):
        shown = shown and bool(_EQUATION.search(response))
    if not shown or not steps_hold(response, problem_conversation(problem)[0]["content"]):
        return format_bonus
    return reward


# ---------------------------------------------------------------------------------------------
# A one-step toy: the closed-form optimum, and policy gradient that finds it
# ---------------------------------------------------------------------------------------------


def kl_optimal_policy(prior: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """π*(a) ∝ π₀(a)·exp(r(a)/β), the maximiser of E_π[r] - β KL(π || π₀)."""
    if beta <= 0:
        raise RLError(f"beta must be positive, got {beta}")
    if prior.shape != rewards.shape or prior.dim() != 1:
        raise RLError(f"prior {tuple(prior.shape)} and rewards {tuple(rewards.shape)} must be the same 1-D shape")
    return torch.softmax(prior.double().log() + rewards.double() / beta, dim=0)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """½ Σ |p - q|: the largest difference in probability the two give to any set of actions."""
    return 0.5 * (p.double() - q.double()).abs().sum().item()


def regularised_objective(policy: torch.Tensor, prior: torch.Tensor, rewards: torch.Tensor, beta: float) -> float:
    """E_π[r] - β KL(π || π₀), exactly."""
    p = policy.double()
    kl = (p * (p.clamp_min(1e-300).log() - prior.double().log())).sum()
    return ((p * rewards.double()).sum() - beta * kl).item()


def toy_policy_gradient(
    prior: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    *,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
) -> tuple[torch.Tensor, list[float]]:
    """Learn a softmax policy over the actions by sampled policy gradient (REINFORCE) on
    r(a) - β log(π(a)/π₀(a)), starting from π₀, with the batch mean as baseline and a step size that
    decays to zero. Returns the final policy and its total variation from π* after every step."""
    target = kl_optimal_policy(prior, rewards, beta)
    gen = torch.Generator().manual_seed(seed)
    logits = prior.double().log().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 1 - s / steps)
    rewards, log_prior = rewards.double(), prior.double().log()
    distance = []
    for _ in range(steps):
        log_pi = torch.log_softmax(logits, dim=0)
        actions = torch.multinomial(log_pi.exp().detach(), batch_size, replacement=True, generator=gen)
        score = (rewards[actions] - beta * (log_pi[actions] - log_prior[actions])).detach()
        advantage = score - score.mean()
        loss = -(advantage * log_pi[actions]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        distance.append(total_variation(torch.softmax(logits.detach(), 0), target))
    return torch.softmax(logits.detach(), 0), distance


# ---------------------------------------------------------------------------------------------
# GRPO: advantages and the loss
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Advantages for a (prompts, group) table of rewards: each reward minus its group's mean,
    divided by the group's standard deviation (population, ÷G) plus ``eps`` when ``scale``. A group
    whose answers all earn the same reward gets zero advantage: it has nothing to teach."""
    if rewards.dim() != 2:
        raise RLError(f"rewards must be (prompts, group), got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, correction=0) + eps)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    beta: float = 0.04,
    token_level: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate with a KL penalty, to minimise. ``logp``/``old_logp``/``ref_logp`` are
    (N, T) log-probabilities of the sampled tokens under the policy being trained, the policy that
    sampled them and the frozen reference; ``advantages`` is (N,), one per reply; ``mask`` (N, T) is
    True on reply tokens.

    Per token: min(ρA, clip(ρ, 1-ε, 1+ε)A) - β k₃ with ρ = π/π_old and the unbiased, never-negative
    KL estimate k₃ = π_ref/π - log(π_ref/π) - 1. Averaged over each reply's tokens, then over replies;
    ``token_level`` averages over all tokens of the batch at once instead."""
    if not (logp.shape == old_logp.shape == ref_logp.shape == mask.shape):
        raise RLError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, ref_logp {tuple(ref_logp.shape)} and mask "
            f"{tuple(mask.shape)} must all be (replies, tokens)"
        )
    if advantages.shape != logp.shape[:1]:
        raise RLError(f"advantages must be one per reply, shape ({logp.size(0)},), got {tuple(advantages.shape)}")
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = -(surrogate - beta * kl)
    if token_level:
        loss = (per_token * mask).sum() / mask.sum().clamp_min(1)
    else:
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
    with torch.no_grad():
        n = mask.sum().clamp_min(1)
        clipped = ((ratio - 1).abs() > clip).to(logp.dtype)
        stats = {"kl": ((kl * mask).sum() / n).item(), "clip_fraction": ((clipped * mask).sum() / n).item()}
    return loss, stats


# ---------------------------------------------------------------------------------------------
# Sampling groups of replies, and scoring them
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """A batch of sampled replies: ``ids`` (N, T) prompt + reply, right-padded; ``mask`` (N, T-1) True
    where position t+1 is a reply token (up to and including ``<|end|>``); ``texts``; ``rewards`` (N,);
    ``lengths`` (N,) reply tokens."""

    ids: torch.Tensor
    mask: torch.Tensor
    texts: list[str]
    rewards: torch.Tensor
    lengths: torch.Tensor


def _batch(samples, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + reply ids of every sample, right-padded, and the mask of reply positions (N, T-1)."""
    ids = pad_right([r.prompt + r.reply for r in samples], pad_id)
    mask = pad_right([[0] * (len(r.prompt) - 1) + [1] * len(r.reply) for r in samples], 0, ids.size(1) - 1).bool()
    return ids.to(device), mask.to(device)


def token_logprobs(model, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(ids[:, t+1] | ids[:, :t+1]) for every position: (N, T-1), from the distribution at
    ``temperature`` (the one replies were sampled from, so that ratios compare like with like)."""
    logits, _ = model(ids[:, :-1])
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def rollout(
    model,
    tokenizer,
    problems: Sequence[dict],
    *,
    group_size: int,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    generator=None,
    reward_fn: Callable[[str, dict], float] = answer_reward,
) -> Rollouts:
    """Sample ``group_size`` replies to every problem and score each with ``reward_fn(reply, problem)``."""
    samples = sample_replies(
        model,
        tokenizer,
        [problem_conversation(p) for p in problems],
        n=group_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        generator=generator,
    )
    device = next(model.parameters()).device
    ids, mask = _batch(samples, tokenizer.special_tokens[ENDOFTEXT], device)
    texts = [r.text for r in samples]
    rewards = torch.tensor(
        [reward_fn(text, problems[i // group_size]) for i, text in enumerate(texts)], dtype=torch.float32, device=device
    )
    return Rollouts(ids, mask, texts, rewards, mask.sum(1))


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimate of the chance that at least one of ``k`` replies is right, from ``n``
    samples of which ``correct`` were right: 1 - C(n-c, k)/C(n, k) (Chen et al., 2021)."""
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise RLError(f"need 0 <= correct <= n and 1 <= k <= n, got n={n}, correct={correct}, k={k}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def accuracy(model, tokenizer, problems: Sequence[dict], *, max_new_tokens: int = 64) -> float:
    """Share of ``problems`` whose greedy reply ends with the right final answer."""
    if not problems:
        raise RLError("no problems to measure on")
    texts = replies(model, tokenizer, [problem_conversation(p) for p in problems], max_new_tokens=max_new_tokens)
    return sum(answer_reward(t, p) >= 1 for t, p in zip(texts, problems, strict=True)) / len(problems)


def pass_at_k_curve(
    model,
    tokenizer,
    problems: Sequence[dict],
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    n: int = 8,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> dict[int, float]:
    """pass@k for each k, from ``n`` replies per problem sampled at temperature 1."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    samples = sample_replies(
        model,
        tokenizer,
        [problem_conversation(p) for p in problems],
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        generator=gen,
    )
    correct = [sum(answer_reward(samples[i * n + j].text, p) >= 1 for j in range(n)) for i, p in enumerate(problems)]
    return {k: sum(pass_at_k(n, c, k) for c in correct) / len(problems) for k in ks}


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    """Settings of a GRPO run. The switches give the known variants: ``beta=0`` drops the KL term
    (DAPO, Dr GRPO); ``scale_std=False`` keeps advantages in reward units (Dr GRPO: dividing by a
    small group spread over-weights nearly-settled prompts); ``token_level=True`` averages the loss
    over all tokens of the batch (DAPO: every token counts the same, so long replies are not
    under-weighted)."""

    steps: int = 300
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 5e-5
    beta: float = 0.04
    clip: float = 0.2
    scale_std: bool = True
    token_level: bool = False
    updates_per_batch: int = 1
    temperature: float = 0.7
    max_new_tokens: int = 64
    grad_clip: float = 1.0
    eval_every: int = 25
    seed: int = 0


GRPO_FORMAT = "course-grpo-1"


def grpo(
    policy,
    tokenizer,
    train_problems: Sequence[dict],
    eval_problems: Sequence[dict],
    cfg: GRPOConfig | None = None,
    *,
    out_dir=None,
    checkpoint_every: int = 25,
    progress: bool = True,
    on_eval: Callable[[list[dict]], None] | None = None,
    reward_fn: Callable[[str, dict], float] = answer_reward,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train a copy of ``policy`` with GRPO on ``train_problems``; the reference is ``policy`` itself,
    frozen. Every step samples ``group_size`` replies to ``prompts_per_step`` problems and logs mean
    reward, share solved, reply length, KL to the reference and clip fraction; every ``eval_every``
    steps (and at the start and end) greedy ``accuracy`` on ``eval_problems`` is added and
    ``on_eval(history)`` is called (for a live plot). ``history[0]`` is the starting point, step 0.

    With ``out_dir`` a checkpoint (``grpo.pt``: weights, optimiser, random states, data order and
    history) is written atomically every ``checkpoint_every`` steps and at the end, and a later call
    with the same settings resumes from it exactly (a dropped Colab session loses at most
    ``checkpoint_every`` steps). Returns (trained policy, history)."""
    cfg = cfg or GRPOConfig()
    if cfg.group_size < 2:
        raise RLError(
            f"group_size must be at least 2 (advantages compare replies within a group), got {cfg.group_size}"
        )
    if not train_problems or not eval_problems:
        raise RLError("need at least one training and one evaluation problem")
    device = next(policy.parameters()).device
    reference = policy.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    model = copy.deepcopy(policy).train()
    for p in model.parameters():
        p.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    order = random.Random(cfg.seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    # On a CPU the policy trains in fp32 even where bf16 is native: importance ratios of bf16 log-probabilities
    # are too coarse (Lab 09's cpu profile: held-out accuracy 0.11 -> 0.06 in bf16, 0.11 -> 0.12 in fp32)
    autocast, scaler = mixed_precision(device, precision_for(device) if device.type == "cuda" else "fp32")
    history: list[dict] = []
    pool: list[int] = []
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "steps"}
    path = Path(out_dir) / "grpo.pt" if out_dir is not None else None

    def evaluate(row: dict) -> None:
        row["accuracy"] = accuracy(model, tokenizer, eval_problems, max_new_tokens=cfg.max_new_tokens)
        if on_eval:
            on_eval(history)

    def save() -> None:
        if path is not None:
            save_checkpoint(
                path,
                {
                    "format": GRPO_FORMAT,
                    "settings": settings,
                    "n_problems": len(train_problems),
                    "model": model.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "scaler": scaler.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "order": order.getstate(),
                    "pool": pool,
                    "history": history,
                },
            )

    if path is not None and path.exists():
        state = load_checkpoint(path, GRPO_FORMAT, what="GRPO checkpoint", error=RLError)
        if state["settings"] != settings or state["n_problems"] != len(train_problems):
            raise RLError(
                f"{path} holds a GRPO run with other settings; delete {Path(out_dir)} or choose another out_dir"
            )
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        order.setstate(state["order"])
        pool, history = state["pool"], state["history"]
    if not history:
        history.append({"step": 0})
        evaluate(history[-1])
    done = history[-1]["step"]

    bar = tqdm(range(done, cfg.steps), desc="GRPO", disable=not progress, initial=done, total=cfg.steps)
    for step in bar:
        if len(pool) < cfg.prompts_per_step:
            pool = list(range(len(train_problems)))
            order.shuffle(pool)
        batch, pool = [train_problems[i] for i in pool[: cfg.prompts_per_step]], pool[cfg.prompts_per_step :]
        model.eval()
        with torch.no_grad():
            roll = rollout(
                model,
                tokenizer,
                batch,
                group_size=cfg.group_size,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                generator=gen,
                reward_fn=reward_fn,
            )
            with autocast():
                old = token_logprobs(model, roll.ids, cfg.temperature)
                ref = token_logprobs(reference, roll.ids, cfg.temperature)
        model.train()
        adv = group_advantages(roll.rewards.view(-1, cfg.group_size), scale=cfg.scale_std).view(-1)
        row = {
            "step": step + 1,
            "reward": roll.rewards.mean().item(),
            "length": roll.lengths.float().mean().item(),
            "solved": (roll.rewards >= 1).float().mean().item(),
        }
        for _ in range(cfg.updates_per_batch):
            with autocast():
                logp = token_logprobs(model, roll.ids, cfg.temperature)
            loss, stats = grpo_loss(
                logp, old, ref, adv, roll.mask, clip=cfg.clip, beta=cfg.beta, token_level=cfg.token_level
            )
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimiser)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimiser)
            scaler.update()
        row.update(loss=loss.item(), **stats)
        history.append(row)
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
            evaluate(row)
        if (checkpoint_every and (step + 1) % checkpoint_every == 0) or step + 1 == cfg.steps:
            save()
        bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row['kl']:.3f}")
    model.eval()
    return model, history


# ---------------------------------------------------------------------------------------------
# Real RL-for-reasoning data
# ---------------------------------------------------------------------------------------------


def gsm8k(data=None) -> list[dict]:
    """The shipped GSM8K test problems (``data/gsm8k/test.jsonl``): ``question``, ``solution`` (the
    worked answer, with calculator annotations ``<<…>>``) and ``answer`` (the number after ``####``)."""
    path = (data or data_dir()) / "gsm8k" / "test.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: it ships with the course repository (data/gsm8k); pull the repository again"
        )
    problems = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        solution, _, answer = record["answer"].rpartition("####")
        problems.append(
            {"question": record["question"], "solution": solution.strip(), "answer": answer.strip().replace(",", "")}
        )
    return problems
