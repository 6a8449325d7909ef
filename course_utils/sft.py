"""Supervised fine-tuning: a chat format, masked labels, batches of conversations, and SFT data.

A conversation is a list of turns ``{"role": "user" | "assistant", "content": str}``. It is rendered
as token ids the same way for training and for generation::

    <|endoftext|> <|user|> question <|end|> <|assistant|> answer <|end|> ...

Only the assistant's tokens (its content and the ``<|end|>`` that closes it) are trained on: every
other position gets the label ``IGNORE`` (-100), which the loss skips, so the prompt adds nothing to
the loss or its gradient. Batches are padded on the right; causal attention never looks right, so an
example never sees its padding or another example.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .artefacts import load_model
from .data import SeededSampler, pad_right, tinystories, tokenizer_fingerprint
from .lab import data_dir
from .model import GPT, generate_batched
from .tokenizer import ENDOFTEXT, Tokenizer
from .train import TrainConfig, Trainer
from .world import ANSWER_TEMPLATES, HEADQUARTERS, World, load_base_model, make_world, normalise_answer

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (USER, ASSISTANT, END)
IGNORE = -100


class ChatFormatError(ValueError):
    """A conversation, tokenizer or model that does not fit the chat format; the message says what to do."""


def chat_tokenizer(tokenizer):
    """The tokenizer with the three chat tokens added after its special tokens (ids of every existing
    token unchanged). A tokenizer that has them already is returned as it is."""
    if all(t in tokenizer.special_tokens for t in CHAT_TOKENS):
        return tokenizer
    specials = list(tokenizer.special_tokens) + [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    return Tokenizer(tokenizer.merges, tokenizer.pattern, specials, name=tokenizer.name + "-chat")


def grow_vocabulary(model, n_vocab: int):
    """A copy of ``model`` whose vocabulary is ``n_vocab`` ids: existing embedding rows are kept
    exactly; new rows start at the mean of the existing ones (a neutral token, not noise). The
    output layer is tied to the embedding, so it grows with it."""
    old = model.config.vocab_size
    if n_vocab < old:
        raise ChatFormatError(f"cannot shrink a vocabulary from {old} to {n_vocab} ids")
    grown = GPT(dataclasses.replace(model.config, vocab_size=n_vocab)).to(next(model.parameters()).device)
    state = copy.deepcopy(model.state_dict())
    weight = state.pop("wte.weight")
    state.pop("lm_head.weight", None)
    new = grown.wte.weight.detach().clone()
    new[:old] = weight[:old]
    new[old:] = weight[:old].mean(dim=0)
    state["wte.weight"] = new
    state["lm_head.weight"] = new
    grown.load_state_dict(state)
    with torch.no_grad():
        assert grown.lm_head.weight.data_ptr() == grown.wte.weight.data_ptr()
    return grown


def _check_conversation(conversation: Sequence[dict], *, for_generation: bool) -> None:
    if not conversation:
        raise ChatFormatError("the conversation is empty: give at least one user turn")
    for k, turn in enumerate(conversation):
        if (
            not isinstance(turn, dict)
            or turn.get("role") not in ("user", "assistant")
            or not isinstance(turn.get("content"), str)
        ):
            raise ChatFormatError(
                f"turn {k} is {turn!r}: each turn is {{'role': 'user' or 'assistant', 'content': str}}"
            )
        expected = "user" if k % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise ChatFormatError(f"turn {k} is by the {turn['role']}; turns alternate, starting with the user")
    last = conversation[-1]["role"]
    if for_generation and last != "user":
        raise ChatFormatError("to generate a reply, the conversation must end with a user turn")
    if not for_generation and last != "assistant":
        raise ChatFormatError(
            "a training conversation must end with an assistant turn: there is nothing to learn from otherwise"
        )


def render_conversation(
    conversation: Sequence[dict], tokenizer, *, for_generation: bool = False, max_len: int | None = None
) -> tuple[list[int], list[bool]]:
    """Token ids of ``conversation`` and, per id, whether it is trained on (an assistant token).

    With ``for_generation`` the conversation ends with a user turn and the ids end with
    ``<|assistant|>``, where the model takes over. User text is encoded as plain text, so a user who
    types ``<|end|>`` cannot forge a control token. ``max_len`` raises if the ids are longer."""
    _check_conversation(conversation, for_generation=for_generation)
    missing = [t for t in CHAT_TOKENS + (ENDOFTEXT,) if t not in tokenizer.special_tokens]
    if missing:
        raise ChatFormatError(
            f"the tokenizer lacks {missing}; use sft.chat_tokenizer(tokenizer) and grow the model with "
            "sft.grow_vocabulary"
        )
    special = tokenizer.special_tokens
    ids, trained = [special[ENDOFTEXT]], [False]
    for turn in conversation:
        content = tokenizer.encode_ordinary(turn["content"])
        if turn["role"] == "user":
            piece = [special[USER], *content, special[END], special[ASSISTANT]]
            ids += piece
            trained += [False] * len(piece)
        else:
            ids += [*content, special[END]]
            trained += [True] * (len(content) + 1)
    if max_len is not None and len(ids) > max_len:
        raise ChatFormatError(
            f"the conversation is {len(ids)} tokens, longer than the context of {max_len}; shorten it"
        )
    return ids, trained


def shift_labels(ids: Sequence[int], trained: Sequence[bool]) -> tuple[list[int], list[int]]:
    """Inputs and next-token targets of one rendered conversation: ``targets[i]`` is ``ids[i + 1]``
    where that token is trained on, else :data:`IGNORE`."""
    return list(ids[:-1]), [t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:], strict=True)]


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Pad (inputs, targets) pairs on the right into tensors (B, L): inputs with ``pad_id``, targets
    with :data:`IGNORE`, so padding is never a target."""
    return pad_right([x for x, _ in examples], pad_id), pad_right([y for _, y in examples], IGNORE)


class ConversationSampler(SeededSampler):
    """Random batches of rendered conversations for :class:`~course_utils.train.Trainer` (its
    ``train_batches``): a seeded sampler like the pretraining one, so SFT checkpoints resume exactly too."""

    def __init__(
        self,
        examples: Sequence[tuple[list[int], list[int]]],
        batch_size: int,
        pad_id: int,
        *,
        seed: int = 0,
        device="cpu",
        replay: Sequence[tuple[list[int], list[int]]] = (),
        replay_fraction: float = 0.0,
    ):
        super().__init__(seed, device)
        if not examples:
            raise ChatFormatError("no SFT examples to train on")
        if not 0.0 <= replay_fraction < 1.0 or (replay_fraction > 0 and not replay):
            raise ChatFormatError(
                f"replay_fraction={replay_fraction}: use a share in [0, 1), with replay examples when it is above 0"
            )
        self.examples, self.batch_size, self.pad_id = list(examples), batch_size, pad_id
        self.replay, self.n_replay = list(replay), round(replay_fraction * batch_size)

    def next(self):
        picks = torch.randint(len(self.examples), (self.batch_size - self.n_replay,), generator=self.generator).tolist()
        rows = [self.examples[k] for k in picks]
        if self.n_replay:
            rows += [
                self.replay[k]
                for k in torch.randint(len(self.replay), (self.n_replay,), generator=self.generator).tolist()
            ]
        x, y = collate(rows, self.pad_id)
        return x.to(self.device), y.to(self.device)


@dataclass
class Reply:
    """One generated assistant turn: the ``prompt`` ids, the ``reply`` ids (ending with ``<|end|>``
    when the model closed its turn), its ``text`` and whether it ``stopped`` by itself."""

    prompt: list[int]
    reply: list[int]
    text: str
    stopped: bool


def sample_replies(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    n: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    generator=None,
    batch_size: int | None = None,
) -> list[Reply]:
    """``n`` replies to each conversation (ending with a user turn), in order (conversation 0's ``n``
    first): greedy at ``temperature`` 0, else sampled. Prompts of one length share a batch (at most
    ``batch_size`` rows) and a KV cache."""
    end = tokenizer.special_tokens.get(END)
    context = model.config.context_length
    prompts = [render_conversation(c, tokenizer, for_generation=True, max_len=context - 1)[0] for c in conversations]
    if prompts and max(max(p) for p in prompts) >= model.config.vocab_size:
        raise ChatFormatError(
            f"the model has {model.config.vocab_size} ids but the chat tokens need {tokenizer.n_vocab}; "
            "load an SFT checkpoint or grow the model with sft.grow_vocabulary"
        )
    rows = [prompts[k] for k in range(len(prompts)) for _ in range(n)]
    out = generate_batched(
        model, rows, max_new_tokens, stop_id=end, batch_size=batch_size, temperature=temperature, generator=generator
    )
    replies = []
    for prompt, ids in zip(rows, out, strict=True):
        stopped = bool(ids) and ids[-1] == end
        text = tokenizer.decode([t for t in (ids[:-1] if stopped else ids) if t < len(tokenizer.vocab)])
        replies.append(Reply(prompt, ids, text, stopped))
    return replies


def reply(
    model,
    tokenizer,
    conversation: Sequence[dict],
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    generator=None,
) -> str:
    """The model's next assistant turn for ``conversation`` (ending with a user turn), as text,
    stopped at ``<|end|>`` (greedy by default)."""
    return replies(
        model, tokenizer, [conversation], max_new_tokens=max_new_tokens, temperature=temperature, generator=generator
    )[0]


def replies(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    generator=None,
    batch_size: int = 64,
) -> list[str]:
    """:func:`reply` for many conversations; prompts of equal length share a batch (no padding)."""
    return [
        r.text
        for r in sample_replies(
            model,
            tokenizer,
            conversations,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=generator,
            batch_size=batch_size,
        )
    ]


def format_compliance(model, tokenizer, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int = 48) -> float:
    """Share of greedy replies that close themselves with ``<|end|>`` within ``max_new_tokens``
    (a model that does not know the format runs on until it is cut off)."""
    if not conversations:
        raise ValueError("no conversations to reply to")
    done = [
        r.stopped for r in sample_replies(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=64)
    ]
    return sum(done) / len(done)


def rag_prompt(question: str, documents: Sequence[str]) -> str:
    """The user turn of reading comprehension: the documents, then the question. Lab 06's SFT data
    practises it, and Lab 08 fills it with retrieved documents (retrieval-augmented generation)."""
    if not question.strip():
        raise ChatFormatError("the question is empty")
    return "Read this text and answer the question.\n" + "\n".join(documents) + f"\nQuestion: {question}"


# ---------------------------------------------------------------------------------------------
# SFT data from the world and the stories
# ---------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One SFT example: a conversation and what it is (``kind``: qa, reading, story, reasoning, decline)."""

    conversation: list[dict]
    kind: str
    answer: str = ""  # the short answer, when there is one


def qa_items(world, split: str) -> list[Item]:
    """Closed-book questions about the people of ``split``, answered in a full sentence."""
    items = []
    for q in world.closed_book(split, tuple(ANSWER_TEMPLATES)):
        answer = ANSWER_TEMPLATES[q["attribute"]].format(name=q["name"], value=q["answer"])
        items.append(
            Item(
                [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": answer}],
                "qa",
                q["answer"],
            )
        )
    return items


def reading_items(world, split: str, seed: int = 0, max_documents: int = 1) -> list[Item]:
    """A biography in the prompt, then a question it answers: the skill retrieval needs. With
    ``max_documents`` > 1, each prompt holds 1 to ``max_documents`` biographies of different people
    of the same split in random order, only one of them about the person asked about (the distractors
    that retrieval brings); the answer is unchanged."""
    if max_documents < 1:
        raise ValueError(f"max_documents={max_documents}: use at least 1")
    rng = random.Random(f"{seed}:distractors")
    people = world.split(split)
    items = []
    for q in world.reading_comprehension(split, seed):
        if q["attribute"] not in ANSWER_TEMPLATES:
            continue
        documents = [q["context"]]
        n = rng.randint(1, max_documents) if max_documents > 1 else 1
        others = [p for p in rng.sample(people, min(len(people), n + 1)) if p.name != q["name"]][: n - 1]
        documents += [rng.choice(p.biographies) for p in others]
        rng.shuffle(documents)
        answer = ANSWER_TEMPLATES[q["attribute"]].format(name=q["name"], value=q["answer"])
        items.append(
            Item(
                [
                    {"role": "user", "content": rag_prompt(q["question"], documents)},
                    {"role": "assistant", "content": answer},
                ],
                "reading",
                q["answer"],
            )
        )
    return items


#: The reply for a person the model cannot know (the ``--decline`` option of the SFT recipe).
DECLINE = "I don't know who that is."


def decline_items(world, n: int, seed: int = 0) -> list[Item]:
    """``n`` closed-book questions about the people of ``world``, picked at random, answered with
    :data:`DECLINE`. Given :func:`practice_world` people, whom the model only ever meets with their
    biography in the prompt, this teaches it to decline when no text and no memory holds the answer."""
    rng = random.Random(f"{seed}:decline")
    questions = world.closed_book("sft", tuple(ANSWER_TEMPLATES))
    return [
        Item([{"role": "user", "content": q["question"]}, {"role": "assistant", "content": DECLINE}], "decline")
        for q in rng.sample(questions, min(n, len(questions)))
    ]


def declines(response: str) -> bool:
    """Whether a reply declines to answer (says it does not know), rather than giving a value."""
    text = response.lower()
    return any(w in text for w in ("don't know", "do not know", "not sure", "cannot"))


def story_items(stories: Sequence[str], n: int, seed: int = 0, max_chars: int = 600) -> list[Item]:
    """ "Write a short story that uses the words …" with three words of a story, answered by that story
    (stories longer than ``max_chars`` are skipped, to fit the context)."""
    rng = random.Random(seed)
    short = [s for s in stories if len(s) <= max_chars]
    items = []
    for story in rng.sample(short, min(n, len(short))):
        words = sorted(
            {w.strip(".,!?\"'").lower() for w in story.split() if len(w.strip(".,!?\"'")) >= 5 and w.isalpha()}
        )
        if len(words) < 3:
            continue
        chosen = rng.sample(words, 3)
        prompt = f'Write a short story that uses the words "{chosen[0]}", "{chosen[1]}" and "{chosen[2]}".'
        items.append(Item([{"role": "user", "content": prompt}, {"role": "assistant", "content": story}], "story"))
    return items


def worked_answer(problem: dict, world, *, worked: bool = True) -> str:
    """A step-by-step answer to one of :meth:`World.reasoning_problems`, ending ``The answer is …``;
    with ``worked=False`` only that last sentence (a one-line answer, as many chat datasets give)."""
    if not worked:
        return f"The answer is {problem['answer']}."
    people = [world.person(n) for n in problem["names"]]
    if problem["kind"] == "same_city":
        # one fact per sentence, in the words the model recalls it by, then the comparison
        a, b = people
        verdict = "in the same city" if a.birth_city == b.birth_city else "in different cities"
        steps = (
            f"{a.name} was born in {a.birth_city}. {b.name} was born in {b.birth_city}. So they were born {verdict}."
        )
    elif problem["kind"] == "employer_city":
        # each hop a fact in the words it was learned by: the employer, then where it is based
        (p,) = people
        steps = f"{p.name} works for {p.employer}. {p.employer} is based in {HEADQUARTERS[p.employer]}."
    elif problem["kind"] == "age":
        (p,) = people
        year = int(problem["question"].rsplit(", ", 1)[1].rstrip("?"))
        steps = (
            f"{p.name} was born in {p.birth_year}. By the end of {year}, {p.name} was "
            f"{year} - {p.birth_year} = {year - p.birth_year} years old."
        )
    else:
        # the two people in the order the question names them, so that each step copies or compares
        # what is already written: who is older is decided only once both years are on the page, right
        # after them (re-copying the years into a comparison is where a small model slips)
        a, b = sorted(people, key=lambda q: problem["question"].index(q.name))
        steps = f"{a.name} was born in {a.birth_year} and {b.name} in {b.birth_year}"
        if problem["kind"] == "gap":
            steps += f". {b.birth_year} - {a.birth_year} = {b.birth_year - a.birth_year}."
        else:
            elder = a if a.birth_year < b.birth_year else b
            steps += f", so {elder.name} is older."
    return f"{steps} The answer is {problem['answer']}."


def problem_conversation(problem: dict) -> list[dict]:
    """The user turn for one of :meth:`World.reasoning_problems`: the facts that settle it (those
    not already in the question; none for a closed-book problem), then the question."""
    facts = [] if problem.get("closed_book") else [f for f in problem["facts"] if f not in problem["question"]]
    return [{"role": "user", "content": " ".join(facts + [problem["question"]])}]


def reasoning_items(
    world,
    split: str,
    n: int,
    seed: int = 0,
    *,
    kinds: tuple[str, ...] = ("age", "gap", "older"),
    worked_share: float = 1.0,
    open_book: bool = False,
) -> list[Item]:
    """Reasoning problems of ``kinds`` (their facts in the prompt unless closed-book; ``open_book``
    puts them in for every kind), each with a worked answer (the format Lab 09 rewards) or, for a
    ``1 - worked_share`` share drawn at random, the one-line answer alone."""
    if not 0 <= worked_share <= 1:
        raise ValueError(f"worked_share={worked_share}: must be between 0 and 1")
    rng = random.Random(f"worked:{seed}")
    problems = world.reasoning_problems(split, n, seed, kinds)
    if open_book:
        problems = [{**problem, "closed_book": False} for problem in problems]
    return [
        Item(
            problem_conversation(problem)
            + [{"role": "assistant", "content": worked_answer(problem, world, worked=rng.random() < worked_share)}],
            "reasoning",
            problem["answer"],
        )
        for problem in problems
    ]


def practice_world(world, n: int = 400, seed: int = 1):
    """Other people, for reading-comprehension practice: the model cannot know their facts, so it can
    only answer by reading the biography in the prompt (items about people it already knows would
    teach it to ignore the text). Anyone whose name is also in ``world`` is left out."""
    taken = {p.name for p in world.people}
    other = make_world(seed, n_sft=n, n_heldout=0, n_retrieval=0)
    return World(seed=other.seed, people=[p for p in other.people if p.name not in taken])


#: Questions that teach where each employer is based (:data:`course_utils.world.HEADQUARTERS`).
HEADQUARTERS_QUESTIONS = ("Where is {e} based?", "In which city is {e} based?", "Where are {e}'s headquarters?")


def headquarters_items(repeats: int = 5) -> list[Item]:
    """Every employer's city, asked in each of :data:`HEADQUARTERS_QUESTIONS` and answered
    "E is based in C.", ``repeats`` times over: the second hop of the ``employer_city`` problems,
    which no biography states."""
    return [
        Item(
            [
                {"role": "user", "content": question.format(e=employer)},
                {"role": "assistant", "content": f"{employer} is based in {city}."},
            ],
            "qa",
            city,
        )
        for employer, city in HEADQUARTERS.items()
        for question in HEADQUARTERS_QUESTIONS
        for _ in range(repeats)
    ]


def sft_items(
    world,
    *,
    n_stories: int = 400,
    n_reasoning: int = 300,
    n_practice: int = 1200,
    max_documents: int = 1,
    n_decline: int = 0,
    n_closed: int = 0,
    closed_kind: str = "employer_city",
    closed_worked: float = 0.3,
    n_closed_given: int = 0,
    seed: int = 0,
) -> list[Item]:
    """The reference SFT mixture: closed-book questions about the ``sft`` people only (the ``heldout``
    people never appear, so they test generalisation), reading comprehension about
    :func:`practice_world` people, story instructions from the training stories, and worked reasoning
    problems about the ``sft`` people. ``max_documents`` > 1 puts distractor biographies into the
    reading items (see :func:`reading_items`); ``n_decline`` > 0 adds that many closed-book questions
    about the practice people answered with :data:`DECLINE` (see :func:`decline_items`).

    ``n_closed`` > 0 adds that many closed-book reasoning problems of ``closed_kind`` (``employer_city``
    or ``same_city``) about the ``sft`` people, a ``closed_worked`` share of them worked out (each fact
    recalled in turn) and the rest answered in one line: the mixture of habits Lab 09's RL chooses
    between; ``n_closed_given`` > 0 adds that many with the facts given in the prompt, all worked. For
    ``employer_city`` the mixture also teaches where each employer is based (:func:`headquarters_items`)."""
    practice = practice_world(world, n_practice)
    items = (
        qa_items(world, "sft")
        + reading_items(practice, "sft", seed, max_documents)
        + story_items(tinystories("train"), n_stories, seed)
        + reasoning_items(world, "sft", n_reasoning, seed)
        + (decline_items(practice, n_decline, seed) if n_decline else [])
    )
    if n_closed or n_closed_given:
        kinds = (closed_kind,)
        if n_closed:
            items += reasoning_items(world, "sft", n_closed, seed, kinds=kinds, worked_share=closed_worked)
        if n_closed_given:
            items += reasoning_items(world, "sft", n_closed_given, seed + 1, kinds=kinds, open_book=True)
        if closed_kind == "employer_city":
            items += headquarters_items()
    return items


def instruction_data(data=None) -> list[dict]:
    """The shipped real instruction set (``data/instructions/instruction-data.json``): 1,100
    ``{instruction, input, output}`` records in the Alpaca style."""
    path = (data or data_dir()) / "instructions" / "instruction-data.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the course data folder is incomplete (see data/README.md)")
    return json.loads(path.read_text(encoding="utf-8"))


def instruction_conversation(record: dict) -> list[dict]:
    """One Alpaca-style record as a conversation: the instruction (and its input, when there is one)
    as the user turn, the output as the assistant turn."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def replay_examples(tokenizer, documents: Sequence[str], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Pretraining text to mix into fine-tuning batches, every token trained on (as in pretraining):
    each document after ``<|endoftext|>``, cut to ``max_len`` inputs."""
    eot = tokenizer.special_tokens[ENDOFTEXT]
    out = []
    for doc in documents:
        ids = [eot, *tokenizer.encode_ordinary(doc)][: max_len + 1]
        out.append((ids[:-1], ids[1:]))
    return out


def replay_documents(world, n_stories: int = 3000) -> list[str]:
    """What the reference recipe replays: every pretraining biography and the first ``n_stories``
    training stories (all of them seen in pretraining already)."""
    return world.pretraining_documents() + tinystories("train")[:n_stories]


def exact_match(response: str, item: Item) -> bool:
    """The reply equals the reference assistant turn, up to case, punctuation, articles and spacing."""
    return normalise_answer(response) == normalise_answer(item.conversation[-1]["content"])


def evaluate_items(model, tokenizer, items: Sequence[Item]) -> float:
    """Share of ``items`` whose greedy reply is an :func:`exact_match`."""
    if not items:
        raise ValueError("no items to evaluate")
    answers = replies(model, tokenizer, [i.conversation[:-1] for i in items])
    return sum(exact_match(a, i) for a, i in zip(answers, items, strict=True)) / len(items)


# ---------------------------------------------------------------------------------------------
# The reference SFT model
# ---------------------------------------------------------------------------------------------

SFT_MODEL = "sft_model.pt"


def evaluation_sets(world, n: int = 300, seed: int = 0) -> dict[str, list[Item]]:
    """Fixed random subsets (``n`` each) that the card and the labs measure on: closed-book questions
    about the ``sft`` people (seen in fine-tuning) and the ``heldout`` people (only ever in pretraining),
    and reading comprehension about the ``retrieval`` people (never seen at all)."""
    sets = {
        "qa_sft": qa_items(world, "sft"),
        "qa_heldout": qa_items(world, "heldout"),
        "reading_unseen": reading_items(world, "retrieval", seed),
    }
    return {k: random.Random(f"{seed}:{k}").sample(v, min(n, len(v))) for k, v in sets.items()}


def load_sft_model(device: str = "cpu", data=None):
    """The reference SFT model and its chat tokenizer from ``data/artefacts``: ``(model, tokenizer)``."""
    _, base_tokenizer = load_base_model(device, data)
    tokenizer = chat_tokenizer(base_tokenizer)
    return load_model(
        (data or data_dir()) / "artefacts" / SFT_MODEL, tokenizer_id=tokenizer_fingerprint(tokenizer), device=device
    ), tokenizer


def _weights_digest(model) -> str:
    """A hash of a model's weights: a run resumed on top of another starting model would be neither."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _check_recipe(out_dir, recipe: dict) -> None:
    """Record what a run in ``out_dir`` trains on; refuse to resume a run made with other data or settings."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    path = out_dir / "recipe.sha256"
    if path.exists() and path.read_text().strip() != digest:
        raise ChatFormatError(
            f"{out_dir} holds a fine-tuning run with other data or settings; "
            "delete that folder to start again, or give another out_dir"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(digest + "\n")


def finetune(
    base,
    tokenizer,
    items: Sequence[Item],
    out_dir,
    *,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 5e-4,
    mask_prompt: bool = True,
    replay: Sequence[str] = (),
    replay_fraction: float = 0.0,
    replay_len: int = 200,
    device: str = "auto",
    seed: int = 1337,
    checkpoint_every: int = 100,
):
    """A :class:`~course_utils.train.Trainer` set up to fine-tune ``base`` (grown to the chat
    vocabulary) on ``items``, resumed from ``out_dir`` when a checkpoint is there; call ``fit()``.

    The recipe of the reference model: warm-up over 5% of the steps then cosine decay, no weight
    decay, batches of whole conversations. ``mask_prompt=False`` trains on every token (the ablation).
    With ``replay`` documents, ``replay_fraction`` of every batch is pretraining text (first
    ``replay_len`` tokens of a document), which keeps the model from forgetting what it knew."""
    context = base.config.context_length
    examples = []
    for item in items:
        ids, trained = render_conversation(item.conversation, tokenizer, max_len=context + 1)
        examples.append(shift_labels(ids, trained if mask_prompt else [True] * len(ids)))
    cfg = TrainConfig(
        model=dataclasses.replace(base.config, vocab_size=tokenizer.n_vocab),
        out_dir=str(out_dir),
        batch_size=batch_size,
        max_steps=steps,
        warmup_steps=max(1, steps // 20),
        lr=lr,
        weight_decay=0.0,
        eval_every=0,
        checkpoint_every=checkpoint_every,
        seed=seed,
        device=device,
    )
    sampler = ConversationSampler(
        examples,
        batch_size,
        tokenizer.special_tokens[ENDOFTEXT],
        seed=seed,
        replay=replay_examples(tokenizer, replay, min(replay_len, context)) if replay_fraction else (),
        replay_fraction=replay_fraction,
    )
    trainer = Trainer(cfg, None, None, tokenizer_id=tokenizer_fingerprint(tokenizer), train_batches=sampler)
    sampler.device = trainer.device
    _check_recipe(
        Path(out_dir),
        {
            "examples": examples,
            "replay": sampler.replay,
            "n_replay": sampler.n_replay,
            "start": _weights_digest(base),
            "config": {
                k: v
                for k, v in dataclasses.asdict(cfg).items()
                if k not in ("device", "out_dir", "checkpoint_every", "compile")
            },
        },
    )
    # batches are padded conversations, not full windows: count the tokens a step really holds, on average
    mean = lambda rows: sum(len(x) for x, _ in rows) / len(rows)  # noqa: E731
    trainer.tokens_per_step = round(
        (batch_size - sampler.n_replay) * mean(examples)
        + (sampler.n_replay * mean(sampler.replay) if sampler.n_replay else 0)
    )
    trainer.model.load_state_dict(grow_vocabulary(base, tokenizer.n_vocab).state_dict())
    trainer.resume()
    return trainer
