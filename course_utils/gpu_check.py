"""One command that measures, on any CUDA machine and in a few minutes, what the course promises of a GPU:

    make gpu-check                 # python -m course_utils.gpu_check
    make gpu-check ARGS=--tiny     # the same code on a tiny scale: a CPU runs it in well under a minute

It prints Markdown tables to paste into the README:

1. **the speed ladder** at the lab size and at GPT-2 small: fp32 with naive attention, then SDPA,
   autocast (bf16 where the GPU has it, else fp16), ``torch.compile`` and fused AdamW, each rung in
   tokens/s and MFU and as a ratio against the first rung measured in the same run;
2. **the T4 path**: fp16 autocast with a gradient scaler, forced even on a GPU with bf16;
3. **DDP** over two processes where two GPUs exist (``torchrun``), against one process;
4. **each lab's gpu profile**: every phase of the compute plan (:mod:`course_utils.plan`) run for a
   few steps on this device, extrapolated to the whole phase, beside the plan's T4 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .bench import SIZES, training_throughput
from .lab import find_root, precision_for
from .measure import timed
from .model import GPT, GPTConfig, causal_mask, generate, naive_attention
from .plan import T4, Phase, lab_plan, shipped_config
from .train import mixed_precision, peak_flops

#: the tiny stand-in for every model when ``--tiny`` is given
TINY = dict(n_layer=1, n_head=2, n_embd=32)


def _rung_table(size: str, device: torch.device, steps: int, tiny: bool) -> list[str]:
    settings, batch, vocab = SIZES[size]
    low = precision_for(device)
    gpu = device.type == "cuda"
    ampere = gpu and torch.cuda.get_device_capability(device)[0] >= 8
    compile_ = gpu and not tiny  # compiling on a CPU takes longer than the whole tiny check
    rungs = [
        ("fp32, naive attention", dict(attention="naive"), True),
        ("+ SDPA", dict(), True),
        ("+ TF32 matmuls", dict(tf32=True), ampere),
        (f"+ autocast {low}", dict(tf32=ampere, precision=low), low != "fp32"),
        ("+ torch.compile", dict(tf32=ampere, precision=low, compile=True), compile_),
        ("+ fused AdamW", dict(tf32=ampere, precision=low, compile=compile_, fused=True), True),
        ("T4 path: fp16 autocast + gradient scaler", dict(precision="fp16", compile=compile_, fused=True), True),
    ]
    lines, first = [], None
    for name, options, applies in rungs:
        if not applies:
            lines.append(f"| {size} | {name} | skipped on this device | | |")
            continue
        result = training_throughput(settings, vocab, batch, device=device, steps=steps, **options)
        first = first or result.tokens_per_second
        mfu = "n/a" if result.mfu is None else f"{result.mfu:.2f}"
        lines.append(
            f"| {size} | {name} | {result.tokens_per_second:,.0f} | {result.tokens_per_second / first:.2f} | {mfu} |"
        )
    return lines


def speed_ladder(device: torch.device, sizes: list[str], steps: int, tiny: bool) -> str:
    head = ["| size | rung | tokens/s | ratio to the first rung | MFU |", "|---|---|---|---|---|"]
    return "\n".join(head + [line for size in sizes for line in _rung_table(size, device, steps, tiny)])


def ddp_check(device: torch.device, steps: int) -> str:
    """Tokens/s of the training command with two processes against one (ideal ratio: 2)."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return "DDP: skipped (needs two GPUs; this machine has " + (
            f"{torch.cuda.device_count()})" if device.type == "cuda" else "no GPU)"
        )
    speeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            out = Path(tmp) / f"ddp{procs}"
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "-m"]
            command += ["course_utils.train", "--out-dir", str(out), "--max-steps", str(steps), "--eval-every", "0"]
            command += ["--checkpoint-every", "0", "--batch-size", "32"]
            subprocess.run(command, check=True, capture_output=True)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            tail = sorted(r["tokens_per_second"] for r in rows[len(rows) // 2 :])
            speeds[procs] = tail[len(tail) // 2] * procs  # each process logs its own share
    return f"DDP: 1 process {speeds[1]:,.0f} tokens/s, 2 processes {speeds[2]:,.0f} ({speeds[2] / speeds[1]:.2f}x)"


def _shrink(config: GPTConfig) -> GPTConfig:
    return replace(config, **TINY, n_kv_head=None, context_length=min(config.context_length, 32))


def phase_seconds(phase: Phase, device: torch.device, steps: int, tiny: bool) -> float:
    """Time a few steps of ``phase`` on ``device`` and extrapolate to the whole phase."""
    spec = phase.spec
    precision = "fp32" if phase.precision == "fp32" else precision_for(device)
    if phase.kind == "attention":
        lengths = [min(t, 64) for t in spec["lengths"]] if tiny else spec["lengths"]
        total = 0.0
        for t in lengths:
            q, k, v = (torch.randn(1, spec["heads"], t, spec["head_dim"], device=device) for _ in range(3))
            mask = causal_mask(t, device=device)

            def naive(q=q, k=k, v=v, mask=mask):
                return naive_attention(q, k, v, mask)

            def fused(q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            total += timed(naive, device) + timed(fused, device)
        return total * spec["calls"] / 2
    config = _shrink(spec["config"]) if tiny else spec["config"]
    batch = min(spec["batch"], 4) if tiny else spec["batch"]
    if phase.kind == "train":
        length = min(spec["length"], config.context_length)
        # the phase's own architecture (positions, smeared keys, convolution, key-value heads) at its length
        settings = {**asdict(config), "context_length": length}
        settings.pop("vocab_size"), settings.pop("attention")
        result = training_throughput(
            settings, config.vocab_size, batch, device=device, steps=steps, precision=precision
        )
        return spec["rows"] * spec["length"] / result.tokens_per_second  # compilation not included
    model = GPT(config).to(device).eval()
    autocast, _ = mixed_precision(device, precision)
    if phase.kind == "forward":
        length = min(spec["length"], config.context_length)
        x = torch.randint(0, config.vocab_size, (batch, length), device=device)
        with torch.no_grad(), autocast():
            seconds = timed(lambda: model(x), device)
        return seconds * math.ceil(spec["rows"] / spec["batch"])
    # generation: decoding steps of one batch (with the cache a step costs about the same at every
    # length, so a few stand for all; without it, all of them), then every batch of the phase
    new = min(spec["new_tokens"], 4 * steps if spec["cache"] or tiny else spec["new_tokens"])
    prompt_len = min(spec["prompt_len"], config.context_length - new)
    x = torch.randint(0, config.vocab_size, (batch, max(1, prompt_len)), device=device)
    with torch.no_grad(), autocast():
        seconds = timed(lambda: generate(model, x, new, temperature=0, use_cache=spec["cache"]), device, repeats=1)
    return seconds / new * spec["new_tokens"] * math.ceil(spec["prompts"] / spec["batch"])


def lab_table(device: torch.device, steps: int, tiny: bool, root: Path | None = None) -> str:
    root = root or find_root()
    data = root / "data"
    models = {"base": shipped_config("base_model.pt", data), "sft": shipped_config("sft_model.pt", data)}
    lines = [
        "| lab | phase | planned T4 minutes | measured here, minutes (extrapolated; compilation not included) |",
        "|---|---|---|---|",
    ]
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        phases = lab_plan(path, models)
        planned = measured = 0.0
        for phase in phases:
            seconds = phase_seconds(phase, device, steps, tiny)
            planned, measured = planned + phase.t4_seconds(), measured + seconds
            lines.append(f"| {path.name[:2]} | {phase.name} | {phase.t4_seconds() / 60:.2f} | {seconds / 60:.2f} |")
        lines.append(
            f"| **{path.name[:2]}** | **whole gpu profile** | **{planned / 60:.1f}** | **{measured / 60:.1f}** |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the course's GPU promises and print tables for the README.")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and one step each: checks the code, on any device"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per measurement (default 10; 1 with --tiny)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        parser.error("no CUDA GPU here: run on a GPU machine, or add --tiny to check the code on this device")
    steps = args.steps or (1 if args.tiny else 10)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_flops(device)
    print(f"# gpu-check on {name} ({time.strftime('%Y-%m-%d')}), torch {torch.__version__}, {steps} timed steps")
    peak_text = "unknown" if peak is None else f"{peak / 1e12:.0f} TFLOP/s"
    print(f"peak for MFU: {peak_text}; the plan assumes a T4 at MFU {T4['mfu']}\n")
    print("## Speed ladder\n")
    print(speed_ladder(device, ["tiny"] if args.tiny else ["lab", "gpt2-small"], steps, args.tiny), "\n", flush=True)
    print(ddp_check(device, 40), "\n", flush=True)
    print("## Each lab's gpu profile, measured\n")
    if args.tiny:
        print("(--tiny: tiny stand-ins for every model, so the measured column only shows that the code runs)\n")
    print(lab_table(device, steps, args.tiny), "\n")
    print(f"gpu-check took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
