"""Retrieval: BM25 against hand-computed scores and the bm25s library, recall on the world's store, dense search,
bad input."""

import math

import numpy as np
import pytest
import torch

from course_utils import retrieval as R
from course_utils import world
from course_utils.retrieval import RetrievalError


@pytest.fixture(scope="module")
def store():
    w = world.make_world(0)
    docs = w.document_store()
    questions = w.closed_book("retrieval")
    relevant = [{i for i, d in enumerate(docs) if d["name"] == q["name"]} for q in questions]
    return [d["text"] for d in docs], questions, relevant


def test_bm25_scores_a_hand_computed_case():
    bm = R.BM25(["a cat sat", "a dog", "cat cat cat mat"])
    # N = 3, "cat" in 2 documents: IDF = ln(1 + 1.5 / 2.5) = ln 1.6; average length 3.
    # doc 0: f = 1, |d| = 3 -> 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 3 / 3)) = 1.0
    # doc 2: f = 3, |d| = 4 -> 3 * 2.5 / (3 + 1.5 * (0.25 + 0.75 * 4 / 3)) = 7.5 / 4.875
    assert bm.scores("cat") == pytest.approx([math.log(1.6), 0.0, math.log(1.6) * 7.5 / 4.875])
    assert bm.scores("Cat!") == bm.scores("cat")
    assert bm.scores("cat cat") == pytest.approx([2 * s for s in bm.scores("cat")])  # query words count each time
    assert [i for i, _ in bm.search("a dog", 3)] == [1, 0, 2]


def test_bm25_saturates_term_frequency_and_normalises_length():
    docs = ["tollmere " * n + "filler " * (10 - n) for n in range(1, 10)]
    scores = R.BM25(docs + ["unrelated words only here"]).scores("tollmere")
    gains = np.diff(scores[:9])
    assert (gains > 0).all() and (np.diff(gains) < 0).all()  # each extra mention adds less
    long, short = "tollmere " + "filler " * 30, "tollmere filler"
    with_norm = R.BM25([long, short, "other"], b=0.75).scores("tollmere")
    without = R.BM25([long, short, "other"], b=0.0).scores("tollmere")
    assert with_norm[1] > with_norm[0] and without[1] == pytest.approx(without[0])


@pytest.mark.parametrize("k1, b", [(1.5, 0.75), (0.9, 0.4)])
def test_bm25_ranks_the_world_store_as_bm25s_does(store, k1, b):
    bm25s = pytest.importorskip("bm25s")
    texts, questions, _ = store
    ours = R.BM25(texts, k1=k1, b=b)
    reference = bm25s.BM25(method="lucene", k1=k1, b=b)
    reference.index([R.words(t) for t in texts], show_progress=False)
    for q in questions[::12]:
        theirs = reference.get_scores(R.words(q["question"]))
        mine = np.array(ours.scores(q["question"]))
        # bm25s drops the constant (k1 + 1) of the numerator, as Lucene does: scores differ by that factor only
        assert np.allclose(mine, (k1 + 1) * theirs, rtol=1e-5, atol=1e-6)
        assert [i for i, _ in ours.search(q["question"], 10)] == np.argsort(-theirs, kind="stable")[:10].tolist()


def test_bm25_finds_the_right_biography(store):
    texts, questions, relevant = store
    bm = R.BM25(texts)
    rankings = [[i for i, _ in bm.search(q["question"], 3)] for q in questions]
    assert R.recall_at_k(rankings, relevant, 3) >= 0.9


def test_dense_embeddings_ignore_padding_and_retrieve_above_chance(store):
    texts, questions, relevant = store
    model, tokenizer = world.load_base_model()
    short, long = "Tara was born in Tollmere.", texts[0]
    together = R.embed(model, tokenizer, [short, long])
    alone = R.embed(model, tokenizer, [short])
    assert together.shape == (2, model.config.n_embd) and torch.allclose(together.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(together[0], alone[0], atol=1e-5)
    index = R.DenseIndex(model, tokenizer, texts)
    rankings = [[i for i, _ in index.search(q["question"], 10)] for q in questions[::8]]
    chance = 10 * 5 / len(texts)
    assert R.recall_at_k(rankings, relevant[::8], 10) > 4 * chance


def test_chunks_recall_and_prompt():
    text = " ".join(f"w{i}" for i in range(10))
    assert R.chunk(text, 4) == ["w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9"]
    assert R.chunk(text, 4, overlap=2) == ["w0 w1 w2 w3", "w2 w3 w4 w5", "w4 w5 w6 w7", "w6 w7 w8 w9"]
    assert R.chunk("", 4) == [] and R.chunk("one two", 4) == ["one two"]
    assert R.recall_at_k([[3, 1, 2], [0, 4, 5]], [{2}, {9}], 3) == 0.5
    assert R.recall_at_k([[3, 1, 2], [0, 4, 5]], [{2}, {9}], 2) == 0.0
    prompt = R.rag_prompt("Where was Tara born?", ["Doc one.", "Doc two."])
    assert prompt.endswith("Doc one.\nDoc two.\nQuestion: Where was Tara born?")


def test_bad_input_is_clear():
    bm = R.BM25(["a cat sat", "a dog"])
    with pytest.raises(RetrievalError, match="no words"):
        bm.search("", 1)
    with pytest.raises(RetrievalError, match="no words"):
        bm.search(" ?! ", 1)
    with pytest.raises(RetrievalError, match="empty"):
        R.BM25([])
    assert len(bm.search("cat", 10)) == 2  # k above the store: every document, best first
    with pytest.raises(RetrievalError, match="at least one"):
        bm.search("cat", 0)
    with pytest.raises(RetrievalError, match="overlap"):
        R.chunk("a b c", 2, overlap=2)
    with pytest.raises(RetrievalError, match="one of each"):
        R.recall_at_k([[0]], [], 1)
    with pytest.raises(ValueError, match="question is empty"):
        R.rag_prompt("  ", ["doc"])


def test_rag_answers_leave_out_prompts_that_do_not_fit():
    from course_utils import sft

    model, tokenizer = sft.load_sft_model()
    w = world.make_world(0)
    person = w.split("retrieval")[0]
    question = f"Where was {person.name} born?"
    answers = R.answer_with_documents(
        model, tokenizer, [question, question], [[person.biographies[0]], person.biographies * 3]
    )
    assert answers[1] is None  # fifteen biographies cannot fit in 256 tokens
    assert person.birth_city in answers[0]  # the reference model reads one biography well
    with pytest.raises(R.RetrievalError, match="one list per question"):
        R.answer_with_documents(model, tokenizer, [question], [])
