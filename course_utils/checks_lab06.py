"""Checks for Lab 06 (supervised fine-tuning). References: :mod:`course_utils.sft`; ``masked_loss`` is
``F.cross_entropy`` with ``ignore_index=IGNORE``, as the training engine computes it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import call, exercise, expect, gradient
from .lab import data_dir
from .sft import IGNORE, chat_tokenizer, render_conversation, shift_labels
from .tokenizer import Tokenizer
from .world import BASE_TOKENIZER

LAB = "06"

_CONVERSATIONS = [
    [{"role": "user", "content": "Where was Ada born?"}, {"role": "assistant", "content": "Ada was born in Tollmere."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
    [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Once upon a time."},
        {"role": "user", "content": "Another, please. <|end|>"},
        {"role": "assistant", "content": "The end."},
    ],
]


def _tokenizer():
    return chat_tokenizer(Tokenizer.load(data_dir() / "artefacts" / BASE_TOKENIZER))


@exercise(LAB, "render_conversation", "render a conversation with its training mask")
def _check_render_conversation(fn) -> None:
    tokenizer = _tokenizer()
    for conversation in _CONVERSATIONS:
        case = f"the {len(conversation)}-turn conversation {conversation!r}"
        got = call(fn, conversation, tokenizer, case=case)
        expected_ids, expected_mask = render_conversation(conversation, tokenizer)
        expect(
            isinstance(got, tuple) and len(got) == 2,
            f"on {case}: return a pair (ids, trained), got {type(got).__name__}",
        )
        ids, trained = got
        expect(
            list(ids) == expected_ids,
            f"on {case}: ids should be {expected_ids}, got {list(ids)}. Start with <|endoftext|>; a user turn is "
            "<|user|> text <|end|> <|assistant|>; an assistant turn is its text then <|end|>; encode text with "
            "encode_ordinary",
        )
        expect(
            [bool(t) for t in trained] == expected_mask,
            f"on {case}: the mask should be {[int(t) for t in expected_mask]}, got {[int(bool(t)) for t in trained]}. "
            "Only the assistant's text and the <|end|> that closes it are trained on",
        )


@exercise(LAB, "shift_labels", "inputs and masked next-token targets")
def _check_shift_labels(fn) -> None:
    cases = [
        ([7, 1, 2, 3, 4], [False, False, False, True, True]),
        ([5, 6], [False, True]),
        ([9, 8, 7, 6], [False, True, False, True]),
    ]
    for ids, trained in cases:
        case = f"ids={ids}, trained={trained}"
        got = call(fn, list(ids), list(trained), case=case)
        expected = shift_labels(ids, trained)
        expect(isinstance(got, tuple) and len(got) == 2, f"on {case}: return a pair (inputs, targets)")
        expect(
            (list(got[0]), list(got[1])) == expected,
            f"on {case}: expected inputs {expected[0]} and targets {expected[1]}, got {list(got[0])} and "
            f"{list(got[1])}. "
            f"targets[i] is ids[i + 1] when that token is trained on, else IGNORE ({IGNORE})",
        )


@exercise(LAB, "masked_loss", "cross-entropy over the assistant's tokens only")
def _check_masked_loss(fn) -> None:
    g = torch.Generator().manual_seed(0)
    for batch, length, vocab, keep in [(2, 5, 11, 0.5), (3, 4, 7, 0.2), (1, 6, 5, 1.0)]:
        logits = torch.randn(batch, length, vocab, generator=g, requires_grad=True)
        targets = torch.randint(vocab, (batch, length), generator=g)
        mask = torch.rand(batch, length, generator=g) < keep
        mask[0, -1] = True  # at least one target
        targets = torch.where(mask, targets, torch.full_like(targets, IGNORE))
        case = f"logits {tuple(logits.shape)} with {int(mask.sum())} of {mask.numel()} targets kept"
        got = call(fn, logits, targets, case=case)
        expected = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE)
        expect(torch.is_tensor(got) and got.dim() == 0, f"on {case}: return a scalar tensor, got {got!r}")
        expect(
            math.isclose(got.item(), expected.item(), rel_tol=1e-5),
            f"on {case}: expected {expected.item():.5f} (the mean over kept positions only), got {got.item():.5f}",
        )
        grad = gradient(got, logits, case)
        expect(torch.all(grad[~mask] == 0), f"on {case}: ignored positions must get zero gradient")
