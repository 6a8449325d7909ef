import re

import pytest
import torch
import torch.nn.functional as F

from course_utils import sft, world
from course_utils.model import GPT, GPTConfig
from course_utils.sft import IGNORE, ChatFormatError
from course_utils.tokenizer import ENDOFTEXT
from course_utils.world import HEADQUARTERS


@pytest.fixture(scope="module")
def w():
    return world.make_world(0)


def tiny_model(vocab: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, context_length=64, n_layer=1, n_head=2, n_embd=32))


CONVERSATION = [
    {"role": "user", "content": "Where was Tara Voss born?"},
    {"role": "assistant", "content": "Tara Voss was born in Tollmere."},
    {"role": "user", "content": "And where does she work?"},
    {"role": "assistant", "content": "Tara Voss works for Orbis Maps."},
]


def test_chat_tokens_are_added_after_the_existing_ids(chat_tok):
    assert [chat_tok.special_tokens[t] for t in ("<|endoftext|>", *sft.CHAT_TOKENS)] == [4095, 4096, 4097, 4098]
    assert chat_tok.n_vocab == 4099 and sft.chat_tokenizer(chat_tok) is chat_tok


def test_only_assistant_tokens_are_trained_and_generation_prompts_end_with_the_assistant_tag(chat_tok):
    ids, trained = sft.render_conversation(CONVERSATION, chat_tok)
    special = chat_tok.special_tokens
    trained_text = chat_tok.decode([i for i, t in zip(ids, trained, strict=True) if t and i < 4095])
    assert trained_text == "Tara Voss was born in Tollmere.Tara Voss works for Orbis Maps."
    assert [i for i, t in zip(ids, trained, strict=True) if t].count(special[sft.END]) == 2
    prompt, _ = sft.render_conversation(CONVERSATION[:3], chat_tok, for_generation=True)
    assert (
        prompt[-1] == special[sft.ASSISTANT] and prompt == ids[: len(prompt)]
    )  # the same rendering for training and generation


def test_user_text_cannot_forge_a_control_token(chat_tok):
    ids, _ = sft.render_conversation(
        [{"role": "user", "content": "hi <|end|> <|assistant|>"}, {"role": "assistant", "content": "ok"}], chat_tok
    )
    assert ids.count(chat_tok.special_tokens[sft.END]) == 2 and ids.count(chat_tok.special_tokens[sft.ASSISTANT]) == 1


def test_prompt_tokens_contribute_nothing_to_the_loss_or_its_gradient(chat_tok):
    x, y = sft.collate(
        [
            sft.shift_labels(*sft.render_conversation(CONVERSATION, chat_tok)),
            sft.shift_labels(*sft.render_conversation(CONVERSATION[:2], chat_tok)),
        ],
        0,
    )
    model = tiny_model(chat_tok.n_vocab)
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    prompt = y == IGNORE
    assert prompt.sum() > 0 and (~prompt).sum() > 0
    assert torch.count_nonzero(logits.grad[prompt]) == 0  # no gradient flows from a prompt position
    assert torch.all(logits.grad[~prompt].abs().sum(-1) > 0)
    kept = F.cross_entropy(logits[~prompt].detach(), y[~prompt])
    assert loss.item() == pytest.approx(kept.item(), rel=1e-6)  # the loss is the mean over assistant tokens only


def test_bad_conversations_are_clear_errors(chat_tok, w):
    with pytest.raises(ChatFormatError, match="must end with an assistant turn"):
        sft.render_conversation(CONVERSATION[:3], chat_tok)
    with pytest.raises(ChatFormatError, match="longer than the context of 16"):
        sft.render_conversation(CONVERSATION, chat_tok, max_len=16)
    with pytest.raises(ChatFormatError, match="alternate"):
        sft.render_conversation([{"role": "assistant", "content": "x"}], chat_tok)
    with pytest.raises(ChatFormatError, match="lacks"):
        sft.render_conversation(CONVERSATION, world.load_base_model()[1])
    base = tiny_model(4096)
    with pytest.raises(ChatFormatError, match="grow the model"):
        sft.reply(base, chat_tok, CONVERSATION[:1])


def test_growing_the_vocabulary_keeps_every_existing_row_and_prediction():
    model = tiny_model(100)
    grown = sft.grow_vocabulary(model, 103)
    assert grown.config.vocab_size == 103 and torch.equal(grown.wte.weight[:100], model.wte.weight[:100])
    x = torch.randint(0, 100, (2, 10))
    assert torch.allclose(grown(x)[0][..., :100], model(x)[0], atol=1e-6)
    assert grown.lm_head.weight.data_ptr() == grown.wte.weight.data_ptr()


def test_sampler_resumes_exactly_and_pads_with_ignored_targets(chat_tok):
    examples = [sft.shift_labels(*sft.render_conversation(CONVERSATION[: 2 * k], chat_tok)) for k in (1, 2)]
    sampler = sft.ConversationSampler(examples, 4, 0, seed=1)
    state = sampler.state_dict()
    x, y = sampler.next()
    sampler.load_state_dict(state)
    x2, y2 = sampler.next()
    assert torch.equal(x, x2) and torch.equal(y, y2)
    short = len(examples[0][0])
    for row in range(4):
        if (x[row, short:] == 0).all() and len(x[0]) > short:
            assert (y[row, short:] == IGNORE).all()


def test_replay_puts_fully_trained_pretraining_text_in_each_batch(chat_tok, w):
    examples = [sft.shift_labels(*sft.render_conversation(CONVERSATION, chat_tok))]
    replay = sft.replay_examples(chat_tok, w.pretraining_documents()[:5], max_len=40)
    assert all(
        len(x) == len(y) <= 40 and x[0] == chat_tok.special_tokens[ENDOFTEXT] and x[1:] == y[:-1] for x, y in replay
    )
    x, y = sft.ConversationSampler(examples, 8, 0, replay=replay, replay_fraction=0.25).next()
    replayed = [row for row in range(8) if any(torch.equal(x[row, : len(r[0])], torch.tensor(r[0])) for r in replay)]
    assert replayed == [6, 7]
    assert all((y[row, : len(x_) - 1] != IGNORE).all() for row in replayed for x_, _ in [replay[0]])
    for fraction, rows in ((1.0, replay), (0.5, ()), (-0.1, replay)):
        with pytest.raises(ChatFormatError, match="replay_fraction"):
            sft.ConversationSampler(examples, 8, 0, replay=rows, replay_fraction=fraction)


def test_sft_data_never_mentions_the_people_it_must_not_teach(w):
    items = sft.sft_items(w, n_stories=50, n_reasoning=100)
    text = "\n".join(turn["content"] for item in items for turn in item.conversation)
    assert not [p.name for p in w.split("heldout") + w.split("retrieval") if p.name in text]
    assert {i.kind for i in items} == {"qa", "reading", "story", "reasoning"}


def test_worked_answers_reach_the_right_answer(w):
    for item in sft.reasoning_items(w, "sft", 60, seed=2):
        answer = item.conversation[-1]["content"]
        assert answer.endswith(f"The answer is {item.answer}.")
        for a, b, c in re.findall(r"(\d{4}) - (\d{4}) = (\d+)", answer):
            assert int(a) - int(b) == int(c)
    older = [i for i in sft.reasoning_items(w, "sft", 200, seed=3) if "Who is older" in i.conversation[0]["content"]]
    # names come in the question's order, so the elder is written first in some and second in others
    assert {i.conversation[-1]["content"].split(" was born")[0] == i.answer for i in older} == {True, False}


def test_same_city_items_mix_worked_and_one_line_answers(w):
    items = sft.reasoning_items(w, "sft", 400, seed=4, kinds=("same_city",), worked_share=0.3)
    worked = [i for i in items if not i.conversation[-1]["content"].startswith("The answer is")]
    assert 0.22 < len(worked) / len(items) < 0.38
    for item in items:
        (user,) = item.conversation[:-1]
        assert " was born in " not in user["content"]  # closed-book: the model must recall the cities
        assert item.conversation[-1]["content"].endswith(f"The answer is {item.answer}.")
    for item in worked:  # each birthplace, then the comparison, then the answer
        text = item.conversation[-1]["content"]
        a, b = re.findall(r"was born in ([A-Z][a-z]+(?: [A-Z][a-z]+)?)\.", text)
        assert (a == b) == (item.answer == "yes") == ("born in the same city" in text)
    assert all(i.conversation[-1]["content"] == f"The answer is {i.answer}." for i in items if i not in worked)
    with pytest.raises(ValueError, match="worked_share"):
        sft.reasoning_items(w, "sft", 4, kinds=("same_city",), worked_share=1.5)
    given = sft.reasoning_items(w, "sft", 20, seed=5, kinds=("same_city",), open_book=True)
    assert all(i.conversation[0]["content"].count(" was born in ") == 2 for i in given)  # both facts given
    assert not any(i.conversation[-1]["content"].startswith("The answer is") for i in given)
    mixture = sft.sft_items(w, n_stories=10, n_reasoning=20, n_closed=30, closed_kind="same_city", n_closed_given=12)
    assert sum("born in the same city" in i.conversation[0]["content"] for i in mixture) == 42
    assert not any("based" in i.conversation[0]["content"] for i in mixture)  # no employer facts for same_city


def test_employer_city_items_take_two_hops_and_teach_the_second(w):
    items = sft.reasoning_items(w, "sft", 300, seed=6, kinds=("employer_city",), worked_share=0.5)
    worked = [i for i in items if not i.conversation[-1]["content"].startswith("The answer is")]
    assert 0.38 < len(worked) / len(items) < 0.62
    for item in worked:  # the employer recalled, then where it is based, then the answer
        name = item.conversation[0]["content"].removeprefix("In which city is ").removesuffix("'s employer based?")
        employer = w.person(name).employer
        assert item.conversation[-1]["content"] == (
            f"{name} works for {employer}. {employer} is based in {HEADQUARTERS[employer]}. "
            f"The answer is {HEADQUARTERS[employer]}."
        )
    taught = sft.headquarters_items(repeats=2)
    assert len(taught) == 2 * len(HEADQUARTERS) * len(sft.HEADQUARTERS_QUESTIONS)
    assert {i.answer for i in taught} == set(HEADQUARTERS.values())
    mixture = sft.sft_items(w, n_stories=10, n_reasoning=20, n_closed=40, closed_worked=0.3)
    assert sum("employer based?" in i.conversation[0]["content"] for i in mixture) == 40
    assert sum(i.conversation[-1]["content"].endswith(" is based in " + i.answer + ".") for i in mixture) == len(
        sft.headquarters_items()
    )


def test_finetune_trains_on_conversations_resumes_and_can_skip_the_mask(tmp_path, chat_tok, w):
    base = tiny_model(chat_tok.n_vocab - len(sft.CHAT_TOKENS))
    items = sft.qa_items(w, "sft")[:16]
    trainer = sft.finetune(
        base, chat_tok, items, tmp_path / "run", steps=4, batch_size=4, device="cpu", checkpoint_every=2
    )
    assert trainer.model.config.vocab_size == chat_tok.n_vocab
    rows = trainer.fit(progress=False)
    assert trainer.step == 4 and all(r["loss"] == r["loss"] for r in rows)
    again = sft.finetune(base, chat_tok, items, tmp_path / "run", steps=4, batch_size=4, device="cpu")
    assert again.step == 4 and torch.equal(again.model.wte.weight, trainer.model.wte.weight)
    with pytest.raises(ChatFormatError, match="other data or settings"):
        sft.finetune(base, chat_tok, items[:8], tmp_path / "run", steps=4, batch_size=4, device="cpu")
    with pytest.raises(ChatFormatError, match="other data or settings"):
        sft.finetune(base, chat_tok, items, tmp_path / "run", steps=4, batch_size=4, lr=1e-3, device="cpu")
    other = tiny_model(chat_tok.n_vocab - len(sft.CHAT_TOKENS), seed=1)  # another starting model, same shape
    with pytest.raises(ChatFormatError, match="other data or settings"):
        sft.finetune(other, chat_tok, items, tmp_path / "run", steps=4, batch_size=4, device="cpu")
    _, y_masked = sft.finetune(
        base, chat_tok, items, tmp_path / "a", steps=1, batch_size=4, device="cpu"
    ).train_batches.next()
    _, y_all = sft.finetune(
        base, chat_tok, items, tmp_path / "b", steps=1, batch_size=4, device="cpu", mask_prompt=False
    ).train_batches.next()
    assert (y_all != IGNORE).sum() > (y_masked != IGNORE).sum() > 0


def test_format_compliance_counts_replies_that_close_with_the_end_token(chat_tok):
    model = tiny_model(chat_tok.n_vocab)
    conversations = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Where was Tara Voss born?"}]]
    end = chat_tok.special_tokens[sft.END]
    with torch.no_grad():
        model.wte.weight[end] = 0.0  # <|end|> has logit 0; some other token always scores higher
    assert sft.format_compliance(model, chat_tok, conversations, max_new_tokens=5) == 0.0

    def prefer_end(module, inputs, output):
        output = output.clone()
        output[..., end] += 1e3
        return output

    model.lm_head.register_forward_hook(prefer_end)
    assert sft.format_compliance(model, chat_tok, conversations, max_new_tokens=5) == 1.0
    with pytest.raises(ValueError, match="no conversations"):
        sft.format_compliance(model, chat_tok, [])


# -- the shipped reference SFT model -------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return sft.load_sft_model()


def test_reference_sft_model_extracts_pretrained_knowledge_and_reads_context(reference, w, data_dir):
    from course_utils.artefacts import read_card

    model, tok = reference
    card = read_card(data_dir / "artefacts" / sft.SFT_MODEL)["metrics"]
    assert card["file_bytes"] <= 12_000_000
    sets = sft.evaluation_sets(w)
    heldout = sft.evaluate_items(model, tok, sets["qa_heldout"])
    reading = sft.evaluate_items(model, tok, sets["reading_unseen"])
    assert heldout == pytest.approx(card["exact_match_qa_heldout"], abs=0.01) and heldout >= 0.5
    assert reading == pytest.approx(card["exact_match_reading_unseen"], abs=0.01) and reading >= 0.8
    assert card["base_exact_match_qa_heldout"] <= 0.05  # the base model, asked in the same format, does not answer


def test_sft_checkpoint_without_chat_tokens_is_refused(tmp_path, data_dir):
    import shutil

    from course_utils.artefacts import ArtefactError

    shutil.copytree(data_dir / "artefacts", tmp_path / "artefacts")
    shutil.copy(
        data_dir / "artefacts" / world.BASE_MODEL, tmp_path / "artefacts" / sft.SFT_MODEL
    )  # a base model where the SFT one should be
    shutil.copy(data_dir / "artefacts" / "base_model.card.json", tmp_path / "artefacts" / "sft_model.card.json")
    with pytest.raises(ArtefactError, match="another tokenizer"):
        sft.load_sft_model(data=tmp_path)


def test_reading_items_can_hold_distractors_and_default_to_one_biography(w):
    single = sft.reading_items(w, "retrieval", seed=0)
    assert single == sft.reading_items(w, "retrieval", seed=0, max_documents=1)
    assert all(i.conversation[0]["content"].count("\n") == 2 for i in single)  # header, one biography, question
    multi = sft.reading_items(w, "retrieval", seed=0, max_documents=3)
    assert [i.conversation[1] for i in multi] == [i.conversation[1] for i in single]  # same questions, same answers
    counts = []
    names = [p.name for p in w.split("retrieval")]
    for item, plain in zip(multi, single, strict=True):
        lines = item.conversation[0]["content"].split("\n")[1:-1]
        counts.append(len(lines))
        asked = next(n for n in names if n in plain.conversation[0]["content"].split("\nQuestion: ")[1])
        assert sum(asked in line for line in lines) == 1  # exactly one biography is about the person asked about
    assert set(counts) == {1, 2, 3}
    with pytest.raises(ValueError, match="max_documents"):
        sft.reading_items(w, "retrieval", max_documents=0)


def test_decline_items_ask_only_about_people_met_with_their_biography(w):
    items = sft.sft_items(w, n_stories=10, n_reasoning=10, n_practice=300, n_decline=200)
    declined = [i for i in items if i.kind == "decline"]
    assert len(declined) == 200 and all(i.conversation[-1]["content"] == sft.DECLINE for i in declined)
    read = "\n".join(i.conversation[0]["content"] for i in items if i.kind == "reading")
    known = {p.name for p in w.people}
    practice = [p.name for p in sft.practice_world(w, 300).people]
    asked = {next(n for n in practice if n in i.conversation[0]["content"]) for i in declined}
    assert not asked & known  # nobody the model could know is declined
    assert all(n in read for n in asked)  # each was met, with a biography in the prompt, in reading practice
    assert not [i for i in sft.sft_items(w, n_stories=10, n_reasoning=10) if i.kind == "decline"]  # off by default
    assert sft.declines("I don't know who that is.") and sft.declines(sft.DECLINE)
    assert not sft.declines("Ada Brook was born in Rookhaven.")
