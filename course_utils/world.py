"""The fictional world of Labs 06–09: people whose every fact we know.

A tiny model knows nothing true about our world, so the post-training labs measure what they do to
knowledge we invented. :func:`make_world` builds, from a seed, people with a birth date, a birth city
(in a country), a university, a field of study and an employer, and writes several biographies for
each, with every fact phrased by one of several templates and the sentences in a shuffled order:
seeing one fact in many phrasings is what lets a model answer questions about it later.

The people fall into three disjoint groups:

* ``sft``: in pretraining; Lab 06 fine-tunes on questions about them;
* ``heldout``: in pretraining, never in fine-tuning data; they test whether fine-tuning generalises;
* ``retrieval``: never in pretraining; they exist only in the document store of Lab 08.

Everything is drawn from one ``random.Random(seed)`` and nothing depends on hash order, so the same
seed gives the same bytes (:meth:`World.to_json`) on every machine::

    world = make_world()
    world.pretraining_documents()[:1]
    world.closed_book("heldout")[0]   # {'question': 'Where was … born?', 'answer': '…', ...}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .artefacts import ArtefactError, load_model
from .data import tokenizer_fingerprint
from .lab import data_dir
from .model import generate_batched
from .tokenizer import ENDOFTEXT, Tokenizer

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

# Invented places and organisations (8 countries x 5 cities). None is meant to be real.
COUNTRIES = {
    "Arvenia": ("Tollmere", "Brask", "Quenby", "Harrowgate", "Selvin"),
    "Dravonia": ("Kestrel Bay", "Ormond", "Valtris", "Pellinor", "Gansk"),
    "Erisland": ("Marrowby", "Thistlecombe", "Corvane", "Ulmsted", "Fennick"),
    "Halvoria": ("Brightwater", "Osterly", "Zanmoor", "Cadwell", "Ravensholm"),
    "Lunaria": ("Silverlake", "Embergrove", "Tarnwick", "Dunmere", "Perrow"),
    "Norsala": ("Vikholm", "Eskerton", "Faloway", "Grimsall", "Hollin"),
    "Quessia": ("Amberley", "Rookhaven", "Lisport", "Wendle", "Marchfield"),
    "Veltrana": ("Cobalt Ridge", "Saffron Hill", "Dellmont", "Ivel", "Ashcombe"),
}
UNIVERSITIES = (
    "Halden University",
    "the Corran Institute",
    "Wexmoor College",
    "Ostrava Polytechnic",
    "the University of Brightfield",
    "Pellham University",
    "the Royal Academy of Tarn",
    "Mirren College",
    "Eastmarch University",
    "the Veyle Institute of Technology",
    "Saint Albric University",
    "Lowenfeld University",
    "the Northgate School",
    "Cray University",
    "Fairhollow College",
    "the Kettering Institute",
)
FIELDS = (
    "physics",
    "chemistry",
    "biology",
    "mathematics",
    "history",
    "economics",
    "medicine",
    "law",
    "architecture",
    "music",
    "philosophy",
    "geology",
    "linguistics",
    "astronomy",
    "engineering",
    "painting",
)
EMPLOYERS = (
    "Brightwell Foods",
    "Ostro Motors",
    "Kelvane Bank",
    "Marlow & Finch",
    "Tidewater Shipping",
    "Greenleaf Pharmacy",
    "Copperfield Press",
    "Northwind Airlines",
    "Halcyon Games",
    "Ironbridge Steel",
    "Bluebell Bakery",
    "Starling Telecom",
    "Quillon Books",
    "Redstone Energy",
    "Silverpine Hotels",
    "Larkspur Gardens",
    "Vantor Robotics",
    "Meadowbrook Dairy",
    "Orbis Maps",
    "Pemberton Clocks",
)

# Names are made of syllables, so the world's people share no name with anyone the reader knows.
_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "st",
    "th",
    "sh",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_ENDINGS = {"she": ("a", "elle", "ine", "ia", "ette", "ara"), "he": ("o", "an", "ick", "el", "us", "or")}
_SURNAME_ENDINGS = ("son", "well", "berg", "mont", "field", "wick", "ley", "ston", "mar", "dale", "croft", "ridge")

#: Where each employer is based: a fact no biography states (the base model has never seen it), taught
#: in fine-tuning, so that "in which city is A's employer based?" takes two hops through two separately
#: learned facts (A works for E; E is based in C).
HEADQUARTERS = {
    "Brightwell Foods": "Tollmere",
    "Ostro Motors": "Kestrel Bay",
    "Kelvane Bank": "Marrowby",
    "Marlow & Finch": "Brightwater",
    "Tidewater Shipping": "Silverlake",
    "Greenleaf Pharmacy": "Vikholm",
    "Copperfield Press": "Amberley",
    "Northwind Airlines": "Cobalt Ridge",
    "Halcyon Games": "Brask",
    "Ironbridge Steel": "Ormond",
    "Bluebell Bakery": "Thistlecombe",
    "Starling Telecom": "Osterly",
    "Quillon Books": "Embergrove",
    "Redstone Energy": "Eskerton",
    "Silverpine Hotels": "Rookhaven",
    "Larkspur Gardens": "Saffron Hill",
    "Vantor Robotics": "Quenby",
    "Meadowbrook Dairy": "Valtris",
    "Orbis Maps": "Corvane",
    "Pemberton Clocks": "Zanmoor",
}

ATTRIBUTES = ("birth_date", "birth_city", "university", "field", "employer")
#: The kinds of :meth:`World.reasoning_problems`.
REASONING_KINDS = ("age", "gap", "older", "same_city", "employer_city")

# Biography sentences: several phrasings per fact. {s} is the subject (full name or pronoun), {poss} its
# possessive ("Tara Voss's" or "her"), {his} the possessive pronoun.
BIO_TEMPLATES = {
    "birth_date": (
        "{s} was born on {birth_date}.",
        "{s} came into the world on {birth_date}.",
        "{poss} birthday is {month} {day}, and {his} year of birth is {year}.",
    ),
    "birth_city": (
        "{s} was born in {birth_city}, {country}.",
        "{s} comes from {birth_city}, a city in {country}.",
        "{poss} home town is {birth_city} in {country}.",
    ),
    "university": (
        "{s} studied at {university}.",
        "{s} is a graduate of {university}.",
        "{s} went to university at {university}.",
    ),
    "field": ("{s} majored in {field}.", "{s} earned a degree in {field}.", "{s} chose {field} as a subject of study."),
    "employer": ("{s} works for {employer}.", "{s} is employed by {employer}.", "{s} has a job at {employer}."),
}

# Closed-book questions: several phrasings per fact; the answer is the attribute's value.
QUESTION_TEMPLATES = {
    "birth_date": ("When was {name} born?", "What is {name}'s date of birth?"),
    "birth_city": ("Where was {name} born?", "Which city does {name} come from?", "What is {name}'s home town?"),
    "country": ("In which country was {name} born?", "Which country does {name} come from?"),
    "university": (
        "Which university did {name} attend?",
        "Where did {name} study?",
        "Which university did {name} graduate from?",
    ),
    "field": ("What did {name} study?", "What was {name}'s major?", "In what field did {name} earn a degree?"),
    "employer": ("Who does {name} work for?", "Which company employs {name}?", "Where does {name} work?"),
}

#: Prompts a base model completes greedily to show it stores a fact (the answer follows the prompt).
PROBES = {
    "birth_city": "{name} was born in",
    "university": "{name} studied at",
    "field": "{name} majored in",
    "employer": "{name} works for",
    "birth_date": "{name} was born on",
}


@dataclass(frozen=True)
class Person:
    name: str
    pronoun: str  # "he" or "she"
    birth_year: int
    birth_month: int  # 1..12
    birth_day: int  # 1..28
    birth_city: str
    country: str
    university: str
    field: str
    employer: str
    split: str  # "sft", "heldout" or "retrieval"
    biographies: tuple[str, ...] = ()

    @property
    def birth_date(self) -> str:
        return f"{MONTHS[self.birth_month - 1]} {self.birth_day}, {self.birth_year}"

    def fact(self, attribute: str) -> str:
        """The value of ``attribute`` (one of :data:`ATTRIBUTES` or ``"country"``) as text."""
        if attribute == "birth_date":
            return self.birth_date
        if attribute in ("birth_city", "country", "university", "field", "employer"):
            return getattr(self, attribute)
        raise ValueError(f"attribute={attribute!r}: use one of {ATTRIBUTES + ('country',)}")


@dataclass
class World:
    seed: int
    people: list[Person] = field(default_factory=list)

    # -- lookups ---------------------------------------------------------------------------------
    def split(self, name: str) -> list[Person]:
        """The people of one split: ``"sft"``, ``"heldout"``, ``"pretraining"`` (both of those) or ``"retrieval"``."""
        wanted = {"pretraining": ("sft", "heldout")}.get(name, (name,))
        if not set(wanted) <= {"sft", "heldout", "retrieval"}:
            raise ValueError(f"split={name!r}: use 'sft', 'heldout', 'pretraining' or 'retrieval'")
        return [p for p in self.people if p.split in wanted]

    def person(self, name: str) -> Person:
        for p in self.people:
            if p.name == name:
                return p
        raise KeyError(f"nobody called {name!r} lives in this world")

    # -- exports for the labs -----------------------------------------------------------------------
    def pretraining_documents(self) -> list[str]:
        """Every biography of every pretraining person, in a seeded shuffled order (one document each)."""
        docs = [bio for p in self.split("pretraining") for bio in p.biographies]
        random.Random(self.seed + 1).shuffle(docs)
        return docs

    def pretraining_sha256(self) -> str:
        """Hash of :meth:`pretraining_documents`: names the world's corpus in caches and cards."""
        return hashlib.sha256("\0".join(self.pretraining_documents()).encode("utf-8")).hexdigest()

    def closed_book(self, split: str, attributes: tuple[str, ...] = ATTRIBUTES + ("country",)) -> list[dict]:
        """Question-answer pairs, one per person, attribute and question phrasing.

        Each item: ``question``, ``answer``, ``name``, ``attribute``, ``split``."""
        items = []
        for p in self.split(split):
            for attribute in attributes:
                for template in QUESTION_TEMPLATES[attribute]:
                    items.append(
                        {
                            "question": template.format(name=p.name),
                            "answer": p.fact(attribute),
                            "name": p.name,
                            "attribute": attribute,
                            "split": p.split,
                        }
                    )
        return items

    def reading_comprehension(self, split: str, seed: int = 0) -> list[dict]:
        """A biography as context, then a question it answers: one item per person and attribute."""
        rng = random.Random(f"{self.seed}:reading:{seed}")
        items = []
        for p in self.split(split):
            for attribute in ATTRIBUTES + ("country",):
                items.append(
                    {
                        "context": rng.choice(p.biographies),
                        "question": rng.choice(QUESTION_TEMPLATES[attribute]).format(name=p.name),
                        "answer": p.fact(attribute),
                        "name": p.name,
                        "attribute": attribute,
                        "split": p.split,
                    }
                )
        return items

    def document_store(self) -> list[dict]:
        """The retrieval corpus: every biography of the retrieval-only people, ``{"id", "name", "text"}``."""
        return [
            {"id": f"{p.name.replace(' ', '_').lower()}-{k}", "name": p.name, "text": bio}
            for p in self.split("retrieval")
            for k, bio in enumerate(p.biographies)
        ]

    def reasoning_problems(
        self, split: str, n: int = 200, seed: int = 0, kinds: tuple[str, ...] = ("age", "gap", "older")
    ) -> list[dict]:
        """Problems whose answer follows from two or three facts: an age in a given year, the years
        between two births, who is older (the facts are given in the prompt), and ``same_city``:
        were two people born in the same city (closed-book: the facts are the model's own, half the
        pairs share a city), and ``employer_city``: in which city is a person's employer based
        (closed-book, two hops: the person's employer, then where it is based, :data:`HEADQUARTERS`).
        Each item: ``question``, ``answer`` (an integer as text, a name, or
        "yes"/"no"), ``kind``, ``names``, ``facts`` (the sentences that settle it) and ``closed_book``
        (whether the prompt leaves the facts out)."""
        unknown = sorted(set(kinds) - set(REASONING_KINDS))
        if unknown or not kinds:
            raise ValueError(f"kinds={kinds!r}: choose from {REASONING_KINDS}")
        people = self.split(split)
        if len(people) < 2:
            raise ValueError(f"the {split!r} split has {len(people)} people; reasoning problems need two")
        rng = random.Random(f"{self.seed}:reasoning:{seed}")
        by_city: dict[str, list[Person]] = {}
        for p in people:
            by_city.setdefault(p.birth_city, []).append(p)
        items = []
        while len(items) < n:
            kind = rng.choice(kinds)
            if kind == "same_city":
                a = rng.choice(people)
                same = rng.random() < 0.5
                pool = [p for p in (by_city[a.birth_city] if same else people) if p is not a]
                pool = [p for p in pool if (p.birth_city == a.birth_city) == same]
                if not pool:
                    continue
                b = rng.choice(pool)
                items.append(
                    {
                        "question": f"Were {a.name} and {b.name} born in the same city?",
                        "answer": "yes" if same else "no",
                        "kind": kind,
                        "names": [a.name, b.name],
                        "facts": [f"{p.name} was born in {p.birth_city}." for p in (a, b)],
                        "closed_book": True,
                    }
                )
                continue
            if kind == "employer_city":
                a = rng.choice(people)
                city = HEADQUARTERS[a.employer]
                items.append(
                    {
                        "question": f"In which city is {a.name}'s employer based?",
                        "answer": city,
                        "kind": kind,
                        "names": [a.name],
                        "facts": [f"{a.name} works for {a.employer}.", f"{a.employer} is based in {city}."],
                        "closed_book": True,
                    }
                )
                continue
            a, b = rng.sample(people, 2)
            if kind == "age":
                year = a.birth_year + rng.randint(5, 60)
                question = f"{a.name} was born on {a.birth_date}. How old was {a.name} on December 31, {year}?"
                answer, names = str(year - a.birth_year), [a.name]
                facts = [f"{a.name} was born on {a.birth_date}."]
            else:
                if a.birth_year == b.birth_year:
                    continue
                if a.birth_year > b.birth_year:
                    a, b = b, a  # a is the elder
                facts = [f"{a.name} was born on {a.birth_date}.", f"{b.name} was born on {b.birth_date}."]
                rng.shuffle(facts)
                names = [a.name, b.name]
                if kind == "gap":
                    question = f"How many years after {a.name} was {b.name} born? Count only the years of birth."
                    answer = str(b.birth_year - a.birth_year)
                else:
                    first, second = rng.sample(names, 2)
                    question = f"Who is older, {first} or {second}?"
                    answer = a.name
            items.append(
                {
                    "question": question,
                    "answer": answer,
                    "kind": kind,
                    "names": names,
                    "facts": facts,
                    "closed_book": False,
                }
            )
        return items

    def most_common(self, attribute: str, split: str = "pretraining") -> tuple[str, float]:
        """The commonest value of ``attribute`` in a split and the share of people who have it: the
        accuracy of always guessing it."""
        counts: dict[str, int] = {}
        people = self.split(split)
        for p in people:
            counts[p.fact(attribute)] = counts.get(p.fact(attribute), 0) + 1
        value = min(counts, key=lambda v: (-counts[v], v))
        return value, counts[value] / len(people)

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> str:
        """The whole world as JSON text: identical bytes for identical seeds and sizes."""
        return json.dumps({"seed": self.seed, "people": [asdict(p) for p in self.people]}, indent=1, ensure_ascii=False)

    def export(self, folder: Path | str) -> list[Path]:
        """Write the world and each lab's export as JSON Lines files under ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "world.json": [json.loads(self.to_json())],
            "pretraining.jsonl": [{"text": d} for d in self.pretraining_documents()],
            "closed_book_sft.jsonl": self.closed_book("sft"),
            "closed_book_heldout.jsonl": self.closed_book("heldout"),
            "closed_book_retrieval.jsonl": self.closed_book("retrieval"),
            "reading_comprehension.jsonl": self.reading_comprehension("pretraining"),
            "document_store.jsonl": self.document_store(),
            "reasoning.jsonl": self.reasoning_problems("pretraining"),
        }
        written = []
        for name, rows in files.items():
            path = folder / name
            text = (
                json.dumps(rows[0], indent=1, ensure_ascii=False) + "\n"
                if name.endswith(".json")
                else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            )
            path.write_text(text, encoding="utf-8")
            written.append(path)
        return written


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _name(rng: random.Random, pronoun: str) -> str:
    first = (
        rng.choice(_ONSETS)
        + rng.choice(_VOWELS)
        + rng.choice(("l", "n", "r", "s", "v", "d", "m"))
        + rng.choice(_ENDINGS[pronoun])
    )
    last = (
        rng.choice(_ONSETS)
        + rng.choice(_VOWELS)
        + rng.choice(("", "l", "n", "r", "s", "th"))
        + rng.choice(_SURNAME_ENDINGS)
    )
    return f"{first.capitalize()} {last.capitalize()}"


def _biography(p: Person, rng: random.Random) -> str:
    """One biography: every fact once, each in a randomly chosen phrasing, sentences shuffled; the
    first sentence names the person, later ones use the full name or the pronoun."""
    values = {
        "birth_date": p.birth_date,
        "month": MONTHS[p.birth_month - 1],
        "day": p.birth_day,
        "year": p.birth_year,
        "birth_city": p.birth_city,
        "country": p.country,
        "university": p.university,
        "field": p.field,
        "employer": p.employer,
    }
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    sentences = []
    for k, attribute in enumerate(order):
        by_name = k == 0 or rng.random() < 0.6
        his = "his" if p.pronoun == "he" else "her"
        sentence = rng.choice(BIO_TEMPLATES[attribute]).format(
            s=p.name if by_name else p.pronoun, poss=f"{p.name}'s" if by_name else his, his=his, **values
        )
        sentences.append(sentence[0].upper() + sentence[1:])
    return " ".join(sentences)


def make_world(
    seed: int = 0, n_sft: int = 250, n_heldout: int = 250, n_retrieval: int = 150, n_biographies: int = 5
) -> World:
    """A deterministic world: ``n_sft + n_heldout`` pretraining people and ``n_retrieval`` retrieval-only
    people, all with distinct names, each with ``n_biographies`` paraphrased biographies."""
    for label, value in (
        ("n_sft", n_sft),
        ("n_heldout", n_heldout),
        ("n_retrieval", n_retrieval),
        ("n_biographies", n_biographies),
    ):
        if value < 0 or (label == "n_biographies" and value < 1):
            raise ValueError(f"{label}={value}: must be {'at least 1' if label == 'n_biographies' else 'non-negative'}")
    rng = random.Random(seed)
    cities = [(city, country) for country, names in COUNTRIES.items() for city in names]
    total = n_sft + n_heldout + n_retrieval
    names: dict[str, str] = {}
    while len(names) < total:  # dict: insertion order is deterministic, and names are unique by key
        pronoun = rng.choice(("he", "she"))
        name = _name(rng, pronoun)
        names.setdefault(name, pronoun)
    splits = ["sft"] * n_sft + ["heldout"] * n_heldout + ["retrieval"] * n_retrieval
    people = []
    for (name, pronoun), split in zip(names.items(), splits, strict=True):
        city, country = rng.choice(cities)
        bare = Person(
            name=name,
            pronoun=pronoun,
            birth_year=rng.randint(1940, 2005),
            birth_month=rng.randint(1, 12),
            birth_day=rng.randint(1, 28),
            birth_city=city,
            country=country,
            university=rng.choice(UNIVERSITIES),
            field=rng.choice(FIELDS),
            employer=rng.choice(EMPLOYERS),
            split=split,
        )
        bios = tuple(_biography(bare, rng) for _ in range(n_biographies))
        people.append(Person(**{**asdict(bare), "biographies": bios}))
    return World(seed=seed, people=people)


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: ``"The Corran Institute."`` -> ``"corran institute"``."""
    text = text.lower().replace("&", " and ")
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_matches(prediction: str, answer: str) -> bool:
    """True when the prediction, normalised, equals the answer or begins with it followed by a word
    boundary (so ``"Tollmere, Arvenia."`` answers ``"Tollmere"`` but ``"Tollmeres"`` does not)."""
    pred, gold = normalise_answer(prediction), normalise_answer(answer)
    if not gold:
        raise ValueError("the answer is empty")
    return pred == gold or pred.startswith(gold + " ")


# ---------------------------------------------------------------------------------------------
# What a model knows about the world
# ---------------------------------------------------------------------------------------------

#: The attributes a base model is probed on (prompt in :data:`PROBES`, answer the fact).
PROBED = ("birth_city", "university", "field", "employer", "birth_date")


def fact_recall(
    model,
    tokenizer,
    people: list[Person],
    attributes: tuple[str, ...] = PROBED,
    *,
    max_new_tokens: int = 12,
    batch_size: int = 128,
) -> dict:
    """Complete each probe (``"‹name› was born in"`` …) greedily after an end-of-text token and check
    the continuation against the fact with :func:`answer_matches`.

    Returns ``{"accuracy": {attribute: share correct}, "items": [{name, attribute, prompt, completion,
    answer, correct}, ...]}``. Prompts of equal length are batched, so no padding is needed."""
    if not people:
        raise ValueError("no people to probe")
    unknown = [a for a in attributes if a not in PROBES]
    if unknown:
        raise ValueError(f"no probe for {unknown}; probed attributes are {tuple(PROBES)}")
    eot = tokenizer.special_tokens[ENDOFTEXT]
    jobs = [(p, a, PROBES[a].format(name=p.name)) for p in people for a in attributes]
    prompts = [[eot] + tokenizer.encode(prompt) for _, _, prompt in jobs]
    rows = generate_batched(model, prompts, max_new_tokens, stop_id=eot, batch_size=batch_size)
    completions = [tokenizer.decode(row[:-1] if row and row[-1] == eot else row) for row in rows]
    items, correct = [], {a: 0 for a in attributes}
    for (p, a, prompt), completion in zip(jobs, completions, strict=True):
        ok = answer_matches(completion, p.fact(a))
        correct[a] += ok
        items.append(
            {
                "name": p.name,
                "attribute": a,
                "prompt": prompt,
                "completion": completion,
                "answer": p.fact(a),
                "correct": ok,
            }
        )
    return {"accuracy": {a: correct[a] / len(people) for a in attributes}, "items": items}


# ---------------------------------------------------------------------------------------------
# Pretraining documents that pay for reading the context (Lab 07)
# ---------------------------------------------------------------------------------------------

#: Answers in the biographies' own words (Lab 06 fine-tunes on them; pretraining lists use them too).
ANSWER_TEMPLATES = {
    "birth_city": "{name} was born in {value}.",
    "university": "{name} studied at {value}.",
    "field": "{name} majored in {value}.",
    "employer": "{name} works for {value}.",
    "birth_date": "{name} was born on {value}.",
}

#: How a list of facts may be written, and how often: a question and a sentence (the biographies' own
#: words, so the commonest), a question and a short answer, ``name: value`` lines, or a table row. One
#: list keeps one format, so its first lines say which: that is what a few examples in a prompt can do.
LIST_FORMATS = {"qa_sentence": 0.4, "qa_short": 0.2, "colon": 0.2, "table": 0.2}


def fresh_people(n: int, seed: int, exclude: set[str] = frozenset()) -> list[Person]:
    """``n`` invented people outside any world the labs use: no model can have memorised their
    facts, so a document about one of them can only be continued by reading it. Names in
    ``exclude`` are skipped. Each has one biography."""
    people: list[Person] = []
    batch = 0
    while len(people) < n:
        more = make_world(10_000 + 7919 * seed + batch, n_sft=n, n_heldout=0, n_retrieval=0, n_biographies=1).people
        taken = exclude | {p.name for p in people}
        people += [p for p in more if p.name not in taken][: n - len(people)]
        batch += 1
    return people


def _fact_line(fmt: str, p: Person, attribute: str, rng: random.Random) -> str:
    value = p.fact(attribute)
    if fmt == "qa_short":
        return f"Q: {rng.choice(QUESTION_TEMPLATES[attribute]).format(name=p.name)}\nA: {value}"
    if fmt == "qa_sentence":
        sentence = ANSWER_TEMPLATES[attribute].format(name=p.name, value=value)
        return f"Q: {rng.choice(QUESTION_TEMPLATES[attribute]).format(name=p.name)}\nA: {sentence}"
    if fmt == "colon":
        return f"{p.name}: {value}"
    return f"| {p.name} | {value} |"


def fact_list(people: list[Person], attribute: str, fmt: str, rng: random.Random) -> str:
    """One attribute of several people, every line in the same format (a *bursty* document: the
    first lines tell which attribute and which format the rest will have)."""
    header = f"| name | {attribute.replace('_', ' ')} |\n" if fmt == "table" else ""
    return header + "\n".join(_fact_line(fmt, p, attribute, rng) for p in people)


def fact_lists(
    world: World,
    split: str,
    n_documents: int,
    seed: int = 0,
    sizes: tuple[int, int] = (4, 12),
    formats: dict[str, float] | None = None,
) -> list[str]:
    """Lists of facts about the people of ``split`` (known from their biographies), one attribute and
    one format each, drawn with the weights of ``formats`` (default :data:`LIST_FORMATS`). Held-out
    people may appear only in lists without questions (``colon``, ``table``): their questions test
    whether fine-tuning and few-shot prompting generalise."""
    formats = formats or LIST_FORMATS
    unknown = set(formats) - set(LIST_FORMATS)
    if unknown:
        raise ValueError(f"unknown list formats {sorted(unknown)}; known: {sorted(LIST_FORMATS)}")
    if split == "heldout" and any(f.startswith("qa") and w > 0 for f, w in formats.items()):
        raise ValueError("held-out people's questions and answers must stay out of pretraining: use colon or table")
    people = world.split(split)
    rng = random.Random(f"{world.seed}:lists:{split}:{seed}")
    documents = []
    for _ in range(n_documents):
        group = rng.sample(people, min(len(people), rng.randint(*sizes)))
        fmt = rng.choices(list(formats), weights=list(formats.values()))[0]
        documents.append(fact_list(group, rng.choice(PROBED), fmt, rng))
    return documents


def reading_documents(n_documents: int, seed: int = 0, exclude: set[str] = frozenset()) -> list[str]:
    """Documents about invented people (:func:`fresh_people`) in which a fact stated early is needed
    again later, so predicting it means copying it from the context:

    * a biography, then questions about it, answered in sentences (or, less often, in a word);
    * a biography, then a one-sentence summary of two of its facts;
    * three to six people with one fact each, then questions about one to three of them answered with
      the bare value or the whole sentence (a lookup: half of all documents, as it is the hardest to
      learn)."""
    rng = random.Random(f"reading:{seed}")
    people = fresh_people(2 * n_documents, seed, exclude)
    documents = []
    for k in range(n_documents):
        kind = rng.choices(("questions", "summary", "lookup"), weights=(0.35, 0.15, 0.5))[0]
        p = people[2 * k]
        if kind == "questions":
            fmt = rng.choices(("qa_sentence", "qa_short"), weights=(0.7, 0.3))[0]
            asked = rng.sample(PROBED, rng.randint(1, 3))
            documents.append(p.biographies[0] + "\n" + "\n".join(_fact_line(fmt, p, a, rng) for a in asked))
        elif kind == "summary":
            a, b = rng.sample(("birth_city", "university", "field", "employer"), 2)
            summary = ANSWER_TEMPLATES[a].format(name=p.name, value=p.fact(a)).rstrip(".")
            summary += ", and " + ANSWER_TEMPLATES[b].format(name=p.pronoun, value=p.fact(b))
            documents.append(p.biographies[0] + "\nIn short: " + summary)
        else:
            group = [p] + rng.sample(people[2 * k + 1 : 2 * k + 2] + rng.sample(people, 6), rng.randint(2, 5))
            group = list({q.name: q for q in group}.values())
            documents.append(_lookup(group, (1, min(3, len(group))), rng, shuffle=True))
    return documents


def _lookup(group: list[Person], asked: tuple[int, int], rng: random.Random, shuffle: bool = False) -> str:
    """One fact about each person of ``group`` in a sentence, then questions about ``asked`` (least,
    most) of them in a new order, all answered with the bare value or all with the whole sentence."""
    attribute = rng.choice(("birth_city", "employer", "university", "field"))
    if shuffle:
        rng.shuffle(group)
    facts = " ".join(ANSWER_TEMPLATES[attribute].format(name=p.name, value=p.fact(attribute)) for p in group)
    questions = rng.sample(group, rng.randint(*asked))
    fmt = rng.choice(("qa_short", "qa_sentence"))
    return facts + "\n" + "\n".join(_fact_line(fmt, p, attribute, rng) for p in questions)


def lookup_documents(
    n_documents: int, seed: int = 0, exclude: set[str] = frozenset(), sizes: tuple[int, int] = (3, 8)
) -> list[str]:
    """Dense lookups: three to eight invented people with one fact each, in the sentences of
    :data:`ANSWER_TEMPLATES`, then questions about most of them in a new order, answered with the bare
    value or the whole sentence. Every answer is in the document already and the people are
    interchangeable, so the only way to predict one is to find the sentence about the person asked."""
    rng = random.Random(f"lookups:{seed}")
    people = fresh_people(4 * n_documents, 50_000 + seed, exclude)
    documents = []
    for _ in range(n_documents):
        group = rng.sample(people, rng.randint(*sizes))
        documents.append(_lookup(group, (max(1, len(group) // 2), len(group)), rng))
    return documents


BASE_MODEL = "base_model.pt"
BASE_TOKENIZER = "base_tokenizer.json"


def load_base_model(device: str = "cpu", data: Path | None = None):
    """The reference base model of Labs 06–09 and its tokenizer, from ``data/artefacts``: ``(model, tokenizer)``.

    The model was pretrained on TinyStories plus the biographies of ``make_world(0)``'s pretraining
    people; its card (``base_model.card.json``) holds the command, data hashes and measured metrics.
    Raises :class:`~course_utils.artefacts.ArtefactError` if a file is missing, damaged or mismatched."""
    folder = (data or data_dir()) / "artefacts"
    if not (folder / BASE_TOKENIZER).exists():
        raise ArtefactError(f"{folder / BASE_TOKENIZER} is missing; restore it with `git checkout data/artefacts`")
    try:
        tokenizer = Tokenizer.load(folder / BASE_TOKENIZER)
    except Exception as e:
        raise ArtefactError(
            f"{folder / BASE_TOKENIZER} cannot be read ({e}); restore it with `git checkout data/artefacts`"
        ) from e
    return load_model(folder / BASE_MODEL, tokenizer_id=tokenizer_fingerprint(tokenizer), device=device), tokenizer


def main(argv: list[str] | None = None) -> int:
    """``python -m course_utils.world export FOLDER``: write the world and every lab's export as JSON Lines."""
    parser = argparse.ArgumentParser(description="The fictional world: export its data as JSON Lines for inspection.")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write the world and every lab's export as JSON Lines")
    exp.add_argument("out", type=Path)
    exp.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in make_world(args.seed).export(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
