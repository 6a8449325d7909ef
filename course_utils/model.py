"""A GPT-2 style transformer: the finished version of Labs 02 and 03.

One config, one small class per idea (attention, MLP, block, model), generation with a KV cache and
the usual samplers, and parameter and FLOP counting. Shapes are noted where they change:
B batch, T sequence length, C width (``n_embd``), nh heads, hs head size (C // nh), V vocabulary.

Radford et al. 2019 (GPT-2); Vaswani et al. 2017 (attention); Shazeer 2019 (multi-query attention);
Ainslie et al. 2023 (grouped-query attention); Holtzman et al. 2020 (nucleus sampling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Parameters of OpenAI's GPT-2 small (:meth:`GPTConfig.gpt2_small`), the tied output layer counted once.
GPT2_SMALL_PARAMETERS = 124_439_808


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    context_length: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    # Heads of keys and values, each shared by n_head // n_kv_head query heads: n_head is multi-head
    # attention, 1 is multi-query (Shazeer 2019), in between grouped-query (Ainslie et al. 2023); the KV
    # cache shrinks by n_head / n_kv_head. None: as many as n_head.
    n_kv_head: int | None = None
    dropout: float = 0.0
    bias: bool = True
    # The embedding and output layer get rows up to a multiple of this, so their matrix multiplies
    # use tensor-core friendly sizes; the extra rows are never a target and are cut from the logits.
    pad_vocab_to: int = 64
    # "sdpa": PyTorch's fused kernels; "naive": the written-out softmax(QK^T/sqrt(d))V of Lab 02,
    # kept for the speed ladder of Lab 04 (no dropout, no KV cache)
    attention: str = "sdpa"
    # "learned": a table of position vectors added to the token embeddings (GPT-2); "rope": queries and
    # keys rotated by an angle proportional to their position, so scores depend on the offset (Su et al.)
    position: str = "learned"
    rope_base: float = 10000.0
    # Smeared keys (Olsson et al. 2022): each head's key is a learned mix of the key of its own token
    # and of the token before, so one layer can match "the token after an earlier copy of mine"
    smear_keys: bool = False
    # A short causal convolution (Allen-Zhu 2025's "Canon layers"): before attention, each position
    # adds a learned per-channel mix of itself and the conv_width - 1 positions before it, so a key or
    # query can carry the last few tokens, not just its own (0: off)
    conv_width: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd", "pad_vocab_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_head={self.n_head} must divide n_embd={self.n_embd} (each head gets n_embd // n_head "
                "dimensions)"
            )
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig.n_kv_head={self.n_kv_head!r} must be a positive divisor of n_head={self.n_head} "
                "(each key/value head serves the same number of query heads)"
            )
        if self.position not in ("learned", "rope"):
            raise ValueError(f"GPTConfig.position must be 'learned' or 'rope', got {self.position!r}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"rotary positions rotate pairs of dimensions: the head size {self.n_embd // self.n_head} must be even"
            )
        if not isinstance(self.conv_width, int) or self.conv_width < 0 or self.conv_width == 1:
            raise ValueError(f"GPTConfig.conv_width must be 0 (off) or at least 2, got {self.conv_width!r}")
        if self.attention not in ("sdpa", "naive"):
            raise ValueError(f"GPTConfig.attention must be 'sdpa' or 'naive', got {self.attention!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to

    @classmethod
    def gpt2_small(cls) -> GPTConfig:
        """OpenAI's GPT-2 small (124M), unpadded so that its parameter count is the published one."""
        return cls(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, n_embd=768, pad_vocab_to=1)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out. q: (..., Tq, d), k: (..., Tk, d), v: (..., Tk, dv);
    ``mask`` (broadcastable to (..., Tq, Tk)) is True where a query may attend. Returns (..., Tq, dv).

    Materialises the (Tq, Tk) score matrix, which is what ``F.scaled_dot_product_attention``'s fused
    kernels avoid. Softmax subtracts each row's maximum first (``torch.softmax`` does), so large
    scores do not overflow.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def rope_angles(head_dim: int, length: int, base: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (length, head_dim // 2): position p turns dimension pair
    i by p * base^(-2i / head_dim), fast-turning pairs for short offsets, slow ones for long."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (length, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of ``x`` (..., T, hs) by its angle; cos, sin: (T, hs/2).
    A query at position m and a key at position n then score q·R(n - m)k: only the offset counts."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def causal_mask(t: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(t, t) boolean, True on and below the diagonal: position i sees positions 0..i."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


class KVCache:
    """Keys and values of every layer for the tokens seen so far: (B, nh, max_len, hs) each.

    Generation feeds the prompt once, then one token at a time; each new token's attention reads
    the cached keys and values instead of recomputing them for the whole prefix.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, max_len: int | None = None, device=None, dtype=torch.float32
    ):
        self.max_len = max_len or config.context_length
        if self.max_len > config.context_length:
            raise ValueError(f"KVCache max_len={self.max_len} exceeds context_length={config.context_length}")
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, self.max_len, hs)  # only the shared heads
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # smeared keys need the raw key of the last token seen, per layer: (n_layer, B, nh, 1, hs)
        self.last_key = torch.zeros((*shape[:3], 1, hs), device=device, dtype=dtype) if config.smear_keys else None
        # the short convolution needs the last conv_width - 1 inputs of every layer: (n_layer, B, w - 1, C)
        w = config.conv_width
        self.conv_inputs = (
            torch.zeros((config.n_layer, batch_size, w - 1, config.n_embd), device=device, dtype=dtype) if w else None
        )
        self.pos = 0  # tokens stored so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.size(2)
        if start + t > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} tokens; {start + t} were asked for (generate fewer tokens)"
            )
        self.k[layer, :, :, start : start + t] = k
        self.v[layer, :, :, start : start + t] = v
        return self.k[layer, :, :, : start + t], self.v[layer, :, :, : start + t]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        kv_width = config.n_kv_head * (config.n_embd // config.n_head)
        # q for every head, k and v for the shared heads, in one matrix multiply
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.naive = config.attention == "naive"
        self.resid_dropout = nn.Dropout(config.dropout)
        # per head, the share of a key that is its own token's: sigmoid(0) = one half to start with
        self.smear = nn.Parameter(torch.zeros(config.n_kv_head)) if config.smear_keys else None

    def qkv(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, start: int = 0, rope=None):
        """Queries, keys and values of every head, (B, nh, T, hs) each, keys smeared and positions
        rotated where the model does so."""
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split([C, self.n_kv_head * hs, self.n_kv_head * hs], dim=2)
        # (B, T, heads * hs) -> (B, heads, T, hs): heads become a batch dimension
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, hs).transpose(1, 2) for t in (k, v))
        if self.smear is not None:
            k = self.smear_keys(k, cache, layer, start)
        if rope is not None:  # rotary positions: (cos, sin) of positions start .. start + T - 1
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # the cache keeps keys already rotated
        return q, k, v

    def attention_weights(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs)) under the causal mask, for looking at: (B, nh, T, T)."""
        q, k, _ = self.qkv(x, rope=rope)
        k = self.share(k)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        return torch.softmax(scores.masked_fill(~causal_mask(x.size(1), device=x.device), float("-inf")), dim=-1)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, start: int = 0, rope=None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x, cache, layer, start, rope)
        dropout = self.dropout if self.training else 0.0
        if self.naive and cache is None:
            y = naive_attention(q, self.share(k), self.share(v), causal_mask(T, device=x.device))
        elif cache is None or start == 0:
            if cache is not None:
                cache.update(layer, k, v, 0)
            y = F.scaled_dot_product_attention(q, self.share(k), self.share(v), is_causal=True, dropout_p=dropout)
        else:
            k, v = cache.update(layer, k, v, start)  # (B, n_kv_head, start + T, hs)
            # query i (absolute position start + i) sees keys 0 .. start + i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, self.share(k), self.share(v), attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """(B, n_kv_head, T, hs) keys or values -> (B, n_head, T, hs): each shared head repeated for the
        query heads of its group (heads 0..g-1 read shared head 0, and so on)."""
        groups = self.n_head // self.n_kv_head
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    def smear_keys(self, k: torch.Tensor, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        """k (B, nh, T, hs) -> each key mixed with the key of the token before it (the first token of
        a sequence keeps its own; with a cache, the token before is the last one cached)."""
        before = cache.last_key[layer] if cache is not None and start > 0 else k[:, :, :1]
        previous = torch.cat([before.to(k.dtype), k[:, :, :-1]], dim=2)
        if cache is not None:
            cache.last_key[layer] = k[:, :, -1:]
        mix = torch.sigmoid(self.smear).view(1, -1, 1, 1).to(k.dtype)
        return mix * k + (1 - mix) * previous


class ShortConv(nn.Module):
    """x + a causal depthwise convolution of x over the last ``width`` positions (a Canon layer):
    y_t = x_t + sum_j w_j * x_{t-j}, one weight per channel and offset, zero before the sequence."""

    def __init__(self, n_embd: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.zeros(n_embd, width))  # [:, j]: offset j; zero: starts as identity

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, start: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        w = self.width
        if cache is not None and start > 0:
            before = cache.conv_inputs[layer].to(x.dtype)
        else:
            before = x.new_zeros(B, w - 1, C)
        padded = torch.cat([before, x], dim=1)  # (B, w - 1 + T, C)
        if cache is not None:
            cache.conv_inputs[layer] = padded[:, -(w - 1) :]
        weight = self.weight.to(x.dtype)
        mixed = sum(padded[:, w - 1 - j : w - 1 - j + T] * weight[:, j] for j in range(w))
        return x + mixed


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.conv = ShortConv(config.n_embd, config.conv_width) if config.conv_width else None
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, start: int = 0, rope=None
    ) -> torch.Tensor:
        x = x + self.attn(self.attention_input(x, cache, layer, start), cache, layer, start, rope)
        return x + self.mlp(self.ln_2(x))

    def attention_input(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        """What attention reads: the normalised residual stream, convolved where the model does so."""
        h = self.ln_1(x)
        return self.conv(h, cache, layer, start) if self.conv is not None else h


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        if config.position == "learned":
            self.wpe = nn.Embedding(config.context_length, config.n_embd)
        else:  # rotary: fixed angles, recomputed on load rather than stored
            cos, sin = rope_angles(config.n_embd // config.n_head, config.context_length, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix embeds tokens and scores them
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by 1/sqrt(2 n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns the final hidden states (B, T, C), after the last LayerNorm:
        what the output layer scores, and what Lab 08 pools into text embeddings. With ``cache`` the
        tokens continue the cached ones (positions start there)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx is empty: give the model at least one token")
        start = cache.pos if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's "
                f"context_length={self.config.context_length}; "
                "crop the input to the last context_length tokens"
            )
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.config.position == "learned":
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.drop(x)
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer, start, rope)
        if cache is not None:
            cache.pos = start + T
        return self.ln_f(x)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """Every head's attention weights for ids ``idx`` (B, T): (n_layer, B, nh, T, T)."""
        if idx.size(1) > self.config.context_length:
            raise ValueError(f"{idx.size(1)} tokens do not fit the context of {self.config.context_length}")
        T = idx.size(1)
        x = self.wte(idx)
        rope = None
        if self.config.position == "learned":
            x = x + self.wpe(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        maps = []
        for block in self.h:
            maps.append(block.attn.attention_weights(block.attention_input(x), rope))
            x = block(x, rope=rope)
        return torch.stack(maps)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, vocab_size) and, with targets (B, T), the mean
        cross-entropy loss. With ``cache`` the tokens continue the cached ones (positions start there)."""
        logits = self.lm_head(self.hidden_states(idx, cache))[
            ..., : self.config.vocab_size
        ]  # (B, T, V): padding cut off
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # -- counting --------------------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters, the tied output layer counted once; ``non_embedding`` leaves out the token and
        position embeddings (the count Kaplan et al. 2020 use)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.position_parameters()
        return n

    def position_parameters(self) -> int:
        """Parameters of the learned position table (0 with rotary positions): no token multiplies by them."""
        return self.wpe.weight.numel() if self.config.position == "learned" else 0

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per parameter (forward 2, backward 4) that a token passes
        through, which includes the output layer but not the position table, plus attention's
        score and mixing products, 12 * n_layer * n_embd * T (over the whole context, as PaLM's
        appendix B and nanoGPT count it)."""
        cfg = self.config
        t = seq_len or cfg.context_length
        return 6 * (self.num_parameters() - self.position_parameters()) + 12 * cfg.n_layer * cfg.n_embd * t

    # -- GPT-2 weights -------------------------------------------------------------------------
    @classmethod
    def from_gpt2_state_dict(cls, state: dict[str, torch.Tensor], config: GPTConfig) -> GPT:
        """Build a model from a Hugging Face ``GPT2LMHeadModel`` state dict (keys ``transformer.*``).

        GPT-2 stores its linear layers as ``Conv1D`` with weights (in, out); ours are (out, in).
        """
        model = cls(config)
        ours = model.state_dict()
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for key, value in state.items():
            if not key.startswith("transformer.") or key.endswith(("attn.bias", "attn.masked_bias")):
                continue
            name = key.removeprefix("transformer.")
            if name not in ours:
                raise KeyError(f"GPT-2 weight {key} has no place in this model")
            if name.endswith(transposed):
                value = value.t()
            target = ours[name].shape
            if name == "wte.weight" and value.shape[1:] == target[1:] and value.shape[0] < target[0]:
                padded = ours[name].clone()  # padded vocabulary: GPT-2's rows first, ours after
                padded[: value.shape[0]] = value
                value = padded
            if value.shape != target:
                raise ValueError(
                    f"{key}: GPT-2 has shape {tuple(value.shape)}, this model {tuple(ours[name].shape)}; check the "
                    "config"
                )
            with torch.no_grad():
                ours[name].copy_(value)
        return model


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of the last dimension; the rest become -inf."""
    if k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches ``p``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). ``temperature=0`` is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + new).

    With the cache the prompt is processed once and each step feeds one token, so the total must fit
    in the context. Without it every step re-reads the last ``context_length`` tokens. Generation
    stops early once every row has produced ``eos_id``.
    """
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.size(1) == 0:
        raise ValueError("the prompt is empty: give at least one token (for example the end-of-text token)")
    context = model.config.context_length
    if use_cache and idx.size(1) + max_new_tokens > context:
        raise ValueError(
            f"prompt ({idx.size(1)}) + max_new_tokens ({max_new_tokens}) exceeds context_length={context}; "
            "generate fewer tokens or use use_cache=False (a sliding window)"
        )
    was_training = model.training
    model.eval()
    cache = (
        KVCache(
            model.config, idx.size(0), idx.size(1) + max_new_tokens, device=idx.device, dtype=model.wte.weight.dtype
        )
        if use_cache
        else None
    )
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    step_input = idx
    for _ in range(max_new_tokens):
        if cache is None:
            step_input = idx[:, -context:]
        logits, _ = model(step_input, cache=cache)
        nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if eos_id is not None:
            finished |= nxt == eos_id
            if bool(finished.all()):
                break
    model.train(was_training)
    return idx


def generate_batched(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop_id: int | None = None,
    batch_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The new tokens after each prompt (lists of ids of any lengths), greedy by default.

    Prompts of equal length share a batch (at most ``batch_size`` rows; all of them when None) and a
    KV cache, so no padding is needed; batches run from the shortest prompts up, in prompt order.
    Each prompt gets at most ``max_new_tokens``, fewer if the context would overflow; a reply ends
    just after ``stop_id`` when it comes (the stop token is kept, so the caller can tell)."""
    if not prompts:
        return []
    context = model.config.context_length
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for k, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(k)
    out: list[list[int]] = [[] for _ in prompts]
    for length, members in sorted(by_length.items()):
        step = batch_size or len(members)
        for i in range(0, len(members), step):
            chunk = members[i : i + step]
            idx = torch.tensor([list(prompts[k]) for k in chunk], device=device)
            ids = generate(
                model,
                idx,
                min(max_new_tokens, context - length),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                eos_id=stop_id,
            )
            for k, row in zip(chunk, ids[:, length:].tolist(), strict=True):
                out[k] = row[: row.index(stop_id) + 1] if stop_id is not None and stop_id in row else row
    return out


def kv_cache_bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, bytes_per_value: int = 2) -> int:
    """Memory the KV cache needs per token: a key and a value per layer and per key-value head."""
    return 2 * n_layer * n_kv_head * head_dim * bytes_per_value
