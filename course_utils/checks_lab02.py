"""Checks for Lab 02 (attention). Reference answers come from :mod:`course_utils.model`: ``attention`` is
its ``naive_attention`` (named so there to set it apart from PyTorch's fused kernels) and
``multi_head_attention`` what its ``CausalSelfAttention`` module does with explicit weight matrices."""

from __future__ import annotations

import torch

from .checks import call, exercise, expect, expect_close, expect_equal
from .model import causal_mask, naive_attention

LAB = "02"


@exercise(LAB, "attention", "scaled dot-product attention with a mask")
def _check_attention(fn) -> None:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    random_mask = torch.rand(5, 7, generator=g) > 0.5
    random_mask[:, 0] = True  # every query sees at least one key
    cases = [
        ("one query over 4 keys, d=3 (2-D tensors)", (r(1, 3), r(4, 3), r(4, 3)), None),
        ("a batch (2, 3 heads, 6 tokens, d=8), no mask", (r(2, 3, 6, 8), r(2, 3, 6, 8), r(2, 3, 6, 8)), None),
        ("6 tokens with the causal mask", (r(2, 6, 8), r(2, 6, 8), r(2, 6, 8)), causal_mask(6)),
        ("5 queries, 7 keys, values of width 2, an arbitrary boolean mask", (r(5, 4), r(7, 4), r(7, 2)), random_mask),
        ("scores around 1000 (needs a stable softmax)", (r(3, 4) * 40, r(5, 4) * 40, r(5, 4)), None),
    ]
    for case, (q, k, v), mask in cases:
        got = call(fn, q.clone(), k.clone(), v.clone(), mask, case=case)
        expect_close(
            got,
            naive_attention(q, k, v, mask),
            case,
            "Divide the scores by sqrt(d), mask with -inf where mask is False, and softmax over the keys (last "
            "dimension)",
        )


@exercise(LAB, "causal_mask", "the causal mask")
def _check_causal_mask(fn) -> None:
    for t in (1, 2, 5):
        case = f"causal_mask({t})"
        got = call(fn, t, case=case)
        expect(
            isinstance(got, torch.Tensor) and got.dtype == torch.bool,
            f"on {case}: return a torch.bool tensor, got {getattr(got, 'dtype', type(got).__name__)}",
        )
        expect_equal(
            got.tolist(),
            causal_mask(t).tolist(),
            case,
            "position i may attend to positions 0..i: True on and below the diagonal",
        )


def reference_multi_head(x: torch.Tensor, w_qkv: torch.Tensor, w_out: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = x.shape
    q, k, v = (x @ w_qkv).split(C, dim=-1)
    heads = [t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v)]  # (B, nh, T, hs)
    y = naive_attention(*heads, causal_mask(T))
    return y.transpose(1, 2).reshape(B, T, C) @ w_out


@exercise(LAB, "multi_head_attention", "causal multi-head attention by reshaping")
def _check_multi_head_attention(fn) -> None:
    g = torch.Generator().manual_seed(1)
    cases = [(1, 1, 4, 1), (2, 5, 8, 2), (3, 7, 12, 4), (1, 6, 16, 16)]
    for B, T, C, n_head in cases:
        x = torch.randn(B, T, C, generator=g)
        w_qkv = torch.randn(C, 3 * C, generator=g) / C**0.5
        w_out = torch.randn(C, C, generator=g) / C**0.5
        case = f"x of shape ({B}, {T}, {C}) with n_head={n_head}"
        got = call(fn, x, w_qkv, w_out, n_head, case=case)
        expect_close(
            got,
            reference_multi_head(x, w_qkv, w_out, n_head),
            case,
            "Split q, k, v as [q | k | v] columns, each head takes C // n_head consecutive columns, attention is "
            "causal",
        )
