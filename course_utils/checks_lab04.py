"""Checks for Lab 04 (pretraining). References: ``F.cross_entropy`` for ``next_token_loss``,
:mod:`course_utils.train` and :mod:`course_utils.model`;
``optimisation_step`` is what ``Trainer.train_step`` does, and ``model_flops_utilisation`` uses
``GPT.flops_per_token`` and the peak table ``train.PEAK_FLOPS``."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import call, exercise, expect
from .model import GPT, GPT2_SMALL_PARAMETERS, GPTConfig
from .train import PEAK_FLOPS, warmup_cosine_lr

LAB = "04"


@exercise(LAB, "next_token_loss", "next-token cross-entropy by hand")
def _check_next_token_loss(fn) -> None:
    g = torch.Generator().manual_seed(4)
    cases = [(2, 5, 1.0), (7, 11, 3.0), (12, 50, 1.0), (6, 9, 1000.0)]  # the last: logits far beyond exp's range
    for length, vocab, scale in cases:
        logits = torch.randn(length, vocab, generator=g, dtype=torch.float64) * scale
        ids = torch.randint(0, vocab, (length,), generator=g)
        case = f"{length} positions over {vocab} tokens, logits of size about {scale:g}"
        got = call(fn, logits.clone(), ids.clone(), case=case)
        expected = F.cross_entropy(logits[:-1], ids[1:]).item()
        expect(
            isinstance(got, torch.Tensor) and got.numel() == 1,
            f"on {case}: return the mean loss as a tensor holding one number, got {type(got).__name__}"
            + (f" of shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else ""),
        )
        value = got.double().item()
        expect(
            math.isfinite(value),
            f"on {case}: your loss is {value}: exp overflows. Subtract each row's maximum m before exponentiating: "
            "log sum exp(z) = m + log sum exp(z - m)",
        )
        expect(
            not math.isclose(value, F.cross_entropy(logits, ids).item(), rel_tol=1e-9),
            f"on {case}: you scored logits[t] against ids[t]. The logits at position t predict the next token: "
            "pair logits[:-1] with ids[1:]",
        )
        expect(
            length == 2 or not math.isclose(value, expected * (length - 1), rel_tol=1e-6),
            f"on {case}: you returned the sum over the {length - 1} predictions; average them",
        )
        expect(
            math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-9),
            f"on {case}: expected {expected:.6f}, got {value:.6f}. The loss is the mean over t of "
            "-log softmax(logits[t])[ids[t + 1]]",
        )


@exercise(LAB, "warmup_cosine_lr", "warm-up and cosine schedule")
def _check_warmup_cosine_lr(fn) -> None:
    settings = dict(max_lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1)
    steps = [0, 4, 9, 10, 35, 60, 100, 109, 110, 150]
    for step in steps:
        case = f"step {step} with max_lr=1, warmup_steps=10, max_steps=110, min_lr=0.1"
        got = call(fn, step, 1.0, 10, 110, 0.1, case=case)
        expected = warmup_cosine_lr(step, **settings)
        expect(
            isinstance(got, (int, float)) and math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9),
            f"on {case}: expected {expected:.6f}, got {got!r}. Warm-up: max_lr*(step+1)/warmup_steps; then min_lr + "
            "(max_lr-min_lr)*(1+cos(pi*progress))/2; min_lr from max_steps on",
        )


def _reference_step(model, optimizer, batches, grad_clip):
    total = 0.0
    for x, y in batches:
        _, loss = model(x, y)
        (loss / len(batches)).backward()
        total += loss.item() / len(batches)
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@exercise(LAB, "optimisation_step", "one step with accumulation and clipping")
def _check_optimisation_step(fn) -> None:
    cases = [(1, 1.0), (3, 1.0), (2, 1e-3)]
    for n_micro, clip in cases:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=40, context_length=8, n_layer=1, n_head=2, n_embd=16))
        g = torch.Generator().manual_seed(n_micro)
        batches = [
            (torch.randint(0, 40, (2, 8), generator=g), torch.randint(0, 40, (2, 8), generator=g))
            for _ in range(n_micro)
        ]
        reference = copy.deepcopy(model)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.1)
        expected_loss = _reference_step(reference, ref_opt, batches, clip)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        case = f"{n_micro} micro-batch{'es' if n_micro > 1 else ''}, grad_clip={clip}"
        got = call(fn, model, optimizer, batches, clip, case=case)
        expect(
            isinstance(got, float) and math.isclose(got, expected_loss, rel_tol=1e-5),
            f"on {case}: return the mean loss of the micro-batches as a float ({expected_loss:.5f}), got {got!r}",
        )
        for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
            expect(
                torch.allclose(a, b, atol=1e-6),
                f"on {case}: parameter {name} differs after the step. Divide each micro-batch loss by their number, "
                "backward each, clip the total gradient norm, step once",
            )
        expect(
            all(p.grad is None or not p.grad.any() for p in model.parameters()),
            f"on {case}: clear the gradients after the step (optimizer.zero_grad())",
        )


@exercise(LAB, "model_flops_utilisation", "FLOPs per token and MFU")
def _check_model_flops_utilisation(fn) -> None:
    gpt2 = GPT2_SMALL_PARAMETERS - 1024 * 768  # without the position table, which no token multiplies by
    cases = [
        (gpt2, 12, 768, 1024, 400_000.0, PEAK_FLOPS["H100"]),
        (4_000_000, 4, 256, 256, 2_000_000.0, PEAK_FLOPS["T4"]),
    ]
    for n_params, n_layer, n_embd, seq_len, tokens_per_second, peak in cases:
        case = (
            f"N={n_params:,}, n_layer={n_layer}, n_embd={n_embd}, T={seq_len}, "
            f"{tokens_per_second:,.0f} tokens/s, peak {peak:.3g} FLOP/s"
        )
        expected = (6 * n_params + 12 * n_layer * n_embd * seq_len) * tokens_per_second / peak
        got = call(fn, n_params, n_layer, n_embd, seq_len, tokens_per_second, peak, case=case)
        expect(
            isinstance(got, (int, float)) and math.isclose(got, expected, rel_tol=1e-6),
            f"on {case}: expected {expected:.4f}, got {got!r}. FLOPs per token = 6N + 12 n_layer n_embd T; MFU = FLOPs "
            "per token x tokens/s / peak",
        )
