"""Checks for Lab 09 (reinforcement learning for reasoning). References: :mod:`course_utils.rl`."""

from __future__ import annotations

import math

import torch

from .checks import call, exercise, expect, gradient
from .preference import bradley_terry_loss, dpo_loss
from .rl import group_advantages, grpo_loss, reasoning_reward

LAB = "09"


@exercise(LAB, "reasoning_reward", "a verifiable reward: the final answer and the format")
def _check_reasoning_reward(fn) -> None:
    cases = [
        ("a correct, well-formed reply", "Ann was born in 1950. 1990 - 1950 = 40. The answer is 40.", "40"),
        ("a well-formed reply with the wrong number", "1990 - 1950 = 41. The answer is 41.", "40"),
        (
            "a right name written in lower case without the full stop",
            "so Tara Voss is older. The answer is tara voss",
            "Tara Voss",
        ),
        ("a reply that runs on after its answer", "The answer is 40. Then she went to the park.", "40"),
        ("a reply without 'The answer is'", "She is 40 years old.", "40"),
        ("a reply whose answer only starts with the right number", "The answer is 400.", "40"),
    ]
    for case, response, answer in cases:
        got = call(fn, response, answer, case=case)
        expected = reasoning_reward(response, answer)
        expect(
            isinstance(got, int | float) and math.isclose(float(got), expected, abs_tol=1e-9),
            f"on {case} ({response!r}, answer {answer!r}): expected {expected}, got {got!r}. A reply earns 1 when its "
            "last "
            "sentence is 'The answer is X.' with X equal to the answer after normalise_answer, plus 0.1 for that "
            "format; "
            "a reply that does not end that way earns 0",
        )


@exercise(LAB, "group_advantages", "group-relative advantages")
def _check_group_advantages(fn) -> None:
    cases = [
        ("one group of four, half right", torch.tensor([[1.0, 0.0, 0.0, 1.0]])),
        ("groups where every answer earned the same", torch.tensor([[0.1, 0.1, 0.1], [1.1, 1.1, 1.1]])),
        ("two groups of six", torch.tensor([[1.1, 0.1, 0.1, 0.1, 0.0, 0.0], [0.0, 1.1, 1.1, 0.1, 1.1, 0.0]])),
    ]
    for case, rewards in cases:
        got = call(fn, rewards.clone(), case=case)
        expected = group_advantages(rewards)
        expect(
            torch.is_tensor(got) and got.shape == rewards.shape,
            f"on {case}: return a tensor of shape {tuple(rewards.shape)}, "
            f"got {getattr(got, 'shape', type(got).__name__)}",
        )
        expect(
            torch.isfinite(got).all(),
            f"on {case}: got {got.tolist()}; add eps to the standard deviation so equal rewards do not divide by zero",
        )
        centred = rewards - rewards.mean(1, keepdim=True)
        unscaled = torch.allclose(got, centred, atol=1e-5) and not torch.allclose(expected, centred, atol=1e-5)
        expect(
            not unscaled,
            f"on {case}: got {got.tolist()}: the rewards are centred but not divided by the group's standard deviation",
        )
        expect(
            torch.allclose(got, expected, atol=1e-3),
            f"on {case} {rewards.tolist()}: expected {[[round(x, 4) for x in r] for r in expected.tolist()]}, got "
            f"{[[round(x, 4) for x in r] for r in got.tolist()]}. Subtract each group's (row's) mean and divide by its "
            "standard deviation over the group (correction=0) plus eps",
        )


@exercise(LAB, "grpo_loss", "the clipped surrogate loss with a KL penalty")
def _check_grpo_loss(fn) -> None:
    g = torch.Generator().manual_seed(0)
    cases = []
    for case, n, t, spread in [
        ("ratios near 1", 2, 3, 0.05),
        ("ratios far outside the clip range", 4, 5, 0.6),
        ("a mixed batch", 3, 4, 0.3),
    ]:
        old = torch.log(torch.rand(n, t, generator=g) * 0.8 + 0.1)
        logp = old + spread * torch.randn(n, t, generator=g)
        ref = old + 0.3 * torch.randn(n, t, generator=g)
        adv = torch.randn(n, generator=g)
        mask = torch.ones(n, t, dtype=torch.bool)
        mask[0, t - 1] = mask[-1, t - 2 :] = False  # replies of different lengths
        cases.append((case, logp, old, ref, adv, mask))
    for case, logp, old, ref, adv, mask in cases:
        logp = logp.clone().requires_grad_(True)
        got = call(fn, logp, old, ref, adv, mask, 0.2, 0.04, case=case)
        expected, _ = grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=0.04)
        expect(torch.is_tensor(got) and got.dim() == 0, f"on {case}: return a scalar tensor, got {got!r}")
        if not math.isclose(got.item(), expected.item(), rel_tol=1e-4, abs_tol=1e-6):
            hints = []
            for token_level, beta, clip in [
                (True, 0.04, 0.2),
                (False, 0.0, 0.2),
                (False, 0.04, 100.0),
                (False, -0.04, 0.2),
            ]:
                other, _ = grpo_loss(logp, old, ref, adv, mask, clip=clip, beta=beta, token_level=token_level)
                if math.isclose(got.item(), other.item(), rel_tol=1e-4, abs_tol=1e-6):
                    hints.append(
                        {
                            (
                                True,
                                0.04,
                                0.2,
                            ): "you averaged over all tokens at once; average over each reply's tokens, "
                            "then over replies",
                            (False, 0.0, 0.2): "the KL penalty is missing: subtract beta * k3 from the surrogate",
                            (
                                False,
                                0.04,
                                100.0,
                            ): "the ratio is never clipped: take min(ratio*A, clamp(ratio, 1-clip, 1+clip)*A)",
                            (False, -0.04, 0.2): "the KL term has the wrong sign: the loss is -(surrogate - beta*k3)",
                        }[(token_level, beta, clip)]
                    )
            expect(
                False,
                f"on {case}: expected {expected.item():.6f}, got {got.item():.6f}. "
                + (
                    " ".join(hints)
                    or "Per token: min(ρA, clip(ρ,1-ε,1+ε)A) - β·k3 with ρ = exp(logp - old_logp) and "
                    "k3 = exp(ref-logp) - (ref-logp) - 1; "
                    "the loss is minus that, averaged over each reply's masked tokens, then over replies"
                ),
            )
        grad = gradient(got, logp, case)
        expect(torch.all(grad[~mask] == 0), f"on {case}: tokens outside the mask must get zero gradient")


def _pair_cases(g: torch.Generator) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    wide = 3 * torch.randn(2, 8, generator=g)
    return [
        ("three pairs with small margins", torch.randn(3, generator=g), torch.randn(3, generator=g)),
        ("a batch of eight, some pairs the wrong way round", wide[0], wide[1]),
        (
            "pairs whose rejected reply scores 200 above the chosen",
            torch.tensor([-100.0, 0.0]),
            torch.tensor([100.0, 200.0]),
        ),
    ]


@exercise(LAB, "bradley_terry_loss", "the Bradley-Terry loss of a reward model")
def _check_bradley_terry_loss(fn) -> None:
    g = torch.Generator().manual_seed(0)
    for case, chosen, rejected in _pair_cases(g):
        chosen = chosen.clone().requires_grad_(True)
        got = call(fn, chosen, rejected.clone(), case=case)
        expected = bradley_terry_loss(chosen, rejected)
        expect(torch.is_tensor(got) and got.dim() == 0, f"on {case}: return a scalar tensor, got {got!r}")
        expect(
            bool(torch.isfinite(got)),
            f"on {case}: got {got.item()}; log(sigmoid(x)) underflows to log(0) for a large negative margin: "
            "use F.logsigmoid, which is exact there",
        )
        if not math.isclose(got.item(), expected.item(), rel_tol=1e-4, abs_tol=1e-6):
            flipped = bradley_terry_loss(rejected, chosen).item()
            summed = len(chosen) * expected.item()
            hint = (
                "the margin has the wrong sign: the loss is -log σ(r_chosen - r_rejected), so a chosen reply that "
                "scores higher gives a smaller loss"
                if math.isclose(got.item(), flipped, rel_tol=1e-4, abs_tol=1e-6)
                else "you summed over the pairs: take the mean"
                if math.isclose(got.item(), summed, rel_tol=1e-4, abs_tol=1e-6)
                else "the loss is the mean over pairs of -log σ(r_chosen - r_rejected)"
            )
            expect(False, f"on {case}: expected {expected.item():.6f}, got {got.item():.6f}. {hint}")
        gradient(got, chosen, case)


@exercise(LAB, "dpo_loss", "the DPO loss")
def _check_dpo_loss(fn) -> None:
    g = torch.Generator().manual_seed(1)
    for case, beta in (("beta = 0.1", 0.1), ("beta = 0.5", 0.5)):
        policy_c, policy_r = -5 + torch.randn(6, generator=g), -5 + torch.randn(6, generator=g)
        reference_c, reference_r = policy_c + torch.randn(6, generator=g), policy_r + torch.randn(6, generator=g)
        policy_c.requires_grad_(True)
        got = call(fn, policy_c, policy_r.clone(), reference_c.clone(), reference_r.clone(), beta, case=case)
        expected = dpo_loss(policy_c, policy_r, reference_c, reference_r, beta)
        expect(torch.is_tensor(got) and got.dim() == 0, f"on {case}: return a scalar tensor, got {got!r}")
        if not math.isclose(got.item(), expected.item(), rel_tol=1e-4, abs_tol=1e-6):
            no_reference = bradley_terry_loss(beta * policy_c, beta * policy_r).item()
            beta_outside = beta * dpo_loss(policy_c, policy_r, reference_c, reference_r, 1.0).item()
            flipped = dpo_loss(policy_r, policy_c, reference_r, reference_c, beta).item()
            hints = {
                no_reference: "the reference model is missing: the implicit reward of a reply is "
                "β (log π(y) - log π_ref(y)), a log-ratio, not the policy's log-probability alone",
                beta_outside: "β multiplies the margin inside the sigmoid, not the loss outside it",
                flipped: "the margin has the wrong sign: chosen minus rejected",
            }
            hint = next(
                (h for v, h in hints.items() if math.isclose(got.item(), v, rel_tol=1e-4, abs_tol=1e-6)),
                "the loss is the mean of -log σ(β [(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))])",
            )
            expect(False, f"on {case}: expected {expected.item():.6f}, got {got.item():.6f}. {hint}")
        grad = gradient(got, policy_c, case)
        expect(bool((grad <= 0).all()), f"on {case}: raising a chosen reply's log-probability must lower the loss")
