"""The compute plan: what each lab's ``gpu`` profile asks of a GPU, counted rather than guessed.

    python -m course_utils.bench plan

For every notebook the parameters cell is run with the ``gpu`` profile's values, and the lab's
workload (below) turns them into phases: training, forward passes, generation, bare attention. Each
phase's FLOPs come from the package's own counter (:meth:`GPT.flops_per_token`, the figure the
training engine logs), its memory from the model's shape, and its time on a T4 from the assumptions
in :data:`T4`, printed beside the table. A lab whose time does not fit :data:`T4_BUDGET_MINUTES` with
room to spare must be trimmed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .lab import data_dir, find_root
from .model import GPT, GPTConfig

#: Assumptions behind every time in the plan (Colab's free T4).
T4 = dict(
    fp16_peak=65e12,  # tensor cores, fp16 (the T4 has no bf16)
    fp32_peak=8.1e12,  # no TF32 on a T4
    mfu=0.30,  # share of the peak reached by training and batched forward passes
    kernel_seconds=15e-6,  # cost of one eager PyTorch operation when a step is too small to hide it
    ops_per_layer=25,  # operations a layer in one decoding step (norms, projections, cache, attention, MLP)
    memory_gib=15.0,  # usable of the card's 16 GB
)
#: A notebook's gpu profile must fit this many minutes of compute on a T4 (DESIGN section 4).
T4_BUDGET_MINUTES = 25.0


@dataclass
class Phase:
    """One piece of a lab's GPU work."""

    name: str
    flops: float
    memory_bytes: float
    kind: str = "train"  # train, forward (evaluation, embedding), generate, attention
    precision: str = "fp16"  # fp16 (autocast on a T4) or fp32
    sequential_steps: int = 0  # forward calls that cannot be batched (decoding steps), each paying kernel launches
    n_layer: int = 0
    overhead_seconds: float = 0.0  # compilation and the like: not FLOPs
    #: what a measurement needs to time this phase on a real device (see course_utils.gpu_check)
    spec: dict = field(default_factory=dict)

    def t4_seconds(self) -> float:
        peak = T4["fp16_peak"] if self.precision == "fp16" else T4["fp32_peak"]
        compute = self.flops / (peak * T4["mfu"])
        passes = 3 if self.kind == "train" else 1  # forward, backward (twice the operations)
        launches = self.sequential_steps * passes * (self.n_layer * T4["ops_per_layer"] + 10) * T4["kernel_seconds"]
        return max(compute, launches) + self.overhead_seconds


def _cfg(model_settings: dict, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, **model_settings)


def _meta(config: GPTConfig) -> GPT:
    """The model's shapes only: no memory, no initialisation."""
    with torch.device("meta"):
        return GPT(config)


def _counts(config: GPTConfig) -> tuple[int, int]:
    """(all parameters, parameters a token passes through) without allocating the model."""
    model = _meta(config)
    return model.num_parameters(), model.num_parameters() - model.position_parameters()


def training_flops(config: GPTConfig, rows: int, length: int | None = None) -> float:
    """FLOPs of training on ``rows`` sequences of ``length`` tokens, as the engine counts them:
    :meth:`GPT.flops_per_token` (6 per parameter plus attention) times the tokens."""
    length = length or config.context_length
    return _meta(config).flops_per_token(length) * rows * length


def _optimiser_and_weights_bytes(config: GPTConfig) -> float:
    total, _ = _counts(config)
    return 16.0 * total  # fp32 weights, gradients and AdamW's two moments


def _activation_bytes(config: GPTConfig, rows: int, length: int, naive_attention: bool = False) -> float:
    """Activations kept for the backward pass in 16-bit, after Korthikanti et al. (2022): about
    34 * d bytes per token and layer with a fused attention kernel (plus 5 * heads * T per token with
    the scores written out), and the logits in 16 and 32 bits."""
    per_token_layer = 34 * config.n_embd + (5 * config.n_head * length if naive_attention else 0)
    vocab = math.ceil(config.vocab_size / config.pad_vocab_to) * config.pad_vocab_to
    return rows * length * (config.n_layer * per_token_layer + 10 * vocab)


def train(name: str, config: GPTConfig, rows: int, length: int | None = None, precision: str = "fp16", **kw) -> Phase:
    length = length or config.context_length
    batch = kw.pop("batch", rows)
    memory = _optimiser_and_weights_bytes(config) + _activation_bytes(config, batch, length)
    spec = dict(config=config, rows=rows, batch=batch, length=length)
    steps = math.ceil(rows / batch)  # small steps are bound by kernel launches, not FLOPs
    flops = training_flops(config, rows, length)
    return Phase(name, flops, memory, "train", precision, steps, config.n_layer, spec=spec, **kw)


def forward(name: str, config: GPTConfig, rows: int, length: int, batch: int, precision: str = "fp16") -> Phase:
    """Forward passes only (evaluation, embedding): a third of training's FLOPs."""
    total, _ = _counts(config)
    memory = 4.0 * total + batch * length * (2 * config.n_embd + 6 * config.vocab_size)
    spec = dict(config=config, rows=rows, batch=batch, length=length)
    return Phase(name, training_flops(config, rows, length) / 3, memory, "forward", precision, spec=spec)


def generate(
    name: str, config: GPTConfig, prompts: int, prompt_len: int, new_tokens: int, batch: int, precision: str = "fp16"
) -> Phase:
    """Generation with the KV cache: the prompt in one forward pass, then one token per step for a
    batch at a time. Each step is small, so the kernel launches, not the FLOPs, usually set its time."""
    total, through = _counts(config)
    length = prompt_len + new_tokens
    prefill = prompts * (2 * through * prompt_len + 2 * config.n_layer * config.n_embd * prompt_len**2)
    decode = prompts * sum(2 * through + 4 * config.n_layer * config.n_embd * t for t in range(prompt_len, length))
    cache = 2 * config.n_layer * batch * length * config.n_embd * 2
    steps = math.ceil(prompts / batch) * (new_tokens + 1)
    spec = dict(config=config, prompts=prompts, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, cache=True)
    return Phase(name, prefill + decode, 4.0 * total + cache, "generate", precision, steps, config.n_layer, spec=spec)


def attention(name: str, lengths: list[int], heads: int, head_dim: int, calls: int) -> Phase:
    """Bare attention, forward only, fp32 (Lab 02's benchmark): 4 * H * T^2 * d FLOPs a call, and the
    written-out version holds two T x T score matrices per head."""
    flops = calls * sum(4 * heads * t * t * head_dim for t in lengths)
    memory = max(2 * heads * t * t * 4 for t in lengths)
    spec = dict(lengths=lengths, heads=heads, head_dim=head_dim, calls=calls)
    return Phase(name, flops, memory, "attention", "fp32", calls * len(lengths), 1, spec=spec)


# ------------------------------------------------------------------------------------------------
# The labs' workloads: what each notebook does with its parameters on a GPU
# ------------------------------------------------------------------------------------------------


def shipped_config(name: str, data: Path | None = None) -> GPTConfig:
    """The configuration stored with a shipped model (``base_model.pt``, ``sft_model.pt``)."""
    payload = torch.load((data or data_dir()) / "artefacts" / name, map_location="meta", weights_only=False)
    return GPTConfig(**payload["model_config"])


def _lab01(_p: dict, _models: dict) -> list[Phase]:
    return []  # tokenisers train on the CPU; nothing here uses a GPU


def _lab02(p: dict, _models: dict) -> list[Phase]:
    # measure.timed: one warm-up and three timed calls; measure.peak_memory: one call; naive and SDPA
    lengths = p["benchmark_lengths"]
    return [attention("attention benchmark", lengths, p["benchmark_heads"], p["benchmark_head_dim"], 2 * 5)]


def _lab03(p: dict, _models: dict) -> list[Phase]:
    n = p["generation_length"]
    cfg = GPTConfig(**{**p["demo_config"], "context_length": n})
    _, through = _counts(cfg)
    # generated twice with the cache and twice without (the timing re-runs both); the uncached
    # model re-reads all t tokens at step t
    uncached = 2 * sum(2 * through * t + 4 * cfg.n_layer * cfg.n_embd * t * t for t in range(1, n))
    cached = generate("generation with the cache (x2)", cfg, 2, 1, n - 1, 1, "fp32")
    spec = dict(config=cfg, prompts=2, batch=1, prompt_len=1, new_tokens=n - 1, cache=False)
    without = Phase("generation without the cache (x2)", uncached, cached.memory_bytes, "generate", "fp32", 2 * (n - 1))
    without.n_layer, without.spec = cfg.n_layer, spec
    # section 8: two small models (learned and rotary positions) on 16 windows of 64 tokens a step;
    # section 9: two more rotary ones with fewer key-value heads (counted at the multi-head size)
    small = GPTConfig(vocab_size=cfg.vocab_size, context_length=256, n_layer=2, n_head=4, n_embd=128)
    positions = train("learned and rotary positions (2 models)", small, 2 * p["position_steps"] * 16, 64, batch=16)
    shared = train("2 and 1 key-value heads (2 models)", small, 2 * p["position_steps"] * 16, 64, batch=16)
    return [cached, without, positions, shared]


def _lab04(p: dict, models: dict) -> list[Phase]:
    cfg = _cfg(p["model_size"], models["base"].vocab_size)
    b, ladder = p["batch_size"], p["ladder_steps"] + 2  # two warm-up steps a rung
    eval_rows = (p["train_steps"] // p["eval_every"] + 1) * 40 * b  # eval_batches = 40 in the gpu profile
    return [
        train("speed ladder: fp32 rung", cfg, ladder * b, precision="fp32", batch=b),
        # on a T4: autocast, SDPA, compile, fused AdamW at the lab's batch, then twice the batch
        train("speed ladder: fp16 rungs", cfg, ladder * 6 * b, batch=2 * b, overhead_seconds=3 * 45.0),
        train("pretraining run", cfg, p["train_steps"] * b, batch=b),
        forward("evaluations", cfg, eval_rows, cfg.context_length, b),
        train("resume demonstration", cfg, 2 * p["resume_steps"] * b, batch=b),
        generate("samples", cfg, 2 + p["train_steps"] // p["eval_every"], 1, 128, 1),
    ]


def _lab05(p: dict, _models: dict) -> list[Phase]:
    # the live IsoFLOP sweep: every shape trained for every budget (the sweep's vocabulary and context)
    phases = []
    for n_layer, n_embd in p["live_shapes"]:
        cfg = GPTConfig(vocab_size=512, context_length=128, n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd)
        rows = round(sum(p["live_budgets"]) / training_flops(cfg, 1))
        phases.append(train(f"IsoFLOP sweep: {n_layer}x{n_embd}", cfg, rows, batch=16))
    return phases


def _lab06(p: dict, models: dict) -> list[Phase]:
    cfg, runs, batch = models["sft"], 1 + 2 * bool(p.get("run_ablation")), p["batch_size"]
    length = cfg.context_length  # rows are padded to the longest in the batch: count the whole context
    n = p["n_eval"]
    return [
        train(f"fine-tuning ({runs} runs)", cfg, runs * p["sft_steps"] * batch, length, batch=batch),
        generate("fact recall", cfg, 5 * n, 12, 12, 128),
        generate("answers on three sets, compliance", cfg, runs * 4 * n, 100, 48, 64),
    ]


def _lab07(p: dict, models: dict) -> list[Phase]:
    base, n, facts = models["base"], p["n_questions"], p["n_facts"]
    shots, draws = p["shots"], p["n_draws"]
    few = n * sum(draws if k else 1 for k in shots)
    # an example is about 20 tokens; 8 people's facts about 15 tokens each
    small = GPTConfig(vocab_size=512, context_length=64, n_layer=2, n_head=2, n_embd=64)
    return [
        generate("few-shot, formats, orders, assistant, flipped", base, few + 8 * n, 20 * max(shots) + 20, 16, 64),
        generate("facts given only in the prompt", base, 6 * facts, 8 * 15 + 20, 16, 64),
        forward("copy probe and loss by position", base, 32 + 16 * 16, base.context_length, 16),
        train("data ablation (3 small models)", small, 3 * p["ablation_steps"] * 32, 64, batch=32),
        generate("SFT zero-shot against base 8-shot", base, 2 * n, 20 * 8 + 20, 24, 64),
    ]


def _lab08(p: dict, models: dict) -> list[Phase]:
    cfg, n = models["sft"], p["n_questions"]
    longest = cfg.context_length - 24
    return [
        forward("dense retrieval: embedding 750 biographies", models["base"], 750 + n, 90, 64),
        generate("closed book", cfg, n, 16, 32, 64),
        # a fine-tune that teaches declining (batches of 16 short conversations), then both models on two groups
        train("decline fine-tune", cfg, p.get("decline_steps", 0) * 16, 128, batch=16),
        generate("declining: two models, two groups", cfg, 4 * n, 16, 32, 64),
        generate("with retrieved documents, BM25 and dense", cfg, 2 * len(p["ks"]) * n, longest, 24, 64),
        generate("distractor layouts", cfg, 6 * n, longest, 24, 64),
    ]


def _lab09(p: dict, models: dict) -> list[Phase]:
    cfg = models["sft"]
    rows, length, new = p["prompts_per_step"] * p["group_size"], 72 + 64, 64
    steps, n = p["grpo_steps"], p["n_eval"]
    evals = 1 + steps // p["eval_every"] + 3
    return [
        generate("GRPO rollouts", cfg, steps * rows, 72, new, rows),
        # old log-probs, reference log-probs (forwards), then one update: forward and backward
        train("GRPO updates", cfg, steps * rows * 5 // 3, length, batch=rows),
        generate("held-out evaluations", cfg, evals * n, 72, new, 64),
        generate("pass@k samples", cfg, 2 * n * p["passk_samples"], 72, new, 64),
        # two DPO runs of 16 pairs a step: the policy's forward and backward on both replies of each pair
        train("DPO updates", cfg, 2 * p["dpo_steps"] * 16 * 2, 40, batch=16),
        # the frozen reference on both replies every step, held-out preference accuracy, the reward model's features
        forward(
            "DPO reference and evaluations",
            cfg,
            2 * p["dpo_steps"] * 16 * 2
            + 2 * (p["dpo_steps"] // p["dpo_eval_every"] + 2) * 2 * p["n_eval_pairs"]
            + 2 * (p["n_pairs"] + p["n_eval_pairs"]),
            40,
            64,
        ),
        generate("answers before and after DPO", cfg, 3 * p["n_answers"], 20, 24, 64),
    ]


#: notebook number -> its workload
WORKLOADS: dict[str, Callable[[dict, dict], list[Phase]]] = {
    "01": _lab01,
    "02": _lab02,
    "03": _lab03,
    "04": _lab04,
    "05": _lab05,
    "06": _lab06,
    "07": _lab07,
    "08": _lab08,
    "09": _lab09,
}


class _Pick:
    def __init__(self, profile: str):
        self.profile = profile

    def pick(self, **choices):
        return choices[self.profile]


def notebook_parameters(path: Path, profile: str = "gpu") -> dict:
    """The values a notebook's parameters cell sets under ``profile``."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path} has {len(cells)} parameters cells; the notebook contract asks for one")
    namespace: dict = {"lab": _Pick(profile)}
    exec("".join(cells[0]["source"]), namespace)
    return {k: v for k, v in namespace.items() if k not in ("lab", "__builtins__")}


def lab_plan(path: Path, models: dict) -> list[Phase]:
    number = Path(path).name[:2]
    if number not in WORKLOADS:
        raise KeyError(f"{Path(path).name} has no workload in course_utils.plan.WORKLOADS: add one")
    return WORKLOADS[number](notebook_parameters(path), models)


def plan_rows(root: Path | None = None) -> list[dict]:
    """One row per notebook: FLOPs, peak memory and T4 minutes of its gpu profile."""
    root = root or find_root()
    data = root / "data"
    models = {"base": shipped_config("base_model.pt", data), "sft": shipped_config("sft_model.pt", data)}
    rows = []
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        phases = lab_plan(path, models)
        rows.append(
            dict(
                lab=path.name[:2],
                notebook=path.name,
                phases=phases,
                train_flops=sum(ph.flops for ph in phases if ph.kind == "train"),
                other_flops=sum(ph.flops for ph in phases if ph.kind != "train"),
                peak_memory_gib=max((ph.memory_bytes for ph in phases), default=0.0) / 2**30,
                t4_minutes=sum(ph.t4_seconds() for ph in phases) / 60,
            )
        )
    return rows


def format_plan(rows: list[dict], detail: bool = False) -> str:
    lines = [
        "| lab | training FLOPs | generation and other FLOPs | peak memory (GiB) | T4 minutes | budget |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        fits = "fits" if r["t4_minutes"] <= T4_BUDGET_MINUTES and r["peak_memory_gib"] <= T4["memory_gib"] else "TRIM"
        lines.append(
            f"| {r['lab']} | {r['train_flops']:.2e} | {r['other_flops']:.2e} | {r['peak_memory_gib']:.2f} | "
            f"{r['t4_minutes']:.1f} | {fits} (≤ {T4_BUDGET_MINUTES:.0f} min) |"
        )
        if detail:
            for ph in r["phases"]:
                lines.append(
                    f"|  · {ph.name} | {ph.kind}, {ph.precision} | {ph.flops:.2e} | {ph.memory_bytes / 2**30:.2f} | "
                    f"{ph.t4_seconds() / 60:.2f} | |"
                )
    lines.append("")
    lines.append(
        f"Assumptions: T4 peak {T4['fp16_peak'] / 1e12:.0f} TFLOP/s fp16 and {T4['fp32_peak'] / 1e12:.1f} fp32, "
        f"MFU {T4['mfu']:.2f} for training and batched forwards; a decoding step costs at least "
        f"{T4['ops_per_layer']} operations per layer (+10) at {T4['kernel_seconds'] * 1e6:.0f} µs each; "
        "torch.compile 45 s a compilation; memory = fp32 weights, gradients and AdamW moments plus 16-bit "
        "activations (Korthikanti et al. 2022) or the KV cache. FLOPs: GPT.flops_per_token, as the engine counts."
    )
    return "\n".join(lines)


PLAN_LINE = re.compile(r"\*\*T4 plan:\*\*[^\n]*(\n[^\n*][^\n]*)*")


def title_line(row: dict) -> str:
    """The sentence each notebook's title cell carries about its own gpu profile."""
    if not row["phases"]:
        return "**T4 plan:** nothing in this lab runs on a GPU."
    return (
        f"**T4 plan:** the `gpu` profile asks for about {row['t4_minutes']:.1f} minutes of T4 compute "
        f"({row['train_flops'] + row['other_flops']:.1e} FLOPs, peak memory {row['peak_memory_gib']:.1f} GiB), "
        "counted by `python -m course_utils.bench plan`; not yet timed on a T4."
    )


def write_titles(rows: list[dict], root: Path | None = None) -> list[str]:
    """Put (or refresh) each notebook's plan line in its title cell, after the **Time:** paragraph;
    the names of the notebooks changed."""
    root = root or find_root()
    changed = []
    for row in rows:
        path = root / "notebooks" / row["notebook"]
        nb = json.loads(path.read_text(encoding="utf-8"))
        title = "".join(nb["cells"][0]["source"])
        line = title_line(row)
        if PLAN_LINE.search(title):
            new = PLAN_LINE.sub(lambda _, line=line: line, title)
        else:
            new = title.replace("**Builds on:**", line + "\n**Builds on:**", 1)
        if new != title:
            nb["cells"][0]["source"] = new.splitlines(keepends=True)
            path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(path.name)
    return changed
