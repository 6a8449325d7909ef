"""The training engine: one loop for the notebooks and the command line, on one device or under DDP.

AdamW (fused on CUDA; weight decay on matrices only), linear warm-up then cosine decay, gradient
accumulation and clipping, precision by device (bf16 autocast on compute capability >= 8, fp16 with a
gradient scaler below, fp32 on CPU), an optional ``torch.compile``, periodic evaluation, atomic
checkpoints that resume exactly (model, optimiser, scaler, step, data position, random states), and
metrics as JSON lines. Under ``torchrun`` each process takes its slice of every global batch and
gradients are averaged (gloo on CPU, NCCL on GPUs)::

    python -m course_utils.train --out-dir runs/pretrain --max-steps 2000
    torchrun --nproc_per_node 2 -m course_utils.train --out-dir runs/pretrain --max-steps 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .artefacts import load_checkpoint, save_checkpoint
from .data import BatchSampler, token_cache, tokenizer_fingerprint
from .lab import precision_for
from .model import GPT, GPTConfig, generate
from .tokenizer import ENDOFTEXT, Tokenizer, TokenizerError, load_course_tokenizer

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CHECKPOINT_FORMAT = 1


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)  # the model to train (its vocabulary: the tokenizer's)
    out_dir: str = "runs/pretrain"
    # optimisation
    batch_size: int = 32  # sequences per process per micro-step
    grad_accum: int = 1
    max_steps: int = 1000
    warmup_steps: int = 100
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # running
    eval_every: int = 100
    eval_batches: int = 20
    checkpoint_every: int = 100
    sample_every: int = 0  # write a generated sample to samples.txt every so many steps (0: never)
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    compile: bool = False


def warmup_cosine_lr(step: int, *, max_lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    """Linear warm-up from max_lr/warmup to max_lr, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def configure_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device_type: str
) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices of linear layers only: decaying biases, norm
    gains or embeddings only pulls them towards zero without regularising anything useful."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def mixed_precision(device: torch.device, precision: str):
    """``(autocast, scaler)`` for training in ``precision`` on ``device``: ``autocast()`` is a context
    that runs the forward pass in bf16 or fp16 (a no-op in fp32), and the gradient scaler is enabled
    only for fp16, whose small range would otherwise let gradients underflow to zero."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise TrainingError(f"precision={precision!r}: use auto, bf16, fp16 or fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, tokens, batch_size: int, seq_len: int, batches: int, *, autocast=nullcontext
) -> float:
    """Mean next-token loss of ``model`` over ``batches`` fixed (seed 0) random (batch_size, seq_len)
    windows of ``tokens``: the same windows every call, so values are comparable across a run."""
    sampler = BatchSampler(tokens, batch_size, seq_len, seed=0, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(batches):
        x, y = sampler.next()
        with autocast():
            losses.append(model(x, y)[1].float().item())
    model.train(was_training)
    return sum(losses) / len(losses)


class Trainer:
    """Holds everything a run needs and steps it. ``train_tokens``/``val_tokens`` are 1-D token arrays;
    ``train_tokens`` may be a list of arrays mixed with ``train_weights`` (see :class:`BatchSampler`).
    ``train_batches`` replaces the token sampler by any object with ``next() -> (x, y)``,
    ``state_dict()`` and ``load_state_dict()`` (fine-tuning batches of conversations, for example).
    ``fade`` lowers parts of the mixture over a number of batches and ``ramp`` holds parts back, then
    raises them (see :class:`BatchSampler`).
    ``probes`` maps names to functions of the model that return a number (an in-context score, say);
    each is measured at every evaluation, in eval mode without gradients, and logged beside the loss."""

    def __init__(
        self,
        cfg: TrainConfig,
        train_tokens,
        val_tokens,
        *,
        tokenizer_id: str = "",
        train_weights=None,
        train_batches=None,
        probes: dict[str, Callable[[nn.Module], float]] | None = None,
        fade: dict[int, int | tuple[int, float]] | None = None,
        ramp: dict[int, tuple[int, int]] | None = None,
    ):
        self.cfg, self.tokenizer_id, self.probes = cfg, tokenizer_id, dict(probes or {})
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.distributed = self.world_size > 1
        if cfg.device == "auto":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        else:
            device = cfg.device
        self.device = torch.device(device)
        if self.distributed and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(cfg.seed)
        self.precision = precision_for(self.device) if cfg.precision == "auto" else cfg.precision
        self.autocast, self.scaler = mixed_precision(self.device, self.precision)
        self.model = GPT(cfg.model).to(self.device)
        self.optimizer = configure_optimizer(
            self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), self.device.type
        )
        net: nn.Module = self.model
        if self.distributed:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.net = torch.compile(net) if cfg.compile else net
        self.train_batches = train_batches or BatchSampler(
            train_tokens,
            cfg.batch_size,
            cfg.model.context_length,
            seed=cfg.seed,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            weights=train_weights,
            fade=fade,
            ramp=ramp,
        )
        self.val_tokens = val_tokens
        self.step = 0
        self.out = Path(cfg.out_dir)
        self.tokens_per_step = cfg.batch_size * cfg.model.context_length * cfg.grad_accum * self.world_size

    # -- one optimisation step ---------------------------------------------------------------
    def train_step(self) -> float:
        cfg = self.cfg
        lr = warmup_cosine_lr(
            self.step,
            max_lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            min_lr=cfg.lr * cfg.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.train_batches.next()
            sync = not self.distributed or micro == cfg.grad_accum - 1  # all-reduce once per step
            try:
                with nullcontext() if sync else self.net.no_sync(), self.autocast():
                    _, loss = self.net(x, y)
                    loss = loss / cfg.grad_accum
                self.scaler.scale(loss).backward()
            except torch.OutOfMemoryError as e:
                raise TrainingError(
                    f"out of GPU memory at batch_size={cfg.batch_size}, context_length={cfg.model.context_length}: "
                    "lower batch_size "
                    f"and raise grad_accum by the same factor to keep the global batch ({self.tokens_per_step:,} "
                    "tokens per step)"
                ) from e
            total += loss.detach()
        if self.distributed:
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.AVG)
        value = total.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"the loss became {value} at step {self.step}; the last checkpoint is kept. Lower lr (now {cfg.lr}), "
                "keep grad_clip on, or use precision='fp32' to see whether low precision is the cause"
            )
        self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return value

    def evaluate(self, tokens=None, batches: int | None = None) -> float:
        """Mean loss over fixed validation windows (the same ones at every evaluation)."""
        tokens = self.val_tokens if tokens is None else tokens
        return evaluate_loss(
            self.model,
            tokens,
            self.cfg.batch_size,
            self.cfg.model.context_length,
            batches or self.cfg.eval_batches,
            autocast=self.autocast,
        )

    def measure_probes(self) -> dict[str, float]:
        """Every probe's value now, measured without disturbing the run (model mode, random state)."""
        if not self.probes:
            return {}
        state, was_training = torch.get_rng_state(), self.model.training
        self.model.eval()
        with torch.no_grad(), self.autocast():
            values = {name: float(probe(self.model)) for name, probe in self.probes.items()}
        self.model.train(was_training)
        torch.set_rng_state(state)
        return values

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": dataclasses.asdict(self.cfg),
            "model_config": dataclasses.asdict(self.model.config),
            "tokenizer": self.tokenizer_id,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.train_batches.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a checkpoint written before a GPTConfig field existed holds that field's default
        if dataclasses.asdict(GPTConfig(**state["model_config"])) != dataclasses.asdict(self.model.config):
            raise TrainingError(
                f"the checkpoint is of another model ({state['model_config']}); use another out_dir or the same model "
                "settings"
            )
        if state["tokenizer"] != self.tokenizer_id:
            raise TrainingError(
                "the checkpoint was trained with another tokenizer; its token ids would mean other things. Use another "
                "out_dir"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.train_batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = state["step"]

    def save(self) -> Path | None:
        if self.rank != 0:
            return None
        path = self.out / CHECKPOINT
        save_checkpoint(path, self.state_dict())
        return path

    def resume(self) -> bool:
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        self.load_state_dict(
            load_checkpoint(path, CHECKPOINT_FORMAT, what="checkpoint of this course's trainer", error=TrainingError)
        )
        metrics = self.out / METRICS
        if self.rank == 0 and metrics.exists():  # forget steps logged after the checkpoint: they are redone
            rows = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(r + "\n" for r in rows))
        return True

    def _write_sample(self, decode, prompt: int) -> None:
        start = torch.full((1, 1), prompt, dtype=torch.long, device=self.device)
        state = torch.get_rng_state()  # sampling must not disturb the training run's randomness
        ids = generate(
            self.model,
            start,
            min(64, self.cfg.model.context_length - 1),
            temperature=0.8,
            top_k=50,
            generator=torch.Generator(device=self.device).manual_seed(self.step),
        )
        torch.set_rng_state(state)
        with open(self.out / "samples.txt", "a") as f:
            f.write(f"step {self.step}: {decode(ids[0, 1:].tolist())}\n")

    # -- the loop ---------------------------------------------------------------------------------
    def fit(
        self, until: int | None = None, progress: bool = True, decode=None, sample_prompt: int = 0
    ) -> list[dict[str, float]]:
        """Train up to step ``until`` (default ``max_steps``), logging, evaluating and checkpointing.

        With ``decode`` (ids -> text) and ``sample_every``, a short sample that follows the token
        ``sample_prompt`` (say, end-of-text) is appended to samples.txt."""

        cfg = self.cfg
        until = cfg.max_steps if until is None else until
        history: list[dict[str, float]] = []
        bar = tqdm(total=until, initial=self.step, desc="training", unit="step", disable=not progress or self.rank != 0)
        flops = self.model.flops_per_token(cfg.model.context_length) * self.tokens_per_step
        peak = peak_flops(self.device)
        while self.step < until:
            start = time.perf_counter()
            loss = self.train_step()
            seconds = time.perf_counter() - start
            row = {
                "step": self.step,
                "loss": loss,
                "tokens_per_second": self.tokens_per_step / seconds,
                "flops_per_second": flops / seconds,
            }
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == until):
                row["val_loss"] = self.evaluate()
                row.update(self.measure_probes())
            history.append(row)
            if self.rank == 0:
                self.out.mkdir(parents=True, exist_ok=True)
                with open(self.out / METRICS, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == until):
                self.save()
            if decode is not None and cfg.sample_every and self.step % cfg.sample_every == 0 and self.rank == 0:
                self._write_sample(decode, sample_prompt)
            postfix = {"loss": f"{loss:.3f}", "tok_s": f"{row['tokens_per_second']:,.0f}"}
            if peak:
                postfix["mfu"] = f"{row['flops_per_second'] / peak:.2f}"
            bar.set_postfix(postfix)
            bar.update(1)
        bar.close()
        return history


#: Dense tensor-core peak (FLOP/s) at the precision a GPU trains in here: bf16, or fp16 on a T4.
#: From the vendors' data sheets; sparsity figures are halved away. Matched by substring of the name.
PEAK_FLOPS = {"T4": 65e12, "L4": 121e12, "A100": 312e12, "H100": 989e12}


def peak_flops(device: torch.device | str) -> float | None:
    """The GPU's peak for MFU, or None (CPU, or a GPU not in :data:`PEAK_FLOPS`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


#: GPTConfig fields the command line sets (the vocabulary comes from the tokenizer).
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "context_length", "dropout", "position", "smear_keys", "conv_width")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag for every field of :class:`TrainConfig` and for the model's size (``--n-layer`` …)."""
    defaults = GPTConfig()
    for name in MODEL_FLAGS:
        flag, default = "--" + name.replace("_", "-"), getattr(defaults, name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=f.default)


def config_from_arguments(args: argparse.Namespace, vocab_size: int) -> TrainConfig:
    """The :class:`TrainConfig` that :func:`add_config_arguments`' flags describe (other flags are ignored)."""
    values = vars(args)
    model = GPTConfig(vocab_size=vocab_size, **{name: values[name] for name in MODEL_FLAGS})
    return TrainConfig(
        model=model, **{f.name: values[f.name] for f in dataclasses.fields(TrainConfig) if f.name != "model"}
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m course_utils.train``: pretrain the course GPT on the TinyStories subset; resumes
    from ``OUT_DIR/checkpoint.pt``. Every field of :class:`TrainConfig` and the model's size are flags."""
    parser = argparse.ArgumentParser(
        description="Pretrain the course GPT on TinyStories; resumes from OUT_DIR/checkpoint.pt."
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="a tokenizer file (default: yours in runs/, else the shipped one)"
    )
    args = parser.parse_args(argv)
    try:
        tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else load_course_tokenizer(quiet=True)
        cfg = config_from_arguments(args, tokenizer.n_vocab)
        trainer = Trainer(
            cfg,
            token_cache(tokenizer, "train"),
            token_cache(tokenizer, "val"),
            tokenizer_id=tokenizer_fingerprint(tokenizer),
        )
        if trainer.resume() and trainer.rank == 0:
            print(f"resumed from {trainer.out / CHECKPOINT} at step {trainer.step}")
        trainer.fit(decode=tokenizer.decode, sample_prompt=tokenizer.special_tokens[ENDOFTEXT])
    except (TrainingError, ValueError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if trainer.rank == 0:
        print(f"step {trainer.step}: validation loss {trainer.evaluate():.4f}")
    if trainer.distributed:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
