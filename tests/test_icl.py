"""Lab 07's pieces: rotary positions, the reading mixture, copy and few-shot measures, and bad input."""

import numpy as np
import pytest
import torch

from course_utils import data, icl, world
from course_utils.model import GPT, GPTConfig, KVCache, apply_rope, generate, rope_angles
from course_utils.train import TrainConfig, Trainer

VOCAB = 97
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 20_000).astype(np.uint16)


def test_rotary_scores_depend_only_on_the_offset():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    cos, sin = rope_angles(16, 128)

    def score(m, n):
        return (apply_rope(q, cos[m : m + 1], sin[m : m + 1]) * apply_rope(k, cos[n : n + 1], sin[n : n + 1])).sum()

    for offset in (0, 3, 40):
        scores = torch.stack([score(m + offset, m) for m in (0, 17, 60, 87)])
        assert torch.allclose(scores, scores[0].expand_as(scores), atol=1e-5), (offset, scores)
    assert not torch.isclose(score(10, 7), score(10, 3))  # another offset, another score
    assert torch.allclose(apply_rope(q, cos[:1], sin[:1]), q)  # position 0 is not turned


def test_a_rotary_model_generates_the_same_with_and_without_the_cache():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, context_length=32, n_layer=2, n_head=2, n_embd=32, position="rope")).eval()
    assert not hasattr(model, "wpe") and model.position_parameters() == 0
    prompt = torch.randint(0, VOCAB, (2, 7))
    assert torch.equal(
        generate(model, prompt, 12, temperature=0), generate(model, prompt, 12, temperature=0, use_cache=False)
    )
    with pytest.raises(ValueError, match="must be even"):
        GPTConfig(n_embd=30, n_head=2, position="rope")
    with pytest.raises(ValueError, match="'learned' or 'rope'"):
        GPTConfig(position="alibi")


def test_short_convolutions_look_back_only_and_keep_the_cache_exact():
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=VOCAB, context_length=32, n_layer=2, n_head=2, n_embd=32, position="rope", conv_width=4
    )
    model = GPT(config).eval()
    with torch.no_grad():
        for block in model.h:
            block.conv.weight.normal_(0, 0.5)  # trained-looking weights: the zero start is the identity
    ids = torch.randint(0, VOCAB, (2, 15))
    full, _ = model(ids)
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % VOCAB
    after, _ = model(changed)
    assert torch.allclose(after[:, :9], full[:, :9], atol=1e-6) and not torch.allclose(after[:, 9:], full[:, 9:])
    cache = KVCache(config, 2, 15)
    pieces = [model(ids[:, a:b], cache=cache)[0] for a, b in ((0, 6), (6, 7), (7, 8), (8, 15))]
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)
    assert torch.equal(
        generate(model, ids[:, :5], 10, temperature=0), generate(model, ids[:, :5], 10, use_cache=False, temperature=0)
    )
    with pytest.raises(ValueError, match="conv_width"):
        GPTConfig(conv_width=1)


def test_a_faded_part_of_the_mixture_disappears_and_resumes_exactly():
    ones, zeros = np.ones(1000, dtype=np.uint16), np.zeros(1000, dtype=np.uint16)
    sampler = data.BatchSampler([ones, zeros], 64, 8, seed=0, weights=[0.5, 0.5], fade={1: 10})
    shares = [float((sampler.next()[0] == 0).float().mean()) for _ in range(12)]
    assert shares[0] > 0.3 and shares[-1] == shares[-2] == 0.0  # after 10 batches only the first array is left
    again = data.BatchSampler([ones, zeros], 64, 8, seed=0, weights=[0.5, 0.5], fade={1: 10})
    for _ in range(5):
        again.next()
    resumed = data.BatchSampler([ones, zeros], 64, 8, seed=1, weights=[0.5, 0.5], fade={1: 10})
    resumed.load_state_dict(again.state_dict())
    assert torch.equal(resumed.next()[0], again.next()[0]) and resumed.draws == again.draws == 6
    with pytest.raises(ValueError, match="fade="):
        data.BatchSampler([ones, zeros], 4, 8, weights=[0.5, 0.5], fade={2: 10})
    with pytest.raises(ValueError, match="fade="):
        data.BatchSampler([ones, zeros], 4, 8, weights=[0.5, 0.5], fade={1: (10, 1.5)})


def test_a_part_faded_to_a_floor_keeps_that_share():
    ones, zeros = np.ones(1000, dtype=np.uint16), np.zeros(1000, dtype=np.uint16)
    sampler = data.BatchSampler([ones, zeros], 2000, 8, seed=0, weights=[0.5, 0.5], fade={1: (10, 0.2)})
    shares = [float((sampler.next()[0] == 0).float().mean()) for _ in range(14)]
    assert shares[0] > 0.4 and all(0.13 < s < 0.2 for s in shares[10:])  # weights 0.5 and 0.1: one in six


def test_copy_sequences_repeat_their_span():
    vocabulary = np.arange(100, 200)
    tokens = data.copy_sequences(vocabulary, 2_000, separator=5, span=(3, 9), seed=0)
    rows = np.split(tokens, np.flatnonzero(tokens == 5))[1:]
    assert len(rows) > 10 and all(
        len(r) % 2 == 1 and np.array_equal(r[1 : 1 + len(r) // 2], r[1 + len(r) // 2 :]) for r in rows
    )
    assert set(tokens[tokens != 5].tolist()) <= set(vocabulary.tolist())
    assert list(data.common_tokens(np.array([3, 3, 3, 1, 1, 2, 7]), 2, exclude=[3])) == [1, 2]


def test_probes_are_logged_without_changing_the_run(tmp_path):
    model = GPTConfig(vocab_size=VOCAB, context_length=16, n_layer=1, n_head=2, n_embd=16)
    cfg = TrainConfig(
        model=model,
        out_dir=str(tmp_path / "a"),
        batch_size=4,
        max_steps=4,
        eval_every=2,
        eval_batches=1,
        checkpoint_every=0,
        device="cpu",
    )
    plain = [r["loss"] for r in Trainer(cfg, TOKENS, TOKENS).fit(progress=False)]
    rows = icl.repeated_sequences(np.arange(10, 60), 4, 6, separator=0)
    probed = Trainer(
        TrainConfig(**{**vars(cfg), "out_dir": str(tmp_path / "b")}),
        TOKENS,
        TOKENS,
        probes={"copy_score": lambda m: icl.copy_score(m, rows)},
    )
    history = probed.fit(progress=False)
    assert [r["loss"] for r in history] == plain
    assert [("copy_score" in r) for r in history] == [False, True, False, True] and history[1]["copy_score"] > 0


def test_a_model_that_copies_scores_near_zero_and_one_that_does_not_near_one():
    rows = icl.repeated_sequences(np.arange(10, 60), 8, 12, separator=0, seed=1)

    class Copier(torch.nn.Module):  # looks back one span and predicts what came next there
        config = GPTConfig(vocab_size=VOCAB, context_length=32, n_layer=1, n_head=1, n_embd=8)

        def parameters(self):
            return iter([torch.zeros(1)])

        def forward(self, idx):
            logits = torch.zeros(*idx.shape, VOCAB)
            for t in range(idx.size(1)):
                if t >= 12:
                    logits[torch.arange(idx.size(0)), t, idx[:, t - 11]] = 20.0
            return logits, None

    assert icl.copy_score(Copier(), rows) < 0.2
    uniform = GPT(GPTConfig(vocab_size=VOCAB, context_length=32, n_layer=1, n_head=1, n_embd=8))
    assert icl.copy_score(uniform, rows) == pytest.approx(1.0, abs=0.05)


def test_mixture_documents_are_deterministic_and_keep_held_out_people_out():
    w = world.make_world(0)
    names = {p.name for p in w.people}
    fresh = world.fresh_people(50, seed=3, exclude=names)
    assert len({p.name for p in fresh}) == 50 and not names & {p.name for p in fresh}
    docs = world.reading_documents(30, seed=0, exclude=names)
    assert docs == world.reading_documents(30, seed=0, exclude=names) and all(docs)
    lookups = 0
    for doc in docs:  # every bare answer (dates aside, written differently) can be read off what came before
        head, _, tail = doc.partition("\nQ: ")
        answers = [line[3:] for line in tail.split("\n") if line.startswith("A: ") and not line.endswith(".")]
        assert all(a in head for a in answers if not a[-4:].isdigit()), doc
        listed = max(head.count(t.split("}")[1].split("{")[0]) for t in world.ANSWER_TEMPLATES.values())
        lookups += listed >= 3 and len(answers) >= 2  # several people with one fact each, several asked
    assert lookups >= 3
    dense = world.lookup_documents(30, seed=0, exclude=names)
    assert dense == world.lookup_documents(30, seed=0, exclude=names) and not any(n in d for d in dense for n in names)
    for doc in dense:  # every question is about someone stated above, and at least half of them are asked
        facts, *qa = doc.split("\n")
        asked = [line for line in qa if line.startswith("Q: ")]
        answers = [line[3:].rstrip(".") for line in qa if line.startswith("A: ")]
        assert len(asked) == len(answers) >= max(1, facts.count(". ") // 2)
        assert all(a.split(" ")[-1] in facts for a in answers)
    lists = world.fact_lists(w, "sft", 40)
    heldout = {p.name for p in w.split("heldout")}
    assert not any(name in doc for doc in lists for name in heldout)
    assert any(doc.startswith("Q: ") for doc in lists) and any(doc.startswith("| name |") for doc in lists)
    tables = world.fact_lists(w, "heldout", 40, formats={"colon": 0.5, "table": 0.5})
    assert any(name in doc for doc in tables for name in heldout) and not any("Q: " in doc for doc in tables)
    with pytest.raises(ValueError, match="must stay out of pretraining"):
        world.fact_lists(w, "heldout", 5)
    with pytest.raises(ValueError, match="unknown list formats"):
        world.fact_lists(w, "sft", 5, formats={"prose": 1.0})


def test_few_shot_prompts_and_their_bad_input():
    assert (
        icl.few_shot_prompt([("Where was A born?", "Brask")], "Where was B born?")
        == "Q: Where was A born?\nA: Brask\n\nQ: Where was B born?\nA:"
    )
    items = [{"question": "Where was B born?", "answer": "Selvin", "name": "B", "attribute": "birth_city"}]
    pool = [{"question": "Where was A born?", "answer": "Brask", "name": "A", "attribute": "birth_city"}]
    assert icl.few_shot_prompts(items, pool, 1)[0].startswith("Q: Where was A born?")
    with pytest.raises(ValueError, match="2 shots asked for, but only 1"):
        icl.few_shot_prompts(items, pool, 2)
    with pytest.raises(ValueError, match="question is empty"):
        icl.few_shot_prompt([], " ")
    w = world.make_world(0)
    model = GPT(GPTConfig(vocab_size=4096, context_length=32, n_layer=1, n_head=1, n_embd=8))
    from course_utils.lab import data_dir
    from course_utils.tokenizer import Tokenizer

    tok = Tokenizer.load(data_dir() / "artefacts" / world.BASE_TOKENIZER)
    with pytest.raises(ValueError, match="empty"):
        icl.complete(model, tok, [""])
    with pytest.raises(ValueError, match="no room"):
        icl.complete(model, tok, [" ".join(p.name for p in w.people[:20])])
    assert icl.exact_match(["Brask, in Arvenia", "Selvin"], [{"answer": "Brask"}, {"answer": "Brask"}]) == 0.5


def test_in_context_facts_ask_about_someone_in_the_prompt_and_take_a_sentence_answer():
    bare, started = (icl.in_context_facts(20, seed=4, start_answer=s) for s in (False, True))
    for b, s in zip(bare, started, strict=True):
        stated = f"{b['name']} was born in {b['answer']}."
        assert stated in b["prompt"] and b["prompt"].endswith("\nA:") and b["answer"] == s["answer"]
        assert s["prompt"] == b["prompt"] + f" {b['name']} was born in" and "lead" not in s
    item = bare[0]
    replies = [
        f"{item['name']} was born in {item['answer']}.",  # the whole sentence
        item["answer"],
        f"{item['name']} was born in Nowhere.",
        f"Someone Else was born in {item['answer']}.",  # the right city, said of another person
        f"I think {item['answer']}",
    ]
    assert [icl.exact_match([r], [item]) for r in replies] == [1.0, 1.0, 0.0, 0.0, 0.0]


def _keep_articles(text):
    text = text.lower().replace("&", " and ")
    return " ".join("".join(ch for ch in text if ch.isalnum() or ch.isspace()).split())


def _double_spaces(text):
    return world.normalise_answer(text).replace(" ", "  ")


def _with_first_tokens(losses):
    half = losses.size(1) // 2
    return (losses[:, half:].mean() / losses[:, :half].mean()).item()


@pytest.mark.parametrize(
    "exercise, fn, advice",
    [
        ("few_shot_prompt", lambda ex, q: icl.few_shot_prompt(ex, q) + " ", "nothing after it"),
        ("few_shot_prompt", lambda ex, q: icl.few_shot_prompt(ex, q).replace("\n\n", "\n"), "empty line"),
        ("normalise_answer", _keep_articles, "articles"),
        ("normalise_answer", _double_spaces, "single spaces"),
        ("copy_ratio", _with_first_tokens, "leave out the first token"),
        ("copy_ratio", lambda losses: 1 / icl.copy_ratio(losses), "not the other way round"),
    ],
)
def test_lab07_checks_give_specific_advice_for_likely_mistakes(exercise, fn, advice):
    from course_utils.checks import FAILED, evaluate

    verdict = evaluate(exercise, fn)
    assert verdict.status == FAILED and advice in verdict.message, verdict.message


@pytest.mark.parametrize(
    "exercise, fn",
    [
        ("few_shot_prompt", icl.few_shot_prompt),
        ("normalise_answer", world.normalise_answer),
        ("copy_ratio", icl.copy_ratio),
    ],
)
def test_lab07_checks_pass_the_reference(exercise, fn):
    from course_utils.checks import PASSED, evaluate

    assert evaluate(exercise, fn).status == PASSED


def test_lookup_rows_ask_every_stated_key_for_its_value():
    ids, targets = icl.lookup_rows(5, pairs=4, key_length=3, gap=2, generator=torch.Generator().manual_seed(0))
    assert ids.shape == targets.shape == (5, 2 * 4 * 6 + 1)
    for row, target in zip(ids.tolist(), targets.tolist(), strict=True):
        stated = {tuple(row[k : k + 3]): row[k + 5] for k in range(0, 24, 6)}
        blocks = [*range(0, 24, 6), *range(25, 49, 6)]  # four stated, the separator at 24, four asked
        assert row[24] == 1 and all(row[k + 3 : k + 5] == [200, 201] for k in blocks)
        asked = [(k, t) for k, t in enumerate(target) if t >= 0]
        assert len(asked) == 4 and {t for _, t in asked} == set(stated.values())
        for at, value in asked:  # the position before the value, after the key and the gap
            assert row[at + 1] == value and stated[tuple(row[at - 4 : at - 1])] == value

    class Oracle(torch.nn.Module):  # predicts every next token perfectly
        def forward(self, x):
            logits = torch.full((*x.shape, 512), -1.0)
            logits[:, :-1].scatter_(2, x[:, 1:, None], 1.0)
            return logits, None

    assert icl.lookup_accuracy(Oracle(), ids, targets) == 1.0
    assert (
        icl.lookup_accuracy(
            GPT(GPTConfig(vocab_size=512, context_length=64, n_layer=1, n_head=1, n_embd=8)), ids, targets
        )
        < 0.2
    )


def test_a_lookup_run_reports_its_accuracy_curve(capsys):
    config = GPTConfig(vocab_size=512, context_length=25, n_layer=1, n_head=2, n_embd=16, conv_width=4)
    curve = icl.train_lookup(config, 3, batch_size=4, every=2, pairs=2, key_length=3, gap=2)
    assert [s for s, _ in curve] == [2, 3] and all(0 <= a <= 1 for _, a in curve)
    assert icl.main(["--steps", "1", "--key-length", "2", "--gap", "1", "--widths", "0"]) == 0
    assert "seed 0, conv_width 0: accuracy" in capsys.readouterr().out


def test_a_held_back_part_of_the_mixture_starts_late_then_rises():
    ones, zeros = np.ones(1000, dtype=np.uint16), np.zeros(1000, dtype=np.uint16)
    sampler = data.BatchSampler([ones, zeros], 2000, 8, seed=0, weights=[0.5, 0.5], ramp={1: (4, 4)})
    shares = [float((sampler.next()[0] == 0).float().mean()) for _ in range(10)]
    # held back for four batches, then a quarter, a half, three quarters of its weight (shares 0.2, 0.33,
    # 0.43), then all of it
    assert shares[:4] == [0.0] * 4 and 0.15 < shares[4] < 0.25 and 0.45 < shares[-1] < 0.55
    assert shares[4] < shares[5] < shares[6] < shares[7]
    resumed = data.BatchSampler([ones, zeros], 2000, 8, seed=3, weights=[0.5, 0.5], ramp={1: (4, 4)})
    resumed.load_state_dict(sampler.state_dict())
    again = data.BatchSampler([ones, zeros], 2000, 8, seed=0, weights=[0.5, 0.5], ramp={1: (4, 4)})
    for _ in range(10):
        again.next()
    assert torch.equal(resumed.next()[0], again.next()[0])
    with pytest.raises(ValueError, match="ramp="):
        data.BatchSampler([ones, zeros], 4, 8, weights=[0.0, 0.5], ramp={1: (4, 4)})
    with pytest.raises(ValueError, match="ramp="):
        data.BatchSampler([ones, zeros], 4, 8, weights=[0.5, 0.5], ramp={1: (4, 0)})


def test_shrink_vocabulary_keeps_the_commonest_tokens_and_the_separator():
    tokens = np.array([9, 4, 4, 4, 7, 7, 2, 9, 9, 9, 0], dtype=np.uint16)  # 9 is commonest, then 4, then 7
    lookup = data.shrink_vocabulary(tokens, 4, special=0)
    assert list(lookup[tokens]) == [0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 3]  # 7 and 2 share "rare" (id 2)
    assert lookup.dtype == np.uint16 and len(lookup) == 10
    with pytest.raises(ValueError, match="at least one ordinary token"):
        data.shrink_vocabulary(tokens, 2, special=0)
