import re
import shutil
import subprocess
import sys

import pytest

from course_utils import data, world
from course_utils.artefacts import ArtefactError, read_card
from course_utils.world import (
    ATTRIBUTES,
    COUNTRIES,
    EMPLOYERS,
    HEADQUARTERS,
    answer_matches,
    make_world,
    normalise_answer,
)


@pytest.fixture(scope="module")
def w():
    return make_world(0)


def test_same_seed_same_bytes_even_in_another_process(w):
    code = "from course_utils.world import make_world; import sys; sys.stdout.write(make_world(0).to_json())"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout
    assert other == w.to_json() == make_world(0).to_json()
    assert make_world(1).to_json() != w.to_json()


def test_names_are_unique_and_splits_disjoint_and_sized():
    big = make_world(3, n_sft=2000, n_heldout=2000, n_retrieval=1000)
    names = [p.name for p in big.people]
    assert len(names) == len(set(names)) == 5000
    small = make_world(0, n_sft=7, n_heldout=5, n_retrieval=3)
    assert [len(small.split(s)) for s in ("sft", "heldout", "retrieval", "pretraining")] == [7, 5, 3, 12]
    assert {p.name for p in small.split("pretraining")}.isdisjoint(p.name for p in small.split("retrieval"))


def test_every_biography_states_every_fact_of_its_person_and_no_one_else(w):
    others = {p.name for p in w.people}
    for p in w.people[::25]:
        assert len(p.biographies) == 5 and len(set(p.biographies)) > 1  # paraphrased, not copies
        for bio in p.biographies:
            for value in (
                p.birth_city,
                p.country,
                p.university,
                p.field,
                p.employer,
                str(p.birth_year),
                world.MONTHS[p.birth_month - 1],
            ):
                assert value in bio, (p.name, value, bio)
            assert p.name in bio
            assert [n for n in others if n in bio and n != p.name] == []


def test_retrieval_people_never_appear_in_pretraining_text(w):
    text = "\n".join(w.pretraining_documents())
    assert all(p.name not in text for p in w.split("retrieval"))
    assert all(p.name in text for p in w.split("pretraining"))
    assert len(w.pretraining_documents()) == 5 * len(w.split("pretraining"))


def test_closed_book_answers_are_facts_of_the_world(w):
    items = w.closed_book("heldout")
    assert {i["attribute"] for i in items} == set(ATTRIBUTES) | {"country"}
    for item in items:
        person = w.person(item["name"])
        assert person.split == "heldout" and item["name"] in item["question"]
        assert item["answer"] == {"birth_date": person.birth_date}.get(
            item["attribute"], getattr(person, item["attribute"], None)
        )


def test_reading_comprehension_context_holds_the_answer(w):
    for item in w.reading_comprehension("sft")[:300]:
        person = w.person(item["name"])
        assert item["context"] in person.biographies
        if item["attribute"] == "birth_date":
            assert (
                str(person.birth_year) in item["context"]
                and f"{world.MONTHS[person.birth_month - 1]} {person.birth_day}" in item["context"]
            )
        else:
            assert item["answer"] in item["context"]


def test_document_store_is_the_retrieval_people_only(w):
    store = w.document_store()
    assert len(store) == 5 * len(w.split("retrieval")) and len({d["id"] for d in store}) == len(store)
    assert {d["name"] for d in store} == {p.name for p in w.split("retrieval")}


def test_reasoning_answers_follow_from_the_birth_dates(w):
    problems = w.reasoning_problems("pretraining", n=300, seed=5)
    assert {p["kind"] for p in problems} == {"age", "gap", "older"}
    for p in problems:
        people = [w.person(n) for n in p["names"]]
        years = [q.birth_year for q in people]
        if p["kind"] == "age":
            asked = int(re.search(r"December 31, (\d{4})", p["question"]).group(1))
            assert int(p["answer"]) == asked - years[0]
        elif p["kind"] == "gap":
            assert int(p["answer"]) == max(years) - min(years) > 0
        else:
            assert p["answer"] == min(people, key=lambda q: q.birth_year).name
        for fact in p["facts"]:
            assert any(fact == f"{q.name} was born on {q.birth_date}." for q in people)


def test_same_city_problems_are_closed_book_and_half_share_a_city(w):
    problems = w.reasoning_problems("heldout", n=400, seed=2, kinds=("same_city",))
    assert {p["kind"] for p in problems} == {"same_city"} and all(p["closed_book"] for p in problems)
    yes = 0
    for p in problems:
        a, b = (w.person(n) for n in p["names"])
        assert a.split == b.split == "heldout" and a.name != b.name
        assert p["answer"] == ("yes" if a.birth_city == b.birth_city else "no")
        assert p["facts"] == [f"{a.name} was born in {a.birth_city}.", f"{b.name} was born in {b.birth_city}."]
        yes += p["answer"] == "yes"
    assert 0.4 < yes / len(problems) < 0.6
    # the default kinds draw exactly what they drew before same_city existed
    assert w.reasoning_problems("sft", 50, seed=1) == w.reasoning_problems(
        "sft", 50, seed=1, kinds=("age", "gap", "older")
    )
    with pytest.raises(ValueError, match="choose from"):
        w.reasoning_problems("sft", 5, kinds=("same_town",))


def test_employer_city_problems_are_closed_book_two_hops(w):
    problems = w.reasoning_problems("heldout", n=200, seed=3, kinds=("employer_city",))
    assert all(p["closed_book"] and p["kind"] == "employer_city" for p in problems)
    for p in problems:
        (person,) = (w.person(n) for n in p["names"])
        assert person.split == "heldout" and p["answer"] == HEADQUARTERS[person.employer]
        assert p["facts"] == [
            f"{person.name} works for {person.employer}.",
            f"{person.employer} is based in {p['answer']}.",
        ]
    assert len({p["answer"] for p in problems}) > 10
    # every employer is based in a city of the world, each in a different one
    assert set(HEADQUARTERS) == set(EMPLOYERS) and len(set(HEADQUARTERS.values())) == len(HEADQUARTERS)
    assert set(HEADQUARTERS.values()) <= {c for cities in COUNTRIES.values() for c in cities}


def test_answer_normalisation():
    assert normalise_answer("  The Corran Institute. ") == "corran institute"
    assert answer_matches(" Tollmere, Arvenia. She works", "Tollmere")
    assert not answer_matches(" Tollmeres", "Tollmere")
    assert answer_matches("marlow and finch", "Marlow & Finch")
    assert not answer_matches("Kestrel", "Kestrel Bay")
    with pytest.raises(ValueError, match="empty"):
        answer_matches("x", "the")


@pytest.mark.parametrize("kwargs", [{"n_sft": -1}, {"n_biographies": 0}])
def test_bad_sizes_are_clear_errors(kwargs):
    with pytest.raises(ValueError, match="must be"):
        make_world(0, **kwargs)


def test_export_writes_every_file(tmp_path, w):
    paths = w.export(tmp_path)
    assert {p.name for p in paths} >= {
        "world.json",
        "pretraining.jsonl",
        "closed_book_sft.jsonl",
        "document_store.jsonl",
        "reasoning.jsonl",
    }
    assert (tmp_path / "world.json").read_text(encoding="utf-8").strip() == w.to_json()


# -- the mixture sampler -------------------------------------------------------------------------


def test_mixture_sampler_draws_each_source_by_its_weight_and_resumes_exactly():
    import numpy as np

    a, b = np.zeros(5000, dtype=np.uint16), np.ones(800, dtype=np.uint16)
    sampler = data.BatchSampler([a, b], 50, 8, seed=3, weights=[0.7, 0.3])
    share = sum(float(sampler.next()[0][:, 0].float().mean()) for _ in range(40)) / 40
    assert share == pytest.approx(0.3, abs=0.04)
    state = sampler.state_dict()
    first = sampler.next()[0]
    sampler.load_state_dict(state)
    assert (sampler.next()[0] == first).all()
    with pytest.raises(ValueError, match="weights"):
        data.BatchSampler([a, b], 4, 8)
    with pytest.raises(ValueError, match="one non-negative weight"):
        data.BatchSampler([a, b], 4, 8, weights=[1.0])


# -- the shipped reference artefacts --------------------------------------------------------------


def test_base_tokenizer_is_reproducible_and_serves_the_names_better(data_dir, w):
    from course_utils import tokenizer as bpe

    path = data_dir / "artefacts" / world.BASE_TOKENIZER
    card = read_card(path)
    assert card["data_sha256"]["world_pretraining"] == w.pretraining_sha256()
    shipped = bpe.Tokenizer.load(path)
    assert (
        bpe.train_bpe_fast(data.tinystories("train") + w.pretraining_documents(), shipped.n_vocab).merges
        == shipped.merges
    )
    retrieval = [bio for p in w.split("retrieval") for bio in p.biographies]
    course = bpe.load_course_tokenizer(runs=data_dir / "no-runs", quiet=True)
    assert bpe.bytes_per_token(shipped, retrieval) > 1.4 * bpe.bytes_per_token(course, retrieval)
    assert bpe.bytes_per_token(shipped, retrieval) == pytest.approx(
        card["metrics"]["bytes_per_token_world_retrieval"], abs=1e-3
    )


@pytest.fixture(scope="module")
def base():
    return world.load_base_model()


def test_base_model_knows_pretraining_people_and_not_retrieval_people(base, w, data_dir):
    model, tok = base
    card = read_card(data_dir / "artefacts" / world.BASE_MODEL)
    assert card["metrics"]["file_bytes"] <= 12_000_000
    for split in ("sft", "heldout", "retrieval"):
        measured = world.fact_recall(model, tok, w.split(split))["accuracy"]
        assert measured == pytest.approx(card["metrics"]["recall"][split], abs=0.01)
        if split != "retrieval":
            # stored, not guessed: every attribute of both pretraining splits at 0.8 or more (data/README.md)
            assert min(measured.values()) >= 0.8, measured
        else:
            for attribute, value in measured.items():
                assert value <= w.most_common(attribute, "retrieval")[1] + 0.05, (attribute, value)


def test_base_model_card_loss_is_true(base, data_dir):
    import torch

    from course_utils.train import evaluate_loss

    model, tok = base
    card = read_card(data_dir / "artefacts" / world.BASE_MODEL)
    torch.manual_seed(0)  # as the recipe measures it: 20 batches of 32 windows of up to 256 tokens
    loss = evaluate_loss(model, data.token_cache(tok, "val"), 32, min(256, model.config.context_length), 20)
    assert loss == pytest.approx(card["metrics"]["val_loss_tinystories"], abs=0.01)
    assert card["data_sha256"]["world_pretraining"] == make_world(0).pretraining_sha256()


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped", "no card"])
def test_damaged_artefacts_fail_clearly(tmp_path, data_dir, damage):
    folder = tmp_path / "artefacts"
    shutil.copytree(data_dir / "artefacts", folder)
    path = folder / world.BASE_MODEL
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "flipped":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:
        (folder / "base_model.card.json").unlink()
    with pytest.raises(ArtefactError, match="missing|damaged|hash"):
        world.load_base_model(data=tmp_path)
