"""The reference base model of Labs 06–09: the course GPT pretrained on a mixture of TinyStories, the
fictional world's biographies and documents that pay for reading the context, stored in fp16 with
its card::

    python -m course_utils.recipes.base_model            # runs/base, then data/artefacts/base_model.pt

The model has rotary positions, smeared keys and a short convolution over the last eight positions in
front of each attention layer (``--conv-width``), so that a key can stand for a few tokens, a name and
the words after it, rather than one: a lookup in the prompt is then a single match.

Each part of the mixture is a switch with its share (``--biographies``, ``--reading``, ``--lookups``,
``--lists``, ``--tables``, ``--copy``); the stories take the rest. The tables state the held-out people's
facts in other formats (never as questions), so that fine-tuning on other people's questions can reach
them (Allen-Zhu & Li's knowledge-storage result: a fact seen in one format only is stored but not
extractable). The copy sequences come first and fade; the lookups
are held back for the first steps (``--lookups-start``): trained from the start, the model learns to look
up names with its convolution and never learns to copy a span it has not seen before. The run resumes
from ``OUT_DIR/checkpoint.pt`` when it was cut off. The copy score (loss on the second copy of a
repeated span of ordinary tokens over the first) is measured at every evaluation, so the card keeps
its curve: the induction bump; so are lookups of facts
stated only in the prompt and the recall of held-out people's home towns. The card also records
the validation loss, fact recall for each split of the world against always guessing the commonest
value, few-shot and in-context accuracy, samples, the file's size and hash, and its load time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..artefacts import file_sha256, load_model, save_model
from ..data import (
    common_tokens,
    copy_sequences,
    documents_token_cache,
    tinystories_sha256,
    token_cache,
    tokenizer_fingerprint,
)
from ..icl import (
    complete,
    copy_losses,
    copy_score,
    exact_match,
    fact_questions,
    few_shot_prompts,
    in_context_facts,
    repeated_sequences,
)
from ..lab import data_dir
from ..model import generate
from ..sft import practice_world
from ..tokenizer import ENDOFTEXT, Tokenizer, TokenizerError
from ..train import (
    CHECKPOINT,
    METRICS,
    Trainer,
    TrainingError,
    add_config_arguments,
    config_from_arguments,
    evaluate_loss,
)
from ..world import (
    BASE_MODEL,
    BASE_TOKENIZER,
    PROBED,
    fact_lists,
    fact_recall,
    lookup_documents,
    make_world,
    reading_documents,
)
from . import finish

SAMPLE_PROMPTS = ("", "Once upon a time, there was a little", "Tom and Lily went to the park.")
SHOTS = (0, 1, 2, 4, 8)


def mixture(args, tokenizer, world) -> tuple[list, list[float], dict, dict, dict[str, float], dict[str, str]]:
    """The token arrays, their weights, which fade, which are held back, the shares by name and the
    hashes of what they hold."""
    eot = tokenizer.special_tokens[ENDOFTEXT]
    stories = token_cache(tokenizer, "train")
    parts = {"stories": stories}
    hashes = {"tinystories_train": tinystories_sha256("train")}
    if args.biographies:
        parts["biographies"] = documents_token_cache(tokenizer, f"world-{world.seed}", world.pretraining_documents())
        hashes["world_pretraining"] = world.pretraining_sha256()
    if args.reading:
        # invented people outside the world and outside Lab 06's reading practice
        taken = {p.name for p in world.people} | {p.name for p in practice_world(world).people}
        docs = reading_documents(args.reading_documents, seed=0, exclude=taken)
        parts["reading"] = documents_token_cache(tokenizer, "reading", docs)
    if args.lookups:
        taken = {p.name for p in world.people} | {p.name for p in practice_world(world).people}
        parts["lookups"] = documents_token_cache(
            tokenizer, "lookups", lookup_documents(args.lookup_documents, seed=0, exclude=taken)
        )
    if args.lists:
        parts["lists"] = documents_token_cache(
            tokenizer, f"lists-{world.seed}", fact_lists(world, "sft", args.list_documents)
        )
    if args.tables:
        tables = fact_lists(world, "heldout", args.list_documents, formats={"colon": 0.5, "table": 0.5})
        parts["tables"] = documents_token_cache(tokenizer, f"heldout-tables-{world.seed}", tables)
    if args.copy:
        vocabulary = common_tokens(stories, 1000, exclude=[eot])
        parts["copy"] = copy_sequences(vocabulary, 4_000_000, eot, span=(10, 60), seed=0)
    shares = {
        "biographies": args.biographies,
        "reading": args.reading,
        "lookups": args.lookups,
        "lists": args.lists,
        "tables": args.tables,
        "copy": args.copy,
    }
    shares = {k: v for k, v in shares.items() if k in parts}
    shares["stories"] = 1.0 - sum(shares.values())
    names = list(parts)
    fade = (
        {names.index("copy"): (args.copy_fade * args.grad_accum, args.copy_floor)}
        if args.copy and args.copy_fade
        else {}
    )
    ramp = {
        names.index(name): (start * args.grad_accum, max(1, args.lookups_ramp * args.grad_accum))
        for name, start in (("lookups", args.lookups_start), ("tables", args.tables_start))
        if name in parts and start
    }
    return [parts[n] for n in names], [shares[n] for n in names], fade, ramp, shares, hashes


def training_probes(tokenizer, world, copy_rows, n: int = 50) -> dict:
    """What the run logs at every evaluation: the copy score, in-context lookups (bare and with the
    answer begun) and the recall of held-out people's home towns (knowledge the reading must not cost)."""
    exclude = {p.name for p in world.people}
    bare, started = (in_context_facts(n, seed=11, exclude=exclude, start_answer=s) for s in (False, True))
    heldout = world.split("heldout")[:n]

    def lookups(model, items):
        return exact_match(complete(model, tokenizer, [f["prompt"] for f in items]), items)

    return {
        "copy_score": lambda m: copy_score(m, copy_rows),
        "in_context": lambda m: lookups(m, bare),
        "in_context_started": lambda m: lookups(m, started),
        "heldout_city": lambda m: fact_recall(m, tokenizer, heldout, ("birth_city",))["accuracy"]["birth_city"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Pretrain the reference base model on its mixture; write the fp16 artefact and its card. "
        "Resumes from OUT_DIR/checkpoint.pt."
    )
    add_config_arguments(parser)
    parser.add_argument("--tokenizer", type=Path, default=None, help=f"default: data/artefacts/{BASE_TOKENIZER}")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--biographies", type=float, default=0.25, help="share of windows from the world's biographies")
    parser.add_argument("--reading", type=float, default=0.1, help="share from documents about invented people")
    parser.add_argument("--reading-documents", type=int, default=60_000)
    parser.add_argument(
        "--lookups", type=float, default=0.15, help="share from dense lookups: several invented people, then questions"
    )
    parser.add_argument("--lookup-documents", type=int, default=40_000)
    parser.add_argument(
        "--lookups-start",
        type=int,
        default=500,
        help="steps before the lookups join the mixture (0: from the start); copying forms first without them",
    )
    parser.add_argument(
        "--lookups-ramp", type=int, default=250, help="steps over which the lookups rise to their share"
    )
    parser.add_argument(
        "--lists", type=float, default=0.05, help="share from lists of facts about the fine-tuning people"
    )
    parser.add_argument("--list-documents", type=int, default=20_000)
    parser.add_argument(
        "--tables",
        type=float,
        default=0.05,
        help="share from tables and 'name: value' lists of the held-out people's facts (never questions)",
    )
    parser.add_argument(
        "--tables-start",
        type=int,
        default=0,
        help="steps before the tables join the mixture (0: from the start; they rise over --lookups-ramp steps)",
    )
    parser.add_argument("--copy", type=float, default=0.15, help="share from copy sequences of random ordinary tokens")
    parser.add_argument(
        "--copy-fade", type=int, default=1500, help="steps over which the copy share falls to its floor (0: never)"
    )
    parser.add_argument(
        "--copy-floor", type=float, default=0.33, help="the fraction of the copy share kept after it has faded"
    )
    parser.add_argument("--probe-people", type=int, default=None, help="people per split whose facts the card measures")
    parser.add_argument("--n-eval", type=int, default=300, help="questions per few-shot and in-context measure")
    parser.add_argument("--out", type=Path, default=None, help=f"default: data/artefacts/{BASE_MODEL}")
    parser.set_defaults(
        out_dir="runs/base",
        position="rope",
        smear_keys=True,
        conv_width=8,
        context_length=512,
        batch_size=16,
        lr=2e-3,
        warmup_steps=100,
        max_steps=3200,
        eval_every=250,
        eval_batches=10,
        checkpoint_every=100,
        sample_every=500,
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if (
        min(args.biographies, args.reading, args.lookups, args.lists, args.tables, args.copy) < 0
        or args.biographies + args.reading + args.lookups + args.lists + args.tables + args.copy >= 1
    ):
        print(
            "error: the shares of --biographies, --reading, --lookups, --lists, --tables and --copy must be >= 0 "
            "and leave room for the stories",
            file=sys.stderr,
        )
        return 1
    try:
        tokenizer = Tokenizer.load(args.tokenizer or data_dir() / "artefacts" / BASE_TOKENIZER)
        world = make_world(args.world_seed)
        cfg = config_from_arguments(args, tokenizer.n_vocab)
        sources, weights, fade, ramp, shares, hashes = mixture(args, tokenizer, world)
        eot = tokenizer.special_tokens[ENDOFTEXT]
        probe_rows = repeated_sequences(common_tokens(sources[0], 1000, exclude=[eot]), 16, 60, eot, seed=123)
        trainer = Trainer(
            cfg,
            sources,
            token_cache(tokenizer, "val"),
            tokenizer_id=tokenizer_fingerprint(tokenizer),
            train_weights=weights if len(sources) > 1 else None,
            fade=fade,
            ramp=ramp,
            probes=training_probes(tokenizer, world, probe_rows),
        )
        resumed_at = trainer.step if trainer.resume() else None
        if resumed_at is not None:
            print(f"resumed from {trainer.out / CHECKPOINT} at step {resumed_at}")
        trainer.fit(decode=tokenizer.decode, sample_prompt=eot)
    except (TrainingError, ValueError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    out = args.out or data_dir() / "artefacts" / BASE_MODEL
    size = save_model(trainer.model, out, tokenizer_id=tokenizer_fingerprint(tokenizer))
    t0 = time.perf_counter()
    model = load_model(out, verify=False)  # measure what ships: the fp16 weights, back in fp32
    load_seconds = time.perf_counter() - t0
    torch.manual_seed(0)
    val_loss = evaluate_loss(model, token_cache(tokenizer, "val"), 32, min(256, model.config.context_length), 20)
    first, second = copy_losses(
        model, repeated_sequences(common_tokens(sources[0], 1000, exclude=[eot]), 32, 60, eot, seed=7)
    )
    metrics: dict = {
        "parameters": model.num_parameters(),
        "file_bytes": size,
        "model_sha256": file_sha256(out),
        "load_seconds": round(load_seconds, 3),
        "steps": trainer.step,
        "resumed_at_step": resumed_at,
        "tokens_seen": trainer.step * trainer.tokens_per_step,
        "mixture": {k: round(v, 4) for k, v in shares.items()},
        "copy_fade_steps": args.copy_fade,
        "copy_floor": args.copy_floor,
        "lookups_start_step": args.lookups_start if args.lookups else None,
        "lookups_ramp_steps": args.lookups_ramp if args.lookups and args.lookups_start else None,
        "tables_start_step": args.tables_start if args.tables else None,
        "val_loss_tinystories": round(val_loss, 4),
        "copy_loss_first": round(first, 4),
        "copy_loss_second": round(second, 4),
        "recall": {},
    }
    for split in ("sft", "heldout", "retrieval"):
        result = fact_recall(model, tokenizer, world.split(split)[: args.probe_people])
        metrics["recall"][split] = {a: round(v, 4) for a, v in result["accuracy"].items()}
    metrics["guess_most_common"] = {a: round(world.most_common(a, "retrieval")[1], 4) for a in PROBED}
    questions = fact_questions(world, "heldout")
    random.Random(0).shuffle(questions)
    questions, pool = questions[: args.n_eval], fact_questions(world, "sft")
    metrics["few_shot_heldout"] = {}
    for shots in SHOTS:
        scores = [
            exact_match(complete(model, tokenizer, few_shot_prompts(questions, pool, shots, seed=s)), questions)
            for s in (0, 1)
        ]
        metrics["few_shot_heldout"][str(shots)] = round(float(np.mean(scores)), 4)
    for key, begun in (("in_context_facts", False), ("in_context_facts_started", True)):
        facts = in_context_facts(args.n_eval, exclude={p.name for p in world.people}, start_answer=begun)
        metrics[key] = round(exact_match(complete(model, tokenizer, [f["prompt"] for f in facts]), facts), 4)
    log = trainer.out / METRICS
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    metrics["copy_score_curve"] = [[r["step"], round(r["copy_score"], 4)] for r in rows if "copy_score" in r]
    metrics["probe_curves"] = {
        name: [[r["step"], round(r[name], 4)] for r in rows if name in r]
        for name in ("in_context", "in_context_started", "heldout_city")
    }
    # the time spent training, over every session that contributed to the run (each step is logged once); a step
    # slower than ten times the median was a pause (a stopped or starved process) and counts as a median step
    seconds = [trainer.tokens_per_step / r["tokens_per_second"] for r in rows]
    median = float(np.median(seconds)) if seconds else 0.0
    metrics["train_seconds"] = round(sum(s if s <= 10 * median else median for s in seconds), 1)
    samples = []
    for k, prompt in enumerate(SAMPLE_PROMPTS):
        ids = torch.tensor([[eot] + tokenizer.encode(prompt)])
        out_ids = generate(
            model,
            ids,
            min(120, model.config.context_length - ids.size(1)),
            temperature=0.8,
            top_k=50,
            generator=torch.Generator().manual_seed(k),
        )
        samples.append(prompt + tokenizer.decode([i for i in out_ids[0, ids.size(1) :].tolist() if i != eot]))
    metrics["samples"] = samples
    data = {**hashes, "tokenizer": tokenizer_fingerprint(tokenizer)}
    finish(out, module="base_model", argv=argv, data=data, metrics=metrics, started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
