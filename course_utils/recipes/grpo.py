"""A GRPO run from the reference SFT model on the world's reasoning problems of ``--kinds`` (Lab 09's
gpu-profile recipe; by default the closed-book two-hop ``employer_city`` problems of its section 1).
Writes ``history.json`` and ``summary.json`` (accuracy and pass@k before and after, the time) to the
run folder, and resumes from its checkpoint::

    python -m course_utils.recipes.grpo --out-dir runs/grpo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ..rl import GRPOConfig, grpo, pass_at_k_curve
from ..sft import load_sft_model
from ..world import REASONING_KINDS, make_world


def main(argv: list[str] | None = None) -> int:
    defaults = GRPOConfig()
    parser = argparse.ArgumentParser(prog="python -m course_utils.recipes.grpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/grpo")
    for name in ("steps", "prompts_per_step", "group_size", "lr", "beta", "temperature", "eval_every", "seed"):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(getattr(defaults, name)), default=getattr(defaults, name)
        )
    parser.add_argument("--no-kl", action="store_true", help="beta = 0")
    parser.add_argument(
        "--no-std", action="store_true", help="do not divide advantages by the group's standard deviation"
    )
    parser.add_argument("--token-level", action="store_true", help="average the loss over all tokens of the batch")
    parser.add_argument("--n-eval", type=int, default=300, help="held-out problems")
    parser.add_argument(
        "--kinds",
        default="employer_city",
        help=f"comma-separated kinds of reasoning problem, from {', '.join(REASONING_KINDS)}",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    cfg = GRPOConfig(
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        lr=args.lr,
        beta=0.0 if args.no_kl else args.beta,
        scale_std=not args.no_std,
        token_level=args.token_level,
        temperature=args.temperature,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or set(kinds) - set(REASONING_KINDS):
        parser.error(f"--kinds {args.kinds!r}: choose from {', '.join(REASONING_KINDS)}")
    world = make_world(0)
    policy, tokenizer = load_sft_model(args.device)
    policy.float()
    train_problems = world.reasoning_problems("sft", 2000, seed=1, kinds=kinds)
    eval_problems = world.reasoning_problems("heldout", args.n_eval, seed=0, kinds=kinds)
    start = time.perf_counter()
    trained, history = grpo(policy, tokenizer, train_problems, eval_problems, cfg, out_dir=args.out_dir)
    seconds = time.perf_counter() - start
    summary = {
        "config": dataclasses.asdict(cfg),
        "seconds": round(seconds, 1),
        "device": args.device,
        "accuracy_before": history[0]["accuracy"],
        "accuracy_after": history[-1]["accuracy"],
        "pass_at_k_before": pass_at_k_curve(policy, tokenizer, eval_problems, (1, 4, 16), n=16),
        "pass_at_k_after": pass_at_k_curve(trained, tokenizer, eval_problems, (1, 4, 16), n=16),
    }
    out = Path(args.out_dir)
    (out / "history.json").write_text(json.dumps(history))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
