"""The reference base model of Labs 06–09: the course GPT pretrained on TinyStories mixed with the
fictional world's biographies, stored in fp16 with its card. The defaults make the shipped model::

    python -m course_utils.recipes.base_model            # runs/base, then data/artefacts/base_model.pt

The run resumes from ``OUT_DIR/checkpoint.pt`` when it was cut off. The card records the validation
loss, how many facts of each split of the world the model completes (against always guessing the
commonest value), samples, the file's size and hash, and its load time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..artefacts import file_sha256, load_model, save_model
from ..data import documents_token_cache, tinystories_sha256, token_cache, tokenizer_fingerprint
from ..lab import data_dir
from ..model import generate
from ..tokenizer import ENDOFTEXT, Tokenizer, TokenizerError
from ..train import CHECKPOINT, Trainer, TrainingError, add_config_arguments, config_from_arguments, evaluate_loss
from ..world import BASE_MODEL, BASE_TOKENIZER, PROBED, fact_recall, make_world
from . import finish

SAMPLE_PROMPTS = ("", "Once upon a time, there was a little", "Tom and Lily went to the park.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Pretrain the reference base model on TinyStories plus the world's biographies; "
        "write the fp16 artefact and its card. Resumes from OUT_DIR/checkpoint.pt."
    )
    add_config_arguments(parser)
    parser.add_argument("--tokenizer", type=Path, default=None, help=f"default: data/artefacts/{BASE_TOKENIZER}")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument(
        "--world-fraction", type=float, default=0.3, help="share of training windows drawn from the world's biographies"
    )
    parser.add_argument(
        "--probe-people", type=int, default=None, help="people per split whose facts the card measures (default: all)"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"default: data/artefacts/{BASE_MODEL}")
    parser.set_defaults(out_dir="runs/base", max_steps=1500, eval_every=250, eval_batches=10, sample_every=250)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if not 0 <= args.world_fraction < 1:
        print(f"error: --world-fraction {args.world_fraction}: use a share in [0, 1)", file=sys.stderr)
        return 1
    try:
        tokenizer = Tokenizer.load(args.tokenizer or data_dir() / "artefacts" / BASE_TOKENIZER)
        world = make_world(args.world_seed)
        cfg = config_from_arguments(args, tokenizer.n_vocab)
        mixture = [
            token_cache(tokenizer, "train"),
            documents_token_cache(tokenizer, f"world-{world.seed}", world.pretraining_documents()),
        ]
        trainer = Trainer(
            cfg,
            mixture,
            token_cache(tokenizer, "val"),
            tokenizer_id=tokenizer_fingerprint(tokenizer),
            train_weights=[1 - args.world_fraction, args.world_fraction],
        )
        resumed_at = trainer.step if trainer.resume() else None
        if resumed_at is not None:
            print(f"resumed from {trainer.out / CHECKPOINT} at step {resumed_at}")
        trainer.fit(decode=tokenizer.decode, sample_prompt=tokenizer.special_tokens[ENDOFTEXT])
    except (TrainingError, ValueError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    out = args.out or data_dir() / "artefacts" / BASE_MODEL
    size = save_model(trainer.model, out, tokenizer_id=tokenizer_fingerprint(tokenizer))
    t0 = time.perf_counter()
    model = load_model(out, verify=False)  # measure what ships: the fp16 weights, back in fp32
    load_seconds = time.perf_counter() - t0
    torch.manual_seed(0)
    val_loss = evaluate_loss(model, token_cache(tokenizer, "val"), 32, model.config.context_length, 20)
    metrics: dict = {
        "parameters": model.num_parameters(),
        "file_bytes": size,
        "model_sha256": file_sha256(out),
        "load_seconds": round(load_seconds, 3),
        "steps": trainer.step,
        "resumed_at_step": resumed_at,
        "tokens_seen": trainer.step * trainer.tokens_per_step,
        "world_fraction": args.world_fraction,
        "val_loss_tinystories": round(val_loss, 4),
        "recall": {},
    }
    for split in ("sft", "heldout", "retrieval"):
        result = fact_recall(model, tokenizer, world.split(split)[: args.probe_people])
        metrics["recall"][split] = {a: round(v, 4) for a, v in result["accuracy"].items()}
    metrics["guess_most_common"] = {a: round(world.most_common(a, "retrieval")[1], 4) for a in PROBED}
    eot = tokenizer.special_tokens[ENDOFTEXT]
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
    data = {
        "tinystories_train": tinystories_sha256("train"),
        "world_pretraining": world.pretraining_sha256(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    finish(out, module="base_model", argv=argv, data=data, metrics=metrics, started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
