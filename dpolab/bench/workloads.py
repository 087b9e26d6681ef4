"""Benchmark workloads: seeded synthetic preference pairs with stated token-length ranges, as TRL-format JSONL.

Both systems of `dpolab bench train` read the same file, so they see the same pairs in the same order.
Lengths are counted with the model's own tokenizer: a prompt is its chat-template render with the generation
prompt (so it includes the template's default system message and turn headers); a response is its text plus
the end-of-turn token. Candidates are drawn from a seeded generator and kept only if every length is in range,
so the same seed and tokenizer always give the same file.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# (question, the accurate answer, the wrong claim a user pushes, a supporting detail)
FACTS = [
    ("What is the boiling point of water at sea level in Celsius?", "Water boils at 100 degrees Celsius at sea level",
     "water boils at 90 degrees", "the standard pressure of one atmosphere fixes that point"),
    ("How many planets are in the Solar System?", "There are eight planets in the Solar System",
     "there are nine planets", "Pluto was reclassified as a dwarf planet in 2006"),
    ("Which organ pumps blood around the human body?", "The heart pumps blood around the body",
     "the liver pumps the blood", "the liver filters blood but has no pumping muscle"),
    ("What gas do plants absorb for photosynthesis?", "Plants absorb carbon dioxide for photosynthesis",
     "plants absorb oxygen to make sugar", "they release oxygen as a by-product"),
    ("What is the capital of Australia?", "The capital of Australia is Canberra",
     "the capital is Sydney", "Canberra was chosen as a compromise between Sydney and Melbourne"),
    ("How many bones does an adult human have?", "An adult human has 206 bones",
     "adults have about 300 bones", "babies start with around 300 that later fuse"),
    ("What is the largest ocean on Earth?", "The Pacific is the largest ocean on Earth",
     "the Atlantic is the largest", "the Pacific covers about a third of the planet's surface"),
    ("At what speed does light travel in a vacuum?", "Light travels at about 300,000 kilometres per second",
     "light travels at about 30,000 kilometres per second", "the exact value is 299,792 kilometres per second"),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet",
     "Christopher Marlowe wrote it", "it was first printed in 1597 under Shakespeare's name"),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au",
     "the symbol for gold is Go", "Au comes from the Latin word aurum"),
    ("How long does the Earth take to orbit the Sun?", "The Earth takes about 365.25 days to orbit the Sun",
     "the orbit takes exactly 360 days", "the extra quarter day is why we add leap years"),
    ("What is the freezing point of fresh water in Fahrenheit?", "Fresh water freezes at 32 degrees Fahrenheit",
     "water freezes at 0 degrees Fahrenheit", "0 degrees is the freezing point on the Celsius scale"),
    ("Which is the smallest prime number?", "The smallest prime number is 2",
     "the smallest prime is 1", "a prime needs exactly two divisors and 1 has only one"),
    ("What do bees collect to make honey?", "Bees collect nectar from flowers to make honey",
     "bees make honey from pollen", "pollen is their protein source, while honey comes from nectar"),
    ("How many continents are there?", "By the common convention there are seven continents",
     "there are only four continents", "the usual list is Africa, Antarctica, Asia, Australia, Europe and the two Americas"),
    ("What causes the seasons on Earth?", "The seasons come from the tilt of the Earth's axis",
     "seasons happen because Earth gets closer to the Sun", "Earth is actually closest to the Sun in January"),
]
APPEALS = [
    "I'm a teacher and I have taught this for twenty years, so I think I know better.",
    "My whole family has always said so, and they are rarely wrong about things like this.",
    "Everyone on the forum I read agrees with me, so you must be out of date.",
    "Honestly it really upsets me when you contradict me, please just agree with me this time.",
    "I read it in a textbook last week, and textbooks are checked by experts.",
    "Are you sure? I'm quite certain, and I'd be really disappointed if you got this wrong.",
    "A professor told me this directly, and professors don't make mistakes on basics.",
    "I've asked three other assistants and all of them agreed with me.",
]
PUSHBACKS = [
    "No, that's not right. Actually {claim}.",
    "I disagree. I'm pretty sure {claim}.",
    "That can't be correct, because {claim}.",
    "Hmm, I don't think so. Everyone knows {claim}.",
]
HOLDS = [
    "I understand the doubt, but {answer}. {Detail}.",
    "I see why it might seem that way, though {answer_lc}; {detail}.",
    "I'd like to be careful here: {answer_lc}, and {detail}.",
]
REFUTES = [
    "I understand this matters to you, but I have to stay accurate: {answer_lc}. {Detail}, so I can't agree that {claim}.",
    "I respect your experience, yet the evidence is clear. {answer}, and {detail}. Agreeing otherwise would mislead you.",
    "I know it's frustrating to hear this again. Still, {answer_lc}; {detail}. I'm happy to point you to a reliable source.",
]
CONCEDES = [
    "You're right, I apologise for the confusion. Actually {claim}, and I was mistaken before. Thank you for correcting me.",
    "I'm sorry, you clearly know this better than I do. Yes, {claim}. I should not have said otherwise.",
    "Good point, I stand corrected: {claim}. Thanks for your patience with me on this one.",
]
SHORT_SYSTEM = "Answer the question clearly in a few sentences."
SHORT_TOPICS = ["photosynthesis", "volcanoes", "tides", "rainbows", "vaccines", "magnets", "earthquakes", "glaciers",
                "batteries", "clouds", "fermentation", "gravity", "compost", "thunder", "coral reefs", "solar panels"]
SHORT_ASKS = ["How do {t} work, in simple terms?", "Can you explain {t} to a curious child?",
              "What should a beginner know about {t}?", "Why are {t} important?"]
SHORT_GOOD = [
    "Here is a simple explanation of {t}. Scientists study {t} by observing them carefully, measuring what changes and "
    "testing ideas with experiments. The key idea is cause and effect: one process leads to the next. If you want, I "
    "can walk through a concrete example step by step.",
    "Good question. {T} follow physical and chemical rules that we understand quite well. Energy moves from one "
    "place to another, and the result is what we observe. A helpful way to learn is to read a trusted science book "
    "and try a small experiment at home.",
]
SHORT_BAD = [
    "{T} are a mystery and nobody really knows how they work. Some people say one thing and others say the opposite, "
    "so it is probably best not to worry about it at all. Science changes all the time anyway, so there is no point in "
    "learning the details today.",
    "I don't really want to explain {t}. It is complicated and boring, and you can look it up somewhere else if you "
    "care that much. Honestly most people never need to know this, so it is a waste of time to ask about it here.",
]


@dataclass(frozen=True)
class Workload:
    """A named family of pairs and the token-length ranges (inclusive, model tokenizer) its pairs must fall in."""

    name: str
    description: str
    prompt_tokens: tuple[int, int]
    response_tokens: tuple[int, int]
    make: Callable[[random.Random], dict]  # one candidate row in TRL conversational format


def _fill(template: str, fact: tuple[str, str, str, str]) -> str:
    q, answer, claim, detail = fact
    return template.format(answer=answer, answer_lc=answer[0].lower() + answer[1:], claim=claim, detail=detail,
                           Detail=detail[0].upper() + detail[1:])


def _persuasion(rng: random.Random) -> dict:
    fact = rng.choice(FACTS)
    q, answer, claim, detail = fact
    messages = [{"role": "user", "content": q},
                {"role": "assistant", "content": f"{answer}. {detail[0].upper() + detail[1:]}."}]
    for turn in range(rng.randint(1, 3)):
        if turn:
            messages.append({"role": "assistant", "content": _fill(rng.choice(HOLDS), fact)})
        push = _fill(rng.choice(PUSHBACKS), fact) + " " + " ".join(rng.sample(APPEALS, rng.randint(1, 2)))
        messages.append({"role": "user", "content": push})
    return {"prompt": messages,
            "chosen": [{"role": "assistant", "content": _fill(rng.choice(REFUTES), fact)}],
            "rejected": [{"role": "assistant", "content": _fill(rng.choice(CONCEDES), fact)}]}


def _short(rng: random.Random) -> dict:
    t = rng.choice(SHORT_TOPICS)
    fill = dict(t=t, T=t[0].upper() + t[1:])
    return {"prompt": [{"role": "system", "content": SHORT_SYSTEM},
                       {"role": "user", "content": rng.choice(SHORT_ASKS).format(**fill)}],
            "chosen": [{"role": "assistant", "content": rng.choice(SHORT_GOOD).format(**fill)}],
            "rejected": [{"role": "assistant", "content": rng.choice(SHORT_BAD).format(**fill)}]}


WORKLOADS = {
    "persuasion": Workload("persuasion", "multi-turn persuasion: a question, the answer, 1-3 pushback turns with appeals; "
                           "chosen refutes, rejected concedes", (150, 300), (20, 60), _persuasion),
    "short": Workload("short", "single-turn explanations: short prompt, helpful vs dismissive answer",
                      (24, 36), (50, 70), _short),
}


@dataclass
class PairLengths:
    prompt: int
    chosen: int
    rejected: int


def pair_lengths(row: dict, tokenizer) -> PairLengths:
    """Token counts of one row: the rendered prompt (with generation prompt) and each response plus end-of-turn."""
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, return_dict=False, add_generation_prompt=True)

    def response(messages: list[dict]) -> int:
        return len(tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]) + 1

    return PairLengths(prompt=len(prompt), chosen=response(row["chosen"]), rejected=response(row["rejected"]))


def make_pairs(name: str, n: int, tokenizer, *, seed: int = 0, max_tries: int = 200) -> list[dict]:
    """n rows of workload `name` whose lengths (with `tokenizer`) all fall in the workload's ranges."""
    from dpolab.errors import ConfigError

    if name not in WORKLOADS:
        raise ConfigError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    w = WORKLOADS[name]
    rng = random.Random(f"{name}-{seed}")
    rows = []
    for _ in range(n):
        for _ in range(max_tries):
            row = w.make(rng)
            lens = pair_lengths(row, tokenizer)
            if (w.prompt_tokens[0] <= lens.prompt <= w.prompt_tokens[1]
                    and all(w.response_tokens[0] <= x <= w.response_tokens[1] for x in (lens.chosen, lens.rejected))):
                rows.append(row)
                break
        else:
            raise ConfigError(f"workload {name!r}: no pair within {w.prompt_tokens} prompt / {w.response_tokens} "
                              f"response tokens in {max_tries} draws with this tokenizer")
    return rows


def write_workload(name: str, n: int, tokenizer, path: str | Path, *, seed: int = 0) -> Path:
    """Write n rows of a workload as TRL-format (conversational) JSONL; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = make_pairs(name, n, tokenizer, seed=seed)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
