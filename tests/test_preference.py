"""Preference learning: pairs from the world, summed reply log-probabilities, the Bradley–Terry and
DPO losses, and a DPO run that moves a model towards the chosen replies."""

import math

import pytest
import torch

from course_utils import preference, sft, world
from course_utils.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def w():
    return world.make_world(0)


@pytest.fixture(scope="module")
def tok(chat_tok):
    return chat_tok


def tiny(tok, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.n_vocab, context_length=96, n_layer=1, n_head=2, n_embd=32)).eval()


def test_pairs_are_about_their_split_and_differ(w):
    pairs = preference.preference_pairs(w, "heldout", 40, seed=1)
    heldout = {p.name for p in w.split("heldout")}
    assert len(pairs) == 40 and all(p["name"] in heldout for p in pairs)
    assert {p["kind"] for p in pairs} == {"verbose", "wrong"}
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    for p in pairs:  # the chosen reply is the name and the fact; the sentence states the same fact
        person = w.person(p["name"])
        assert p["chosen"].startswith(p["name"] + ": ") and p["chosen"].split(": ", 1)[1] in person.__dict__.values()
        if p["kind"] == "verbose":
            assert p["rejected"].startswith(p["name"]) and p["rejected"].endswith(p["chosen"].split(": ", 1)[1] + ".")
        else:
            assert p["rejected"].startswith(p["name"] + ": ")
    assert {p["kind"] for p in preference.preference_pairs(w, "heldout", 10, verbose=False)} == {"wrong"}
    with pytest.raises(preference.PreferenceError, match="between 2 and"):
        preference.preference_pairs(w, "heldout", 1)


def test_reading_pairs_hold_one_document_about_the_person_asked(w):
    people = w.split("retrieval")
    pairs = preference.reading_pairs(people, 30, documents=3)
    for p in pairs:
        text = p["conversation"][0]["content"]
        assert text.count(p["name"]) >= 2  # in its biography and in the question
        assert p["chosen"] != p["rejected"] and p["chosen"].startswith(p["name"])
    with pytest.raises(preference.PreferenceError, match="documents"):
        preference.reading_pairs(people, 5, documents=1)


def test_reply_logprobs_sum_the_reply_and_its_end_token_only(tok, w):
    model = tiny(tok)
    pair = preference.preference_pairs(w, "sft", 2)[0]
    got = preference.reply_logprobs(model, tok, [pair, pair], "chosen")
    prompt = sft.render_conversation(pair["conversation"], tok, for_generation=True)[0]
    reply = tok.encode_ordinary(pair["chosen"]) + [tok.special_tokens[sft.END]]
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1])[0].float(), -1)[0]
    by_hand = sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(reply))
    assert got.shape == (2,) and got[0].item() == pytest.approx(by_hand, abs=1e-4)
    # padding a shorter reply next to a longer one changes nothing
    longer = dict(pair, chosen=pair["chosen"] + " And more words here.")
    assert preference.reply_logprobs(model, tok, [pair, longer], "chosen")[0].item() == pytest.approx(by_hand, abs=1e-4)
    with pytest.raises(preference.PreferenceError, match="chosen"):
        preference.reply_logprobs(model, tok, [pair], "best")


def test_losses_are_log_two_at_a_tie_and_fall_with_the_margin():
    zero = torch.zeros(3)
    assert preference.bradley_terry_loss(zero, zero).item() == pytest.approx(math.log(2))
    assert preference.dpo_loss(zero, zero, zero, zero).item() == pytest.approx(math.log(2))
    # DPO only sees log-ratios to the reference: the same policy against a shifted reference is another margin
    pc, pr = torch.tensor([-2.0]), torch.tensor([-3.0])
    assert preference.dpo_loss(pc, pr, pc, pr).item() == pytest.approx(math.log(2))
    beta = 0.5
    got = preference.dpo_loss(pc, pr, torch.tensor([-2.5]), torch.tensor([-2.5]), beta=beta).item()
    assert got == pytest.approx(-math.log(1 / (1 + math.exp(-beta * 1.0))))  # margin (0.5) - (-0.5)
    assert preference.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() < math.log(2)


def test_dpo_moves_the_policy_towards_the_chosen_replies(tok, w):
    model = tiny(tok)
    pairs = preference.preference_pairs(w, "sft", 32, seed=0, verbose=False)
    before = preference.preference_accuracy(model, tok, pairs)
    trained, history = preference.dpo(model, tok, pairs, steps=30, batch_size=16, lr=3e-3, beta=0.5, progress=False)
    after = preference.preference_accuracy(trained, tok, pairs)
    assert after["margin"] > before["margin"] + 1.0 and after["accuracy"] > before["accuracy"]
    assert history[-1]["reward_margin"] > 0 and history[-1]["loss"] < math.log(2)
    # the reference is left as it was
    assert preference.preference_accuracy(model, tok, pairs)["margin"] == pytest.approx(before["margin"])
    with pytest.raises(preference.PreferenceError, match="batch_size"):
        preference.dpo(model, tok, pairs, steps=1, batch_size=64, progress=False)


def test_the_likelihood_term_holds_the_chosen_replies_up_and_a_frozen_policy_still_trains(tok, w):
    model = tiny(tok)
    for p in model.parameters():  # as another loop's frozen reference would leave it
        p.requires_grad_(False)
    pairs = preference.preference_pairs(w, "sft", 32, seed=0)
    chosen_before = preference.reply_logprobs(model, tok, pairs, "chosen").mean().item()
    runs = {
        alpha: preference.dpo(model, tok, pairs, steps=20, batch_size=16, lr=3e-3, beta=0.5, nll_weight=alpha,
                              progress=False)[0]
        for alpha in (0.0, 1.0)
    }  # fmt: skip
    chosen = {alpha: preference.reply_logprobs(m, tok, pairs, "chosen").mean().item() for alpha, m in runs.items()}
    assert chosen[0.0] != pytest.approx(chosen_before)  # it trained although every parameter was frozen
    assert chosen[1.0] > chosen[0.0] + 1.0 and chosen[1.0] > chosen_before
    lengths = preference.reply_lengths(tok, pairs[:2], "chosen")
    assert lengths.tolist() == [len(tok.encode_ordinary(p["chosen"])) + 1 for p in pairs[:2]]


def test_a_reward_head_on_frozen_features_learns_a_separable_preference():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(8, generator=g)
    chosen, rejected = torch.randn(64, 8, generator=g) + direction, torch.randn(64, 8, generator=g) - direction
    head, losses = preference.train_reward_head(chosen, rejected, steps=200)
    with torch.no_grad():
        right = (head(chosen) > head(rejected)).float().mean().item()
    assert right > 0.95 and losses[-1] < losses[0]
