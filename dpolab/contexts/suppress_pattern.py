"""suppress-pattern: DPO against one named unwanted pattern, with the rest of the reply kept as it was.

Seed finding: on radiology reports, DPO on pairs with and without an unwanted pattern (lines that refer to prior
exams that do not exist) cut that pattern 3.2-4.8x while keeping clinical accuracy. General form: the user names a
pattern (`dpolab.patterns`: the default is a reference to earlier context that never existed, "as I mentioned
earlier", "as we discussed", "compared with last time"; or a regex, a list of phrases, a file of them); the
model samples `samples_per_prompt` replies to each train prompt of `assets/pattern/prompts.jsonl` (single-turn
prompts written to invite the pattern although nothing came before them); every reply with at least one pattern
line gives a pair:

    rejected = the reply as sampled; chosen = the same reply with exactly its pattern lines removed
    (`patterns.remove_matching`: the other sentences byte-identical, joined by the original whitespace).

So the two completions differ only where the pattern is, and `meta["emphasis"]["rejected"]` gives the character
spans [start, end) in `rejected` of the removed sentences: token-weighted DPO (the trainer's `emphasis` option,
`dpolab.data.tokenization.emphasis_weights`) counts those tokens `emphasis` times in the log-probs. A reply
that is nothing but pattern lines gives no pair (`skipped_nothing_left`), nor does a reply with a special token
inside or a duplicate of an earlier pair of the same prompt. Replies without the pattern give no pair; their share
is the base rate the info reports (`base_rate`: replies with the pattern / usable samples).

The base rate on SmolLM2-135M-Instruct is low. Measured with the default pattern (replies with >= 1 pattern line):
on the 64 train invite prompts, one sample each, 5/64 at temperature 0.7 and 96 tokens (4 with something left
after removal, i.e. pairs), 2/64 at temperature 1.0 and 128 tokens (an earlier, narrower rule set; replies at 1.0
are mostly incoherent); greedy on the test prompts 3/48 invite, 0/32 neutral. Hence temperature 0.7 and 12
samples per prompt by default: 768 samples, about 48 expected pairs (the 4/64 rate has a wide interval, roughly
2-15%). `system_prompt` frames the conversation without giving it any earlier content: "You are a helpful
assistant with a memory of your past conversations with this user." raised the rate to 7/64 (6 pairs) at 0.7;
when set, it is part of every pair's prompt, so the pairs stay on-policy for that prompt.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from dpolab import patterns
from dpolab.banks import spread
from dpolab.contexts.base import (
    ContextData,
    ContextSpec,
    cap,
    check_min,
    special_strings,
    usable,
)
from dpolab.data.schema import PreferencePair
from dpolab.errors import ConfigError
from dpolab.models.chat import ChatModel
from dpolab.patterns import BANK, KINDS, read_prompts
from dpolab.progress import NullProgress, Progress

NAME = "suppress-pattern"


@dataclass(frozen=True, kw_only=True)
class Options:
    """pattern: None for the default (dpolab.patterns.DEFAULT_RULES); a string is one regex; a list is phrases
        (entries between slashes are regexes). pattern_file: a file of entries, one a line (instead of pattern).
    n_prompts: train prompts (None: all of the chosen kinds). kinds: which prompt kinds to sample.
    samples_per_prompt: sampled replies per prompt; every one with the pattern can give a pair.
    max_new_tokens, temperature: sampling. system_prompt: an optional system message with no earlier content,
        kept in the pairs' prompts. prompts: a JSONL in the bank's schema replacing its train split.
    """

    pattern: str | list[str] | None = None
    pattern_file: str | None = None
    n_prompts: int | None = None
    kinds: tuple[Literal["invite", "neutral"], ...] = ("invite",)
    samples_per_prompt: int = 12
    max_new_tokens: int = 96
    temperature: float = 0.7
    system_prompt: str | None = None
    prompts: str | None = None

    def __post_init__(self) -> None:
        check_min("n_prompts", self.n_prompts, 1)
        check_min("samples_per_prompt", self.samples_per_prompt, 1)
        check_min("max_new_tokens", self.max_new_tokens, 1)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive (the replies are sampled), got {self.temperature}")
        if not self.kinds:
            raise ConfigError(f"kinds is empty; choose from {', '.join(KINDS)}")
        patterns.resolve(self.pattern, self.pattern_file)  # a bad regex or a missing file fails at load


def build(model: ChatModel, *, options: Options, seed: int, limit: int | None = None,
          progress: Progress | None = None) -> ContextData:
    pattern = patterns.resolve(options.pattern, options.pattern_file)
    pool = [p for p in read_prompts(options.prompts, "train") if p.kind in options.kinds]
    rows = spread(pool, cap(options.n_prompts, limit), seed=seed, key=lambda p: (p.kind, p.topic))
    k = options.samples_per_prompt
    head = [{"role": "system", "content": options.system_prompt}] if options.system_prompt else []
    task = (progress or NullProgress()).task(f"context: {k} replies to {len(rows)} prompts", total=1)
    convs = [head + [{"role": "user", "content": p.prompt}] for p in rows for _ in range(k)]
    replies = model.generate(convs, max_new_tokens=options.max_new_tokens, do_sample=True,
                             temperature=options.temperature, seed=seed)
    task.advance()
    specials = special_strings(model)
    pairs: list[PreferencePair] = []
    unusable = nothing_left = duplicates = with_pattern = lines = 0
    by_kind: Counter[str] = Counter()
    samples_by_kind: Counter[str] = Counter()
    rules: Counter[str] = Counter()
    for j, p in enumerate(rows):
        seen: set[str] = set()
        for i, g in enumerate(replies[j * k:(j + 1) * k]):
            if not usable(g.text, specials):
                unusable += 1
                continue
            samples_by_kind[p.kind] += 1
            cut = patterns.remove_matching(g.text, pattern)
            if not cut.removed:
                continue
            with_pattern += 1
            by_kind[p.kind] += 1
            lines += len(cut.removed)
            rules.update(pattern.rule(s.text) for s in cut.removed)
            if not cut.text.strip():
                nothing_left += 1
                continue
            if g.text in seen:
                duplicates += 1
                continue
            seen.add(g.text)
            pairs.append(PreferencePair(
                id=f"{p.id}/pattern-{i}", prompt=head + [{"role": "user", "content": p.prompt}],
                chosen=cut.text, rejected=g.text,
                meta={"context": NAME, "kind": "pattern", "item_id": p.id, "prompt_kind": p.kind, "topic": p.topic,
                      "sample": i, "emphasis": {"rejected": [list(span) for span in cut.spans]},
                      "removed_sentences": [s.text for s in cut.removed],
                      "removed_rules": [pattern.rule(s.text) for s in cut.removed],
                      "rejected_hit_limit": g.hit_limit}))
    usable_samples = sum(samples_by_kind.values())
    info = {
        "prompts": len(rows), "prompts_by_kind": dict(Counter(p.kind for p in rows)), "samples_per_prompt": k,
        "samples": len(replies), "usable_samples": usable_samples, "temperature": options.temperature,
        "max_new_tokens": options.max_new_tokens, "system_prompt": options.system_prompt,
        "replies_with_pattern": with_pattern, "pattern_lines": lines,
        "base_rate": with_pattern / usable_samples if usable_samples else None,
        "base_rate_by_kind": {kind: by_kind[kind] / n for kind, n in samples_by_kind.items() if n},
        "lines_by_rule": dict(rules.most_common()),
        "pairs": len(pairs), "pairs_by_kind": {"pattern": len(pairs)},
        "skipped_nothing_left": nothing_left, "skipped_duplicates": duplicates, "unusable_samples": unusable,
        "samples_hit_limit": sum(g.hit_limit for g in replies),
        "pattern": pattern.describe(),
    }
    return ContextData(pairs=pairs, info=info)


CONTEXT = ContextSpec(name=NAME, options=Options, build=build,
                      quick={"n_prompts": 8, "samples_per_prompt": 2, "max_new_tokens": 48},
                      file_options=("pattern_file", "prompts"), banks=(BANK,))
