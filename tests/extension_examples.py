"""A throwaway probe and a throwaway context, each written as a new dpolab file would be: tests/test_extending.py
registers them with one registry line each and finds them everywhere dpolab shows probes and contexts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpolab.contexts.base import ContextData, ContextSpec
from dpolab.data.schema import PreferencePair
from dpolab.probes.base import EvalContext, Headline, MetricTable, ProbeResult, ProbeSpec
from dpolab.banks import Instruction, asset, bank_split, read_jsonl, spread


@dataclass(frozen=True, kw_only=True)
class WordsOptions:
    """n_instructions: test instructions. max_new_tokens: reply bound."""

    n_instructions: int = 4
    max_new_tokens: int = 12


def run_words(model, ctx: EvalContext, options: WordsOptions) -> ProbeResult:
    rows = spread(bank_split(read_jsonl(asset("instructions.jsonl"), Instruction), "test"), options.n_instructions,
                  seed=ctx.seed)
    replies = model.generate([[{"role": "user", "content": r.instruction}] for r in rows],
                             max_new_tokens=options.max_new_tokens)
    table = MetricTable()
    table.declare("words", higher_is_better=False)
    records: list[dict[str, Any]] = []
    for r, g in zip(rows, replies):
        table.add("words", r.id, len(g.text.split()))
        records.append({"item_id": r.id, "instruction": r.instruction, "reply": g.text})
    return table.result("reply_words", records=records, seed=ctx.seed, n_boot=ctx.n_boot)


WORDS_PROBE = ProbeSpec(name="reply_words", options=WordsOptions, run=run_words, summary="words per greedy reply",
                        headlines=(Headline("words per reply", "words", False),), quick={"n_instructions": 2})


@dataclass(frozen=True, kw_only=True)
class ShortOptions:
    """n_instructions: train instructions, two samples each. max_new_tokens: sample bound."""

    n_instructions: int = 4
    max_new_tokens: int = 16


def build_short(model, *, options: ShortOptions, seed: int, limit: int | None = None, progress=None) -> ContextData:
    rows = spread(bank_split(read_jsonl(asset("instructions.jsonl"), Instruction), "train"), options.n_instructions,
                  seed=seed)
    convs = [[{"role": "user", "content": r.instruction}] for r in rows]
    a = model.generate(convs, max_new_tokens=options.max_new_tokens, do_sample=True, seed=seed)
    b = model.generate(convs, max_new_tokens=options.max_new_tokens, do_sample=True, seed=seed + 1)
    pairs = []
    for r, x, y in zip(rows, a, b):
        short, long = sorted((x.text, y.text), key=len)
        if short.strip() and long.strip() and short != long:
            pairs.append(PreferencePair(id=f"prefer-short/{r.id}", prompt=[{"role": "user", "content": r.instruction}],
                                        chosen=short, rejected=long,
                                        meta={"context": "prefer-short", "kind": "shorter"}))
    return ContextData(pairs=pairs, info={"pairs": len(pairs)})


SHORT_CONTEXT = ContextSpec(name="prefer-short", options=ShortOptions, build=build_short, quick={"n_instructions": 2},
                            banks=("instructions.jsonl",))
