"""Benchmarks: training throughput, MFU and peak memory for named model sizes.

    python -m course_utils.bench train                    # every size that suits the device
    python -m course_utils.bench train --sizes lab --steps 20
    python -m course_utils.bench plan                     # each lab's gpu profile: FLOPs, memory, T4 minutes

Every figure is printed as a ratio against a baseline measured in the same run, on the same machine:
the same model in fp32 with the written-out (naive) attention, no compilation and plain AdamW. Timings
on shared machines are noisy; ratios taken in one run are what can be compared.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .data import BatchSampler
from .lab import precision_for
from .model import GPT, GPTConfig
from .plan import format_plan, plan_rows, write_titles
from .train import mixed_precision, peak_flops

#: name -> (model settings, batch size, vocabulary)
SIZES = {
    "tiny": (dict(n_layer=2, n_head=2, n_embd=128, context_length=64), 16, 4096),
    "lab": (dict(n_layer=4, n_head=4, n_embd=256, context_length=256), 128, 4096),
    "lab-large": (dict(n_layer=6, n_head=6, n_embd=384, context_length=512), 64, 8192),
    "gpt2-small": (dict(n_layer=12, n_head=12, n_embd=768, context_length=1024), 16, 50304),
}


@dataclass
class Throughput:
    tokens_per_second: float
    mfu: float | None
    peak_memory_mib: float | None


def training_throughput(
    model_settings: dict,
    vocab_size: int,
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    steps: int = 5,
    attention: str = "sdpa",
    precision: str = "fp32",
    tf32: bool = False,
    compile: bool = False,
    fused: bool = False,
    tokens: np.ndarray | None = None,
) -> Throughput:
    """Training tokens per second of one configuration, after two warm-up steps (compilation,
    allocation). ``precision`` is fp32, bf16 or fp16 (with a gradient scaler)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab_size, attention=attention, **model_settings)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    net = torch.compile(model) if compile else model
    autocast, scaler = mixed_precision(device, precision)
    if tokens is None:
        tokens = np.random.default_rng(0).integers(0, vocab_size, 1_000_000).astype(np.uint16)
    sampler = BatchSampler(tokens, batch_size, config.context_length, seed=0, device=device)

    def step() -> None:
        x, y = sampler.next()
        with autocast():
            _, loss = net(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tokens_per_second = steps * batch_size * config.context_length / (time.perf_counter() - start)
    peak = peak_flops(device)
    mfu = None if peak is None else model.flops_per_token(config.context_length) * tokens_per_second / peak
    memory = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Throughput(tokens_per_second, mfu, memory)


def fast_settings(device: torch.device) -> dict:
    """Everything the engine turns on for this device."""
    precision = precision_for(device)
    if device.type != "cuda":
        return dict(attention="sdpa", precision=precision)
    return dict(attention="sdpa", precision=precision, tf32=precision == "bf16", compile=True, fused=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Training throughput against an fp32, naive-attention baseline measured in the same run."
    )
    parser.add_argument("what", choices=["train", "plan"])
    parser.add_argument("--detail", action="store_true", help="plan: one line per phase of each lab")
    parser.add_argument("--write-titles", action="store_true", help="plan: refresh the plan line in every title cell")
    parser.add_argument(
        "--sizes",
        nargs="*",
        default=None,
        help=f"from {', '.join(SIZES)} (default: all on a GPU, tiny and lab on a CPU)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per measurement (default 20 on a GPU, 3 on a CPU)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.what == "plan":
        print("Compute of each lab's gpu profile, counted from its parameters cell\n")
        rows = plan_rows()
        print(format_plan(rows, detail=args.detail))
        if args.write_titles:
            print("\ntitle cells updated:", ", ".join(write_titles(rows)) or "none")
        return 0
    device = torch.device(args.device)
    sizes = args.sizes or (list(SIZES) if device.type == "cuda" else ["tiny", "lab"])
    steps = args.steps or (20 if device.type == "cuda" else 3)
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; {steps} timed steps each; ratio = tokens/s against fp32 + naive attention in this run\n")
    print("| size | parameters | settings | tokens/s | ratio | MFU | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|")
    fast = fast_settings(device)
    for size in sizes:
        model_settings, batch, vocab = SIZES[size]
        with torch.device("meta"):
            n_params = GPT(GPTConfig(vocab_size=vocab, **model_settings)).num_parameters()
        baseline = training_throughput(model_settings, vocab, batch, device=device, steps=steps, attention="naive")
        engine = training_throughput(model_settings, vocab, batch, device=device, steps=steps, **fast)
        for label, result in (
            ("fp32, naive attention (baseline)", baseline),
            ("engine: " + ", ".join(f"{k}={v}" for k, v in fast.items()), engine),
        ):
            mfu = "n/a" if result.mfu is None else f"{result.mfu:.2f}"
            memory = "n/a" if result.peak_memory_mib is None else f"{result.peak_memory_mib:,.0f}"
            print(
                f"| {size} | {n_params / 1e6:.1f} M | {label} | {result.tokens_per_second:,.0f} | "
                f"{result.tokens_per_second / baseline.tokens_per_second:.2f} | {mfu} | {memory} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
