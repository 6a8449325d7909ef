"""The training engine: schedule, optimiser groups, exact resume, atomic checkpoints, DDP, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_FLAGS

from course_utils import data
from course_utils import tokenizer as bpe
from course_utils.artefacts import load_checkpoint, save_checkpoint
from course_utils.model import GPTConfig
from course_utils.train import (
    CHECKPOINT_FORMAT,
    TrainConfig,
    Trainer,
    TrainingError,
    configure_optimizer,
    warmup_cosine_lr,
)

VOCAB = 97
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 20_000).astype(np.uint16)


def tiny(out_dir, n_embd: int = 32, **overrides) -> TrainConfig:
    settings = dict(
        out_dir=str(out_dir),
        batch_size=4,
        max_steps=8,
        warmup_steps=2,
        lr=1e-2,
        eval_every=0,
        checkpoint_every=0,
        seed=5,
        device="cpu",
    )
    model = GPTConfig(vocab_size=VOCAB, context_length=16, n_layer=2, n_head=2, n_embd=n_embd)
    return TrainConfig(model=model, **{**settings, **overrides})


def test_warmup_then_cosine():
    lr = [warmup_cosine_lr(s, max_lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1) for s in range(120)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lr[:9], lr[1:10], strict=True))  # rising during warm-up
    assert all(a >= b for a, b in zip(lr[10:109], lr[11:110], strict=True))  # then falling
    assert lr[60] == pytest.approx(0.55) and lr[110] == lr[119] == 0.1


def test_weight_decay_only_on_matrices():
    trainer = Trainer(tiny("/tmp/unused"), TOKENS, TOKENS)
    decay, no_decay = configure_optimizer(trainer.model, 1e-3, 0.1, (0.9, 0.95), "cpu").param_groups
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all(
        names[id(p)].endswith("weight") and "ln" not in names[id(p)] and "wte" not in names[id(p)]
        for p in decay["params"]
    )
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "wte.weight",
        "wpe.weight",
        "ln_f.weight",
        "h.0.attn.c_attn.bias",
    }


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight = Trainer(tiny(tmp_path / "a"), TOKENS, TOKENS)
    losses = [row["loss"] for row in straight.fit(progress=False)]

    first = Trainer(tiny(tmp_path / "b", checkpoint_every=3), TOKENS, TOKENS)
    first.fit(until=3, progress=False)  # checkpoint at step 3
    first.save = lambda: None
    first.fit(until=5, progress=False)  # two more steps, logged but never checkpointed
    del first  # as if the session had dropped
    second = Trainer(tiny(tmp_path / "b"), TOKENS, TOKENS)
    assert second.resume() and second.step == 3
    resumed = [row["loss"] for row in second.fit(progress=False)]
    assert resumed == losses[3:]
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))  # the lost steps are not logged twice
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_killed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 1, "step": 1})

    def dies_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the kernel was stopped mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"format": 1, "step": 2})
    assert load_checkpoint(path, 1)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="damaged"):
        Trainer(tiny(tmp_path), TOKENS, TOKENS).resume()


def test_resuming_another_model_or_tokenizer_is_refused(tmp_path):
    Trainer(tiny(tmp_path, checkpoint_every=1), TOKENS, TOKENS, tokenizer_id="A").fit(until=1, progress=False)
    with pytest.raises(TrainingError, match="another model"):
        Trainer(tiny(tmp_path, n_embd=64), TOKENS, TOKENS, tokenizer_id="A").resume()
    with pytest.raises(TrainingError, match="another tokenizer"):
        Trainer(tiny(tmp_path), TOKENS, TOKENS, tokenizer_id="B").resume()


def test_nan_loss_stops_with_advice(tmp_path):
    trainer = Trainer(tiny(tmp_path), TOKENS, TOKENS)
    forward = trainer.net.forward
    trainer.net.forward = lambda x, y: (lambda out: (out[0], out[1] * float("nan")))(forward(x, y))
    with pytest.raises(TrainingError, match="at step 0.*Lower lr"):
        trainer.fit(progress=False)


def test_corpus_too_short_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lower seq_len"):
        Trainer(tiny(tmp_path), TOKENS[:10], TOKENS)


def test_token_cache_is_rebuilt_when_the_tokenizer_changes(tmp_path, data_dir):
    small = bpe.train_bpe_fast(data.tinystories("train")[:200], 300)
    tokens = data.token_cache(small, "val", cache_dir=tmp_path)
    assert tokens.dtype == np.uint16 and tokens[-1] == small.special_tokens[bpe.ENDOFTEXT]
    assert small.decode(tokens[:50].tolist()) == data.tinystories("val")[0][: len(small.decode(tokens[:50].tolist()))]
    other = bpe.train_bpe_fast(data.tinystories("train")[:200], 320)
    data.token_cache(other, "val", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tinystories-shipped-val-*.bin"))) == 2
    assert len(list(tmp_path.glob("*.tmp"))) == 0


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from course_utils.model import GPTConfig
    from course_utils.train import TrainConfig, Trainer
    tokens = np.random.default_rng(0).integers(0, 97, 20_000).astype(np.uint16)
    model = GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, context_length=16)
    cfg = TrainConfig(model=model, out_dir=sys.argv[1], batch_size=int(sys.argv[2]), max_steps=6, warmup_steps=2,
                      lr=1e-2, eval_every=0, checkpoint_every=0, seed=5, device="cpu")
    trainer = Trainer(cfg, tokens, tokens)
    losses = [row["loss"] for row in trainer.fit(progress=False)]
    if trainer.rank == 0:
        json.dump(losses, open(os.path.join(sys.argv[1], "losses.json"), "w"))
    if trainer.distributed:  # as train.main does: a rank leaving without this can abort the other's gloo pair
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    """
)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), "8"], env=env, capture_output=True, text=True, timeout=300
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "two"),
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[:3000] + "\n...\n" + two.stderr[-1000:]
    single = json.loads((tmp_path / "one" / "losses.json").read_text())
    ddp = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert len(single) == len(ddp) == 6
    assert np.allclose(single, ddp, rtol=1e-4, atol=1e-5), (single, ddp)


def test_out_of_memory_names_the_setting_to_lower(tmp_path):
    trainer = Trainer(tiny(tmp_path), TOKENS, TOKENS)

    def no_memory(x, y):
        raise torch.OutOfMemoryError("CUDA out of memory")

    trainer.net.forward = no_memory
    with pytest.raises(TrainingError, match="lower batch_size and raise grad_accum"):
        trainer.fit(progress=False)


def test_samples_during_training_leave_the_run_unchanged(tmp_path):
    plain = [r["loss"] for r in Trainer(tiny(tmp_path / "a"), TOKENS, TOKENS).fit(progress=False)]
    trainer = Trainer(tiny(tmp_path / "b", sample_every=4), TOKENS, TOKENS)
    sampled = [r["loss"] for r in trainer.fit(progress=False, decode=lambda ids: " ".join(map(str, ids)))]
    assert sampled == plain
    lines = (tmp_path / "b" / "samples.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 4", "step 8"]


def test_hub_source_streams_through_datasets(tmp_path, monkeypatch):
    """The online path, with the hub replaced by a local stream: same calls, same cache logic."""
    import datasets

    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return datasets.Dataset.from_dict(
            {"text": ["Once upon a time.", "The end.", "Not taken."]}
        ).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tok = bpe.Tokenizer.load(data.data_dir() / "artefacts" / "tokenizer.json")
    tokens = data.token_cache(tok, "val", cache_dir=tmp_path, source="hub", n_stories=2)
    assert calls == [("roneneldan/TinyStories", "validation", True)]
    eot = tok.special_tokens[bpe.ENDOFTEXT]
    assert tok.decode(tokens.tolist()) == "Once upon a time.<|endoftext|>The end.<|endoftext|>" and tokens[-1] == eot
    with pytest.raises(ValueError, match="source="):
        data.stories_dataset("train", source="web")


def test_command_line_trains_and_resumes(tmp_path, data_dir, capsys):
    """``python -m course_utils.train`` as a user types it, on the TinyStories subset."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "course_utils.train", "--out-dir", str(out), *TINY_MODEL_FLAGS]
    args += ["--tokenizer", str(data_dir / "artefacts" / "tokenizer.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(args + ["--max-steps", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run(args + ["--max-steps", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout and "step 4: validation loss" in second.stdout
    state = load_checkpoint(out / "checkpoint.pt", CHECKPOINT_FORMAT)
    assert state["config"]["model"]["n_embd"] == 32 and state["config"]["batch_size"] == 4
    from course_utils.train import main

    assert main(args[3:] + ["--max-steps", "2", "--n-head", "3"]) == 1  # 3 heads cannot split 32 dimensions
    assert "n_head=3 must divide n_embd=32" in capsys.readouterr().err


def test_a_checkpoint_from_before_a_config_field_existed_still_resumes(tmp_path):
    Trainer(tiny(tmp_path, checkpoint_every=1), TOKENS, TOKENS).fit(until=1, progress=False)
    path = tmp_path / "checkpoint.pt"
    state = load_checkpoint(path, CHECKPOINT_FORMAT)
    # fields added later, with defaults
    for newer in ("position", "rope_base", "smear_keys", "conv_width", "n_kv_head"):
        del state["model_config"][newer]
    save_checkpoint(path, state)
    trainer = Trainer(tiny(tmp_path), TOKENS, TOKENS)
    assert trainer.resume() and trainer.step == 1
