"""Checks for Lab 03 (the transformer block, sampling, KV cache). References: :mod:`course_utils.model`,
where ``greedy_next`` and ``temperature_probs`` are parts of ``sample_next``, ``generate_cached`` is
``generate`` with its cache, and ``layer_norm`` and ``gelu_tanh`` are PyTorch's own (``F.layer_norm``,
``F.gelu(approximate="tanh")``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import call, exercise, expect, expect_close, expect_equal
from .model import GPT, GPTConfig, generate, top_k_filter, top_p_filter

LAB = "03"


@exercise(LAB, "layer_norm", "layer normalisation")
def _check_layer_norm(fn) -> None:
    g = torch.Generator().manual_seed(0)
    cases = [((2, 5, 8), 1e-5), ((3, 16), 1e-5), ((1, 1, 4), 1e-2)]
    for shape, eps in cases:
        x = torch.randn(*shape, generator=g) * 3 + 1
        w, b = torch.randn(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
        case = f"x of shape {shape}, eps={eps}"
        expected = F.layer_norm(x, (shape[-1],), w, b, eps)
        expect_close(
            call(fn, x.clone(), w, b, eps, case=case),
            expected,
            case,
            "normalise over the last dimension with the biased variance (mean of squares), then scale and shift",
            atol=1e-4,
        )
    x = torch.full((2, 6), 5.0)  # constant rows: variance 0, eps keeps it finite
    case = "constant rows (zero variance)"
    expect_close(
        call(fn, x, torch.ones(6), torch.zeros(6), 1e-5, case=case),
        torch.zeros(2, 6),
        case,
        "add eps to the variance before the square root",
    )


@exercise(LAB, "gelu_tanh", "GELU, tanh approximation")
def _check_gelu_tanh(fn) -> None:
    cases = {
        "x from -6 to 6": torch.linspace(-6, 6, 101),
        "a (3, 4) tensor": torch.randn(3, 4, generator=torch.Generator().manual_seed(2)),
    }
    for case, x in cases.items():
        expect_close(
            call(fn, x.clone(), case=case),
            F.gelu(x, approximate="tanh"),
            case,
            "0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))",
        )


_LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])


@exercise(LAB, "greedy_next", "greedy decoding")
def _check_greedy_next(fn) -> None:
    got = call(fn, _LOGITS.clone(), case="two rows of logits")
    expect(
        isinstance(got, torch.Tensor), f"on two rows of logits: return a tensor of token ids, got {type(got).__name__}"
    )
    expect_equal(got.tolist(), [4, 5], "two rows of logits", "one id per row: the position of the largest logit")


@exercise(LAB, "temperature_probs", "temperature")
def _check_temperature_probs(fn) -> None:
    for t in (1.0, 0.5, 2.0):
        case = f"temperature={t}"
        expect_close(
            call(fn, _LOGITS.clone(), t, case=case),
            torch.softmax(_LOGITS / t, dim=-1),
            case,
            "divide the logits by the temperature, then softmax over the last dimension",
        )


def _expect_same_filter(got, expected: torch.Tensor, case: str, hint: str) -> None:
    expect(isinstance(got, torch.Tensor), f"on {case}: return a tensor of logits, got {type(got).__name__}")
    expect_equal(
        torch.isinf(got).tolist(), torch.isinf(expected).tolist(), case + " (which tokens are removed, as True)", hint
    )
    keep = ~torch.isinf(expected)
    expect(torch.equal(got[keep], expected[keep]), f"on {case}: the tokens you keep must keep their logits unchanged")


@exercise(LAB, "top_k_filter", "top-k filtering")
def _check_top_k_filter(fn) -> None:
    for k in (1, 2, 6):
        case = f"top_k_filter(logits, k={k})"
        _expect_same_filter(
            call(fn, _LOGITS.clone(), k, case=case),
            top_k_filter(_LOGITS, k),
            case,
            "keep the k largest logits of each row, set the rest to -inf",
        )


@exercise(LAB, "top_p_filter", "top-p (nucleus) filtering")
def _check_top_p_filter(fn) -> None:
    cases = [0.0, 0.5, 0.9, 1.0]
    for p in cases:
        case = f"top_p_filter(logits, p={p})"
        _expect_same_filter(
            call(fn, _LOGITS.clone(), p, case=case),
            top_p_filter(_LOGITS, p),
            case,
            "keep the smallest set of most likely tokens whose total probability reaches p (at least one token)",
        )


class _Recorder(nn.Module):
    """Wraps a model and records how it was called."""

    def __init__(self, model: GPT):
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, []

    def forward(self, idx, targets=None, cache=None):
        self.calls.append((idx.size(1), cache is not None))
        return self.inner(idx, targets, cache=cache)


@exercise(LAB, "generate_cached", "greedy generation with a KV cache")
def _check_generate_cached(fn) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=32, n_layer=2, n_head=2, n_embd=32)).eval()
    for prompt_len, new in ((1, 5), (4, 10)):
        prompt = torch.randint(0, 50, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        case = f"a prompt of {prompt_len} tokens (batch of 2), {new} new tokens"
        recorder = _Recorder(model)
        with torch.no_grad():
            got = call(fn, recorder, prompt.clone(), new, case=case)
        expected = generate(model, prompt, new, temperature=0, use_cache=False)
        expect(
            isinstance(got, torch.Tensor), f"on {case}: return the (B, T + new) tensor of ids, got {type(got).__name__}"
        )
        expect_equal(
            got.tolist(),
            expected.tolist(),
            case,
            "greedy: always take the most likely next token; return the prompt followed by the new tokens",
        )
        expect(
            bool(recorder.calls) and all(cached for _, cached in recorder.calls),
            f"on {case}: pass the KVCache to every model call (model(idx, cache=cache))",
        )
        expect(
            recorder.calls[0][0] == prompt_len,
            f"on {case}: the first call should read the whole prompt ({prompt_len} tokens), it read "
            f"{recorder.calls[0][0]}",
        )
        expect(
            all(t == 1 for t, _ in recorder.calls[1:]),
            f"on {case}: after the prompt, feed only the newest token; the calls read {[t for t, _ in recorder.calls]} "
            "tokens",
        )
