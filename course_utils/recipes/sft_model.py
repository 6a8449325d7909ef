"""The reference SFT model (Labs 06–09): the base model fine-tuned on the SFT mixture of
:func:`course_utils.sft.sft_items` with pretraining replay, stored in fp16 with its card. The
defaults make the shipped model::

    python -m course_utils.recipes.sft_model             # runs/sft, then data/artefacts/sft_model.pt

The run resumes from ``OUT_DIR/checkpoint.pt`` when it was cut off (a folder holding a run with other
data or settings is refused). The defaults put one to three biographies into each reading item (one
relevant, as retrieval brings them), 2,000 worked reasoning problems into the mixture, and 2,000
closed-book two-hop problems, ``--closed-kind employer_city`` ("in which city is A's employer
based?", with where each employer is based taught alongside): a ``--closed-worked`` share of 0.3
worked out (each fact recalled in turn) and the rest answered in one line. That mixture of habits is
what Lab 09's RL chooses between; ``--closed-book 0`` leaves it out. ``--closed-kind same_city``
asks instead whether two people were born in the same city, and ``--closed-given N`` adds N problems
with their facts in the prompt, all worked. ``--decline N`` adds N closed-book
questions about people the model cannot know, answered "I don't know who that is."

The card records exact match on questions about the fine-tuning people, the held-out people and
reading comprehension about unseen people (one biography, and one to three), for this model and for
the base model asked in the same format; greedy accuracy on held-out reasoning problems by kind, and
on the closed-book problems of ``--closed-kind`` with the share of greedy replies that work them out;
how often each model declines closed-book questions about unknown and about held-out people; and how
often each closes its reply.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from ..artefacts import ArtefactError, file_sha256, load_model, save_model
from ..data import tokenizer_fingerprint
from ..lab import data_dir
from ..rl import accuracy, answer_reward
from ..sft import (
    DECLINE,
    SFT_MODEL,
    ChatFormatError,
    chat_tokenizer,
    declines,
    evaluate_items,
    evaluation_sets,
    finetune,
    format_compliance,
    grow_vocabulary,
    problem_conversation,
    reading_items,
    replay_documents,
    replies,
    reply,
    sft_items,
)
from ..train import TrainingError
from ..world import BASE_MODEL, load_base_model, make_world
from . import finish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fine-tune the reference base model on the SFT mixture; write the SFT artefact and its card."
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--replay", type=float, default=0.25, help="share of each batch that is pretraining text")
    parser.add_argument(
        "--reading-documents",
        type=int,
        default=3,
        help="up to this many biographies per reading item, one relevant "
        "(distractors for RAG; needs the context to hold them)",
    )
    parser.add_argument("--reasoning", type=int, default=2000, help="worked reasoning problems in the mixture")
    parser.add_argument(
        "--closed-book",
        type=int,
        default=2000,
        help="closed-book two-fact reasoning problems of --closed-kind in the mixture (Lab 09's RL task)",
    )
    parser.add_argument(
        "--closed-kind", default="employer_city", choices=("employer_city", "same_city"), help="their kind"
    )
    parser.add_argument(
        "--closed-worked",
        type=float,
        default=0.3,
        help="share of those answered step by step; the rest are answered in one line",
    )
    parser.add_argument(
        "--closed-given", type=int, default=0, help="problems of that kind with their facts in the prompt, all worked"
    )
    parser.add_argument(
        "--decline",
        type=int,
        default=0,
        help=f"closed-book questions about people the model cannot know, answered {DECLINE!r}",
    )
    parser.add_argument("--n-eval", type=int, default=300, help="items per evaluation set on the card")
    parser.add_argument(
        "--base", type=Path, default=None, help=f"the base model to fine-tune (default: data/artefacts/{BASE_MODEL})"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("runs/sft"), help="checkpoints (a run resumes from here)")
    parser.add_argument("--out", type=Path, default=None, help=f"default: data/artefacts/{SFT_MODEL}")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    world = make_world(0)
    base, base_tokenizer = load_base_model()
    base_path = args.base or data_dir() / "artefacts" / BASE_MODEL
    if args.base:
        try:
            base = load_model(args.base, tokenizer_id=tokenizer_fingerprint(base_tokenizer))
        except ArtefactError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    tokenizer = chat_tokenizer(base_tokenizer)
    items = sft_items(
        world,
        max_documents=args.reading_documents,
        n_reasoning=args.reasoning,
        n_decline=args.decline,
        n_closed=args.closed_book,
        closed_kind=args.closed_kind,
        closed_worked=args.closed_worked,
        n_closed_given=args.closed_given,
    )
    try:
        trainer = finetune(
            base,
            tokenizer,
            items,
            args.out_dir,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            replay=replay_documents(world),
            replay_fraction=args.replay,
        )
        resumed_at = trainer.step or None
        t0 = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - t0
    except (TrainingError, ChatFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = args.out or data_dir() / "artefacts" / SFT_MODEL
    size = save_model(trainer.model, out, tokenizer_id=tokenizer_fingerprint(tokenizer))
    model = load_model(out, verify=False)  # measure what ships
    grown_base = grow_vocabulary(base, tokenizer.n_vocab)
    metrics: dict = {
        "parameters": model.num_parameters(),
        "file_bytes": size,
        "model_sha256": file_sha256(out),
        "steps": args.steps,
        "resumed_at_step": resumed_at,
        "train_seconds_this_run": round(seconds, 1),
        "sft_examples": {k: sum(i.kind == k for i in items) for k in sorted({i.kind for i in items})},
        "replay_fraction": args.replay,
        "replay_documents": len(replay_documents(world)),
    }
    sets = evaluation_sets(world, args.n_eval)
    for name, subset in sets.items():
        metrics[f"exact_match_{name}"] = round(evaluate_items(model, tokenizer, subset), 4)
        metrics[f"base_exact_match_{name}"] = round(evaluate_items(grown_base, tokenizer, subset), 4)
    three = reading_items(world, "retrieval", 0, max_documents=3)
    three = random.Random("0:reading_unseen_3").sample(three, min(args.n_eval, len(three)))
    metrics["exact_match_reading_unseen_1to3_documents"] = round(evaluate_items(model, tokenizer, three), 4)
    problems = world.reasoning_problems("heldout", args.n_eval, 0)
    metrics["reasoning_accuracy_heldout"] = round(accuracy(model, tokenizer, problems), 4)
    for kind in ("age", "gap", "older"):
        subset = [p for p in problems if p["kind"] == kind]
        metrics[f"reasoning_accuracy_heldout_{kind}"] = round(accuracy(model, tokenizer, subset), 4) if subset else None
    closed = world.reasoning_problems("heldout", args.n_eval, 0, (args.closed_kind,))
    said = replies(model, tokenizer, [problem_conversation(p) for p in closed], max_new_tokens=64)
    metrics[f"{args.closed_kind}_accuracy_heldout"] = round(
        sum(answer_reward(r, p) >= 1 for r, p in zip(said, closed, strict=True)) / len(closed), 4
    )
    metrics[f"{args.closed_kind}_worked_share_heldout"] = round(
        sum(not r.startswith("The answer is") for r in said) / len(closed), 4
    )
    # how often each model declines closed-book: people it cannot know (retrieval) and people it should
    unknown = [[{"role": "user", "content": q["question"]}] for q in world.closed_book("retrieval", ("birth_city",))]
    for name, m in (("", model), ("base_", grown_base)):
        for split, conversations in (
            ("retrieval", unknown[: args.n_eval]),
            ("qa_heldout", [i.conversation[:-1] for i in sets["qa_heldout"]]),
        ):
            said = replies(m, tokenizer, conversations, max_new_tokens=24)
            metrics[f"{name}declined_{split}"] = round(sum(declines(r) for r in said) / len(said), 4)
    heldout = [i.conversation[:-1] for i in sets["qa_heldout"]]
    metrics["format_compliance_qa_heldout"] = round(format_compliance(model, tokenizer, heldout), 4)
    metrics["base_format_compliance_qa_heldout"] = round(format_compliance(grown_base, tokenizer, heldout), 4)
    prompts = [
        "Where was " + world.split("heldout")[0].name + " born?",
        'Write a short story that uses the words "happy", "garden" and "ball".',
    ]
    metrics["samples"] = {
        p: reply(model, tokenizer, [{"role": "user", "content": p}], max_new_tokens=150) for p in prompts
    }
    data = {
        "world_pretraining": world.pretraining_sha256(),
        "base_model": file_sha256(base_path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    finish(out, module="sft_model", argv=argv, data=data, metrics=metrics, started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
