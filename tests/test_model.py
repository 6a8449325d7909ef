import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import course_utils.model as gpt
from course_utils import measure


def small(**overrides) -> gpt.GPTConfig:
    return gpt.GPTConfig(
        **{"vocab_size": 61, "context_length": 32, "n_layer": 2, "n_head": 4, "n_embd": 32, **overrides}
    )


def test_gpt2_small_has_the_published_parameter_count():
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig.gpt2_small())
    assert model.num_parameters() == gpt.GPT2_SMALL_PARAMETERS == 124_439_808  # the published count
    c = model.config
    assert model.num_parameters(non_embedding=True) == c.n_layer * (12 * c.n_embd**2 + 13 * c.n_embd) + 2 * c.n_embd
    assert model.flops_per_token(1024) == 6 * (gpt.GPT2_SMALL_PARAMETERS - 1024 * 768) + 12 * 12 * 768 * 1024


def test_padded_vocabulary_is_cut_from_the_logits():
    model = gpt.GPT(small())
    assert model.wte.weight.shape[0] == 64
    logits, loss = model(torch.randint(0, 61, (2, 5)), torch.randint(0, 61, (2, 5)))
    assert logits.shape == (2, 5, 61)
    assert math.isclose(loss.item(), math.log(61), rel_tol=0.05)  # untrained: close to uniform


@pytest.mark.parametrize("shape", [(1, 1, 5, 8), (2, 3, 17, 16), (4, 40, 32)])
def test_naive_attention_matches_sdpa_causal_and_with_a_boolean_mask(shape):
    g = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    T = shape[-2]
    causal = gpt.naive_attention(q, k, v, gpt.causal_mask(T))
    assert torch.allclose(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    mask = torch.rand(T, T, generator=g) > 0.5
    mask[:, 0] = True
    arbitrary = gpt.naive_attention(q, k, v, mask)
    assert torch.allclose(arbitrary, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5)
    assert torch.allclose(gpt.naive_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_greedy_generation_is_the_same_with_and_without_the_cache():
    torch.manual_seed(0)
    model = gpt.GPT(small())
    prompt = torch.randint(0, 61, (3, 4))
    cached = gpt.generate(model, prompt, 25, temperature=0, use_cache=True)
    uncached = gpt.generate(model, prompt, 25, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (3, 29)


def test_cache_continues_a_prompt_fed_in_chunks():
    torch.manual_seed(1)
    model = gpt.GPT(small()).eval()
    ids = torch.randint(0, 61, (2, 12))
    full, _ = model(ids)
    cache = gpt.KVCache(model.config, 2, 12)
    first, _ = model(ids[:, :5], cache=cache)
    second, _ = model(ids[:, 5:], cache=cache)
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5)


def test_limits_of_sampling_reduce_to_greedy():
    torch.manual_seed(2)
    model = gpt.GPT(small())
    prompt = torch.randint(0, 61, (2, 3))
    greedy = gpt.generate(model, prompt, 20, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(gpt.generate(model, prompt, 20, temperature=1e-6, generator=g), greedy)
    assert torch.equal(gpt.generate(model, prompt, 20, top_k=1, generator=g), greedy)
    assert torch.equal(gpt.generate(model, prompt, 20, top_p=0.0, generator=g), greedy)
    assert torch.equal(gpt.generate(model, prompt, 20, top_p=1e-9, generator=g), greedy)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.floats(0.0, 1.0), vocab=st.integers(1, 30))
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(seed, p, vocab):
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3
    kept = torch.isfinite(gpt.top_p_filter(logits, p))
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    n = int(kept.sum())
    assert n >= 1 and kept[order[:n]].all()  # the kept tokens are the n most likely
    mass = probs[order[:n]].sum().item()
    assert mass >= p - 1e-6 or n == vocab  # the set reaches p
    assert n == 1 or probs[order[: n - 1]].sum().item() < p + 1e-6  # and one fewer would not


def test_top_k_keeps_exactly_k():
    logits = torch.randn(4, 50)
    for k in (1, 7, 50, 80):
        kept = torch.isfinite(gpt.top_k_filter(logits, k)).sum(-1)
        assert (kept == min(k, 50)).all()


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: gpt.GPTConfig(n_embd=100, n_head=3), "n_head=3 must divide n_embd=100"),
        (lambda: gpt.GPTConfig(n_layer=0), "n_layer"),
        (lambda: gpt.GPT(small())(torch.zeros(1, 33, dtype=torch.long)), "context_length=32"),
        (lambda: gpt.GPT(small())(torch.zeros(1, 0, dtype=torch.long)), "empty"),
        (lambda: gpt.generate(gpt.GPT(small()), torch.zeros(1, 0, dtype=torch.long), 3), "prompt is empty"),
        (lambda: gpt.generate(gpt.GPT(small()), torch.zeros(1, 30, dtype=torch.long), 5), "exceeds context_length"),
        (lambda: gpt.top_p_filter(torch.zeros(3), 1.5), "top_p"),
        (lambda: gpt.top_k_filter(torch.zeros(3), 0), "top_k"),
    ],
)
def test_bad_input_is_a_clear_error(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_sliding_window_generation_beyond_the_context():
    model = gpt.GPT(small())
    out = gpt.generate(model, torch.zeros(1, 30, dtype=torch.long), 10, temperature=0, use_cache=False)
    assert out.shape == (1, 40)


def test_gpt2_weights_convert_with_identical_logits():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(
        vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = gpt.GPT.from_gpt2_state_dict(hf.state_dict(), small()).eval()
    ids = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids)[0], atol=1e-5)
    with pytest.raises(ValueError, match="check the config"):
        gpt.GPT.from_gpt2_state_dict(hf.state_dict(), small(n_embd=64))


def test_kv_cache_memory_formula_and_size():
    assert gpt.kv_cache_bytes_per_token(32, 32, 128) == 512 * 1024  # Llama 2 7B, 16-bit
    assert gpt.kv_cache_bytes_per_token(32, 8, 128) == 128 * 1024  # grouped-query: a quarter
    cache = gpt.KVCache(small(), batch_size=2, max_len=10)
    assert cache.nbytes() == 2 * gpt.kv_cache_bytes_per_token(2, 4, 8, bytes_per_value=4) * 10
    with pytest.raises(ValueError, match="exceeds context_length"):
        gpt.KVCache(small(), 1, 64)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_grouped_query_attention_shares_keys_and_shrinks_the_cache(n_kv_head):
    torch.manual_seed(3)
    config = small(n_kv_head=n_kv_head, position="rope", smear_keys=True)
    model = gpt.GPT(config).eval()
    head_dim = config.n_embd // config.n_head
    cache = gpt.KVCache(config, batch_size=3, max_len=20)
    assert cache.nbytes() == 3 * 20 * gpt.kv_cache_bytes_per_token(2, n_kv_head, head_dim, bytes_per_value=4)
    mha = gpt.GPT(small(position="rope", smear_keys=True)).num_parameters()
    # per layer and head dropped: the k and v weights and biases, and the head's smearing weight
    assert mha - model.num_parameters() == 2 * (4 - n_kv_head) * (2 * head_dim * (32 + 1) + 1)
    prompt = torch.randint(0, 61, (3, 6))
    assert torch.equal(
        gpt.generate(model, prompt, 12, temperature=0), gpt.generate(model, prompt, 12, temperature=0, use_cache=False)
    )
    ids = torch.randint(0, 61, (2, 9))
    naive = gpt.GPT(small(n_kv_head=n_kv_head, attention="naive")).eval()
    fused = gpt.GPT(small(n_kv_head=n_kv_head)).eval()
    fused.load_state_dict(naive.state_dict())
    assert torch.allclose(naive(ids)[0], fused(ids)[0], atol=1e-5)
    assert model.attention_maps(ids).shape == (2, 2, 4, 9, 9)


def test_a_query_head_reads_the_keys_of_its_group():
    config = small(n_kv_head=2)
    attention = gpt.GPT(config).h[0].attn
    k = torch.arange(2.0).view(1, 2, 1, 1).expand(1, 2, 3, 8)  # shared head j holds the value j
    assert attention.share(k)[0, :, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # query heads 0, 1 -> 0; 2, 3 -> 1
    for bad in (3, 0, 8):
        with pytest.raises(ValueError, match="n_kv_head"):
            small(n_kv_head=bad)


@pytest.mark.skipif(measure._rss_bytes() is None, reason="resident memory is read from /proc on Linux")
def test_peak_memory_sees_a_large_temporary():
    size = 64 * 2**20
    peak = measure.peak_memory(lambda: torch.ones(size // 4).sum())
    assert size * 0.9 < peak < size * 1.5
    assert measure.timed(lambda: torch.ones(10).sum(), repeats=2) > 0
