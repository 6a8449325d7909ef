"""Checks for Lab 02 (attention). Reference answers come from :mod:`course_utils.model`: ``attention`` is
its ``naive_attention`` (named so there to set it apart from PyTorch's fused kernels) and
``multi_head_attention`` and ``grouped_query_attention`` what its ``CausalSelfAttention`` module does with
explicit weight matrices."""

from __future__ import annotations

import torch

from .checks import CheckFailed, call, exercise, expect, expect_close, expect_equal
from .model import CausalSelfAttention, GPTConfig, apply_rope, causal_mask, naive_attention, rope_angles

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


def reference_grouped_query(x, w_qkv, w_out, n_head: int, n_kv_head: int) -> torch.Tensor:
    """The package's attention layer with these weights and zero biases."""
    layer = CausalSelfAttention(GPTConfig(n_embd=x.size(-1), n_head=n_head, n_kv_head=n_kv_head)).eval()
    with torch.no_grad():
        layer.c_attn.weight.copy_(w_qkv.T)
        layer.c_proj.weight.copy_(w_out.T)
        layer.c_attn.bias.zero_()
        layer.c_proj.bias.zero_()
        return layer(x)


def _tiled_groups(x, w_qkv, w_out, n_head: int, n_kv_head: int) -> torch.Tensor:
    """The likeliest mistake: query head i reads key-value head i % n_kv_head."""
    B, T, C = x.shape
    hs = C // n_head
    q, k, v = (x @ w_qkv).split([C, n_kv_head * hs, n_kv_head * hs], dim=-1)
    q = q.view(B, T, n_head, hs).transpose(1, 2)
    k, v = (t.view(B, T, n_kv_head, hs).transpose(1, 2).repeat(1, n_head // n_kv_head, 1, 1) for t in (k, v))
    return (naive_attention(q, k, v, causal_mask(T)).transpose(1, 2).reshape(B, T, C)) @ w_out


@exercise(LAB, "grouped_query_attention", "grouped-query attention")
def _check_grouped_query_attention(fn) -> None:
    g = torch.Generator().manual_seed(2)
    cases = [(2, 5, 8, 2, 2), (1, 6, 16, 4, 2), (2, 7, 24, 6, 3), (1, 4, 16, 4, 1)]
    for B, T, C, n_head, n_kv_head in cases:
        hs = C // n_head
        x = torch.randn(B, T, C, generator=g)
        w_qkv = torch.randn(C, C + 2 * n_kv_head * hs, generator=g) / C**0.5
        w_out = torch.randn(C, C, generator=g) / C**0.5
        case = f"x of shape ({B}, {T}, {C}) with n_head={n_head}, n_kv_head={n_kv_head}"
        try:
            got = call(fn, x, w_qkv, w_out, n_head, n_kv_head, case=case)
        except CheckFailed as e:
            if n_kv_head == n_head:
                raise
            raise CheckFailed(
                f"{e}. w_qkv has C + 2 * n_kv_head * hs columns: split them into C for the queries and "
                "n_kv_head * hs each for the keys and the values"
            ) from None
        if 1 < n_kv_head < n_head and isinstance(got, torch.Tensor) and got.shape == x.shape:
            expect(
                not torch.allclose(got, _tiled_groups(x, w_qkv, w_out, n_head, n_kv_head), atol=1e-5),
                f"on {case}: query head i read key-value head i % n_kv_head. The query heads of a group are "
                "neighbours: heads 0 .. g-1 share key-value head 0, the next g head 1 (repeat_interleave, not repeat)",
            )
        expect_close(
            got,
            reference_grouped_query(x, w_qkv, w_out, n_head, n_kv_head),
            case,
            "Queries as in multi-head attention; keys and values with n_kv_head heads, each repeated for the "
            "n_head // n_kv_head query heads of its group; attention is causal",
        )


def reference_rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """The package's rotation: its angles for positions 0 .. max, taken at ``positions``."""
    cos, sin = rope_angles(x.size(-1), int(positions.max()) + 1, base)
    return apply_rope(x, cos[positions], sin[positions])


@exercise(LAB, "rotate", "rotary position embeddings")
def _check_rotate(fn) -> None:
    g = torch.Generator().manual_seed(3)
    cases = [
        ("one vector of size 4 at position 1", (1, 4), [1], 10000.0),
        ("3 positions of size 8, base 100", (3, 8), [0, 5, 2], 100.0),
        ("(2 batches, 3 heads, 5 positions, 16)", (2, 3, 5, 16), [0, 1, 2, 3, 4], 10000.0),
        ("positions far apart", (4, 32), [7, 300, 1000, 4095], 10000.0),
    ]
    for case, shape, positions, base in cases:
        x = torch.randn(*shape, generator=g)
        positions = torch.tensor(positions)
        got = call(fn, x.clone(), positions.clone(), base, case=case)
        expected = reference_rotate(x, positions, base)
        if isinstance(got, torch.Tensor) and got.shape == x.shape:
            hs = x.size(-1)
            adjacent = reference_rotate(x[..., _halves_order(hs)], positions, base)[..., _halves_order(hs).argsort()]
            expect(
                not torch.allclose(got, adjacent, atol=1e-4) or torch.allclose(got, expected, atol=1e-4),
                f"on {case}: you paired neighbouring dimensions (x[2i], x[2i+1]). Pair dimension i with i + hs/2, "
                "the two halves of the head",
            )
        expect_close(
            got,
            expected,
            case,
            "Pair i is (x[i], x[i + hs/2]), turned by the angle position * base^(-2i/hs): x_i cos - x_(i+hs/2) sin, "
            "x_i sin + x_(i+hs/2) cos",
            atol=1e-4,
        )


def _halves_order(hs: int) -> torch.Tensor:
    """Dimensions reordered so that neighbouring pairs (2i, 2i+1) become halves (i, i + hs/2)."""
    return torch.cat([torch.arange(0, hs, 2), torch.arange(1, hs, 2)])
