"""The course tokenizer, and the base model's tokenizer (``--world-seed``): byte-level BPE trained with
rustbpe on the training stories (plus the world's pretraining biographies). Training is deterministic
and takes seconds, so a rerun rebuilds the file exactly::

    python -m course_utils.recipes.tokenizer                     # data/artefacts/tokenizer.json
    python -m course_utils.recipes.tokenizer --world-seed 0      # data/artefacts/base_tokenizer.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..data import tinystories, tinystories_sha256
from ..lab import data_dir
from ..tokenizer import COURSE_VOCAB_SIZE, bytes_per_token, train_bpe_fast
from ..world import BASE_TOKENIZER, make_world
from . import finish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train the course tokenizer on the TinyStories subset (rustbpe); write it and its card."
    )
    parser.add_argument("--vocab-size", type=int, default=COURSE_VOCAB_SIZE)
    parser.add_argument(
        "--world-seed",
        type=int,
        default=None,
        help="also train on the pretraining biographies of the fictional world with this seed "
        "(the base model's tokenizer)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"default: data/artefacts/tokenizer.json, or {BASE_TOKENIZER} with --world-seed",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = args.out or data_dir() / "artefacts" / ("tokenizer.json" if args.world_seed is None else BASE_TOKENIZER)
    train, val = tinystories("train"), tinystories("val")
    hashes = {"tinystories_train": tinystories_sha256("train")}
    extra: list[str] = []
    if args.world_seed is not None:
        world = make_world(args.world_seed)
        extra = world.pretraining_documents()
        hashes["world_pretraining"] = world.pretraining_sha256()
    name = f"course-bpe-{args.vocab_size}" + ("" if args.world_seed is None else f"-world{args.world_seed}")
    t0 = time.perf_counter()
    tok = train_bpe_fast(train + extra, args.vocab_size, name=name)
    seconds = time.perf_counter() - t0
    tok.save(out)
    metrics = {
        "n_vocab": tok.n_vocab,
        "bytes_per_token_val": round(bytes_per_token(tok, val), 4),
        "bytes_per_token_train": round(bytes_per_token(tok, train), 4),
        "train_seconds": round(seconds, 2),
    }
    if args.world_seed is not None:
        retrieval = [bio for p in world.split("retrieval") for bio in p.biographies]
        metrics["bytes_per_token_world_pretraining"] = round(bytes_per_token(tok, extra), 4)
        metrics["bytes_per_token_world_retrieval"] = round(bytes_per_token(tok, retrieval), 4)
    finish(out, module="tokenizer", argv=argv, data=hashes, metrics=metrics, started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
