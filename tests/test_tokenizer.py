import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import course_utils.tokenizer as bpe
from course_utils import data
from course_utils.artefacts import read_card


@pytest.fixture(scope="module")
def course_tok(data_dir):
    return bpe.Tokenizer.load(data_dir / "artefacts" / "tokenizer.json")


@pytest.fixture(scope="module")
def course_tiktoken(course_tok):
    return course_tok.to_tiktoken()


@pytest.fixture(scope="module")
def mixed_tok():
    """A tokenizer whose vocabulary has numbers, CJK, emoji and punctuation runs, which the
    TinyStories one lacks, so that the property tests exercise every branch of the split."""
    rng = random.Random(0)
    words = [
        "12345",
        "2024",
        "987",
        "漢字",
        "かな",
        "👍🏽",
        "don't",
        "WE'LL",
        "...",
        "!!",
        "\r\n",
        "  ",
        "\t\t",
        "é",
        "Ωmega",
    ]
    corpus = [" ".join(rng.choice(words) + str(rng.randint(0, 99999)) for _ in range(200)) for _ in range(30)]
    return bpe.train_bpe_fast(corpus, 1200)


def test_pair_counts_counts_overlapping_pairs():
    assert bpe.pair_counts([7, 7, 7]) == {(7, 7): 2}
    assert bpe.pair_counts([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert bpe.pair_counts([]) == {} and bpe.pair_counts([4]) == {}


def test_merge_pair_left_to_right_without_overlap():
    assert bpe.merge_pair([7, 7, 7], (7, 7), 256) == [256, 7]
    assert bpe.merge_pair([7, 7, 7, 7], (7, 7), 256) == [256, 256]
    assert bpe.merge_pair([1, 2, 3, 1, 2], (1, 2), 99) == [99, 3, 99]
    assert bpe.merge_pair([2, 1], (1, 2), 99) == [2, 1]


def test_classic_example_merges():
    # 'aaabdaaabac': (a, a) occurs 4 times and is merged first.
    tok = bpe.train_bpe("aaabdaaabac", 259, pattern=None, special_tokens=())
    assert tok.merges[0] == (97, 97)
    assert tok.vocab[256] == b"aa"


def test_ties_break_towards_the_smallest_pair():
    # every pair occurs once: the smallest pair (98, 99) = 'bc' must win over ('cd', 'ab')
    tok = bpe.train_bpe("cdab" + " " + "bc", 257, pattern=None, special_tokens=())
    counts = bpe.pair_counts(list(b"cdab bc"))
    assert tok.merges[0] == min(counts)


@pytest.mark.parametrize(
    "corpus_kind, vocab_size, pattern",
    [("stories", 420, bpe.GPT4_SPLIT_PATTERN), ("ties", 300, bpe.GPT4_SPLIT_PATTERN), ("stories", 330, None)],
)
def test_reference_and_fast_trainers_learn_the_same_merges(corpus_kind, vocab_size, pattern):
    if corpus_kind == "stories":
        corpus = data.tinystories("train")[:40] if pattern else ["\n".join(data.tinystories("train")[:3])]
    else:  # short random words over a small alphabet: many ties at every step
        rng = random.Random(0)
        corpus = [" ".join("".join(rng.choice("abcde") for _ in range(rng.randint(1, 6))) for _ in range(300))]
    ref = bpe.train_bpe(corpus, vocab_size, pattern=pattern)
    fast = bpe.train_bpe_fast(corpus, vocab_size, pattern=pattern)
    assert len(ref.merges) == vocab_size - 257
    assert ref.merges == fast.merges
    assert ref.special_tokens == fast.special_tokens == {bpe.ENDOFTEXT: vocab_size - 1}


def test_special_tokens_are_never_learned_from_the_text():
    corpus = ["hello world" + bpe.ENDOFTEXT] * 50
    for train in (bpe.train_bpe, bpe.train_bpe_fast):
        tok = train(corpus, 300)
        assert not any(b"<|" in token for token in tok.vocab), train.__name__


def test_training_stops_when_no_pair_is_left():
    tok = bpe.train_bpe("abab", 400, pattern=None, special_tokens=())
    assert tok.vocab[256:] == [b"ab", b"abab"]


@pytest.mark.parametrize("train", [bpe.train_bpe, bpe.train_bpe_fast])
def test_empty_corpus_and_tiny_vocab_are_clear_errors(train):
    with pytest.raises(bpe.TokenizerError, match="empty"):
        train([], 300)
    with pytest.raises(bpe.TokenizerError, match="empty"):
        train(["", bpe.ENDOFTEXT], 300)
    with pytest.raises(bpe.TokenizerError, match="too small"):
        train("some text", 256)


# Pieces that stress the regex split and UTF-8: emoji (with ZWJ and skin tones), CJK, combining
# marks, runs of spaces and newlines, \r\n, control characters, digits, contractions, specials.
TRICKY = [
    "👩‍👩‍👧",
    "👍🏽",
    "漢字かな",
    "한국어",
    "e\u0301",
    "Å",
    "  ",
    "   \n",
    "\n\n\n",
    "\r\n",
    "\t",
    "\x00",
    "\x1c",
    "\x7f",
    "\u00a0",
    "\u2028",
    "\u200b",
    "12345",
    "٣٤٥",
    "don't",
    "WE'LL",
    "'s",
    "!!!",
    "...",
    " ?",
    "\ufeff",
    "Ω",
    "x" * 40,
]


def _texts(categories_out: tuple[str, ...]):
    chars = st.characters(blacklist_categories=categories_out)
    return st.lists(st.one_of(st.sampled_from(TRICKY), st.text(alphabet=chars, max_size=12)), max_size=25).map("".join)


# Round trips hold for every code point but lone surrogates (not encodable as UTF-8). Ids equal
# tiktoken's for characters assigned in this Python's Unicode tables: a code point assigned later may
# be a letter to the `regex` module yet unassigned to tiktoken's Rust regex, and split differently.
any_texts = _texts(("Cs",))
texts = _texts(("Cs", "Cn"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_texts)
def test_round_trip_on_any_string(course_tok, course_tiktoken, text):
    assert course_tok.decode(course_tok.encode_ordinary(text)) == text
    assert course_tiktoken.decode(course_tiktoken.encode_ordinary(text)) == text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_round_trip_and_tiktoken_agree_on_generated_strings(course_tok, course_tiktoken, text):
    ids = course_tok.encode_ordinary(text)
    assert course_tok.decode(ids) == text
    assert course_tiktoken.encode_ordinary(text) == ids
    assert all(0 <= i < len(course_tok.vocab) for i in ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_tiktoken_agrees_with_a_vocabulary_of_numbers_and_scripts(mixed_tok, text):
    ids = mixed_tok.encode_ordinary(text)
    assert mixed_tok.decode(ids) == text
    assert mixed_tok.to_tiktoken().encode_ordinary(text) == ids


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(texts, st.just(bpe.ENDOFTEXT)), max_size=5))
def test_special_tokens_follow_tiktoken_rules(course_tok, course_tiktoken, parts):
    text = "".join(parts)
    allowed = {bpe.ENDOFTEXT}
    assert course_tok.encode(text, allowed_special=allowed) == course_tiktoken.encode(text, allowed_special=allowed)
    assert course_tok.encode(text, disallowed_special=()) == course_tiktoken.encode(text, disallowed_special=())
    assert course_tok.decode(course_tok.encode(text, allowed_special="all")) == text
    if bpe.ENDOFTEXT in text:
        with pytest.raises(bpe.TokenizerError, match="allowed_special"):
            course_tok.encode(text)
        with pytest.raises(ValueError):
            course_tiktoken.encode(text)


def test_real_text_matches_tiktoken(course_tok, course_tiktoken):
    text = "\n".join(data.tinystories("val")[:50])
    assert course_tok.encode(text) == course_tiktoken.encode(text)


def test_no_pre_splitting_exports_too():
    tok = bpe.train_bpe("the cat sat on the mat " * 5, 280, pattern=None, special_tokens=())
    enc = tok.to_tiktoken()
    for text in ["the cat", "a mat on the cat\n", ""]:
        assert enc.encode(text) == tok.encode(text)


def test_decode_replaces_a_cut_character_and_rejects_unknown_ids(course_tok):
    ids = course_tok.encode("é")
    assert course_tok.decode(list(bytes("é", "utf-8"))[:1]) == "\ufffd"
    assert course_tok.decode(ids) == "é"
    with pytest.raises(bpe.TokenizerError, match="id 99999"):
        course_tok.decode([99999])


def test_save_load_round_trip(tmp_path, course_tok):
    path = course_tok.save(tmp_path / "tok.json")
    again = bpe.Tokenizer.load(path)
    assert again.merges == course_tok.merges and again.special_tokens == course_tok.special_tokens
    assert again.pattern == course_tok.pattern


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something-else", "version": 1}', "not a course tokenizer"),
        (json.dumps({"format": bpe.FILE_FORMAT, "version": 99, "pattern": None, "merges": []}), "upgrade course_utils"),
        (json.dumps({"format": bpe.FILE_FORMAT, "version": 0, "pattern": None, "merges": []}), "re-create"),
        (
            json.dumps({"format": bpe.FILE_FORMAT, "version": 1, "pattern": None, "merges": [[300, 1]]}),
            "only ids below 256",
        ),
        (json.dumps({"format": bpe.FILE_FORMAT, "version": 1, "pattern": "(", "merges": []}), "damaged"),
        (json.dumps({"format": bpe.FILE_FORMAT, "version": 1, "pattern": None}), "damaged"),
    ],
)
def test_bad_tokenizer_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "tok.json"
    path.write_text(content)
    with pytest.raises(bpe.TokenizerError, match=message):
        bpe.Tokenizer.load(path)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(bpe.TokenizerError, match="no tokenizer at"):
        bpe.Tokenizer.load(tmp_path / "nothing.json")


def test_shipped_tokenizer_is_reproducible_and_its_card_is_true(data_dir, course_tok):
    card = read_card(data_dir / "artefacts" / "tokenizer.json")
    assert card["command"].startswith("python -m course_utils.tokenizer")
    assert card["data_sha256"]["tinystories_train"] == data.tinystories_sha256("train")
    retrained = bpe.train_bpe_fast(data.tinystories("train"), bpe.COURSE_VOCAB_SIZE)
    assert retrained.merges == course_tok.merges
    assert course_tok.n_vocab == card["metrics"]["n_vocab"] == bpe.COURSE_VOCAB_SIZE
    measured = bpe.bytes_per_token(course_tok, data.tinystories("val"))
    assert measured == pytest.approx(card["metrics"]["bytes_per_token_val"], abs=1e-3)


def test_merges_from_ranks_rejects_non_bpe_vocabularies():
    vocab = [bytes([i]) for i in range(256)] + [b"abc"]  # 'abc' cannot be made from two earlier tokens
    with pytest.raises(bpe.TokenizerError, match="not a merge"):
        bpe.merges_from_ranks(vocab)


def test_token_pieces_show_partial_characters(course_tiktoken):
    ids = course_tiktoken.encode("漢")
    pieces = bpe.token_pieces(course_tiktoken, ids)
    assert "".join(p for p in pieces if not p.startswith("<")) == "" and all(p.startswith("<") for p in pieces)
