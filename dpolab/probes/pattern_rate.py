"""Pattern rate: how often greedy replies show a named unwanted pattern (default: references to earlier context
that never existed), and whether the rest of the output stayed intact.

The model answers the test split of `assets/pattern/prompts.jsonl` greedily: `invite` prompts ask about an
earlier conversation that never happened ("Remind me what you said about...", "Same as before: ..."), `neutral`
ones are plain questions (the floor). Each reply is cut into sentences and the pattern's lines counted
(`dpolab.patterns`, the same pattern options and parsing as the `suppress-pattern` context).

Metrics, overall and per kind (`invite:`, `neutral:`):
- pattern_lines_per_100 (the headline): per reply, its number of pattern lines x 100; the mean is pattern lines
  per 100 replies (the seed finding's 3.2-4.8x reduction is a ratio of this number).
- pattern_reply_share: the share of replies with at least one pattern line.

Quality guards, that the rest of the output is intact:
- reference_nll: per reference reply (`assets/pattern/reference_replies.jsonl`, good replies written for dpolab
  to neutral test prompts), its mean per-token negative log-likelihood given its prompt; a model that learned to
  suppress the pattern by degrading its language shows here.
- reply_tokens, frac_hit_limit: reply length and the share cut at `max_new_tokens`; removing sentences makes
  chosen shorter than rejected, so DPO on these pairs may shorten replies in general.
Knowledge accuracy, the other guard (the seed's "clinical accuracy"), comes from the `knowledge` probe: run it
beside this one.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean
from typing import Any

from dpolab import patterns
from dpolab.banks import spread
from dpolab.errors import ConfigError
from dpolab.models.chat import ChatModel
from dpolab.patterns import KINDS, ReferenceReply, read_prompts, read_references
from dpolab.probes.base import EvalContext, Headline, MetricTable, ProbeResult, ProbeSpec, mean_token_logps


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_invite, n_neutral: test prompts of each kind (None: all). max_new_tokens: reply bound (greedy).
    pattern, pattern_file: as the suppress-pattern context (None: the default pattern).
    prompts: a JSONL in the bank's schema replacing its test split (all its rows are used).
    n_references: reference replies scored (None: all; 0: skip reference_nll). references: a JSONL of
    {"id", "prompt", "reply"} replacing the shipped ones. samples: 0 reads one greedy reply per prompt; k > 0 reads
    k sampled replies per prompt at `temperature` (seeded), each prompt's value the mean over its k, so a rare
    pattern gives k times the events while the prompt stays the unit of the interval.
    """

    n_invite: int | None = 48
    n_neutral: int | None = 32
    max_new_tokens: int = 96
    pattern: str | list[str] | None = None
    pattern_file: str | None = None
    prompts: str | None = None
    n_references: int | None = None
    references: str | None = None
    samples: int = 0
    temperature: float = 0.7

    def __post_init__(self) -> None:
        from dpolab.contexts.base import check_min

        patterns.resolve(self.pattern, self.pattern_file)  # a bad regex or a missing file fails at load
        check_min("samples", self.samples, 0)
        if self.samples and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 to sample, got {self.temperature}")


def reference_nll(model: ChatModel, refs: list[ReferenceReply]) -> list[float]:
    """Mean per-token NLL of each reference reply given its prompt."""
    convs = [[{"role": "user", "content": r.prompt}] for r in refs]
    return [-lp[0] for lp in mean_token_logps(model, convs, [[r.reply] for r in refs])]


def run(model: ChatModel, ctx: EvalContext, options: Options) -> ProbeResult:
    pattern = patterns.resolve(options.pattern, options.pattern_file)
    pool = read_prompts(options.prompts, "test")
    sizes = {"invite": options.n_invite, "neutral": options.n_neutral}
    rows = [p for kind in KINDS for p in spread([p for p in pool if p.kind == kind], ctx.size(sizes[kind]),
                                                seed=ctx.seed, key=lambda p: ("", p.topic))]
    refs = read_references(options.references)
    refs = refs[:ctx.size(options.n_references)] if ctx.size(options.n_references) is not None else refs
    task = ctx.progress.task(f"pattern rate: {len(rows)} prompts, {len(refs)} references", total=2)
    convs = [[{"role": "user", "content": p.prompt}] for p in rows]
    k = options.samples
    if k:  # k seeded samples per prompt: reading r of prompt i is replies[r * len(rows) + i]
        replies = [g for r in range(k) for g in model.generate(
            convs, max_new_tokens=options.max_new_tokens, do_sample=True, temperature=options.temperature,
            seed=ctx.seed * 1000 + r)]
    else:
        replies = model.generate(convs, max_new_tokens=options.max_new_tokens)
    task.advance()
    nlls = reference_nll(model, refs) if refs else []
    task.advance()

    table = MetricTable()
    for prefix in ("", *(f"{kind}:" for kind in KINDS)):
        table.declare(f"{prefix}pattern_lines_per_100", higher_is_better=False)
        table.declare(f"{prefix}pattern_reply_share", higher_is_better=False)
    table.declare("reference_nll", higher_is_better=False)
    table.declare("reply_tokens", higher_is_better=False)
    table.declare("frac_hit_limit", higher_is_better=False)
    records: list[dict[str, Any]] = []
    n = len(rows)
    for i, p in enumerate(rows):  # each value the mean over the prompt's readings: the prompt is the unit
        readings = [replies[r * n + i] for r in range(max(1, k))]
        found = [patterns.matching_sentences(g.text, pattern) for g in readings]
        for prefix in ("", f"{p.kind}:"):
            table.add(f"{prefix}pattern_lines_per_100", p.id, 100.0 * fmean([len(f) for f in found]))
            table.add(f"{prefix}pattern_reply_share", p.id, fmean([float(bool(f)) for f in found]))
        table.add("reply_tokens", p.id, fmean([g.n_tokens for g in readings]))
        table.add("frac_hit_limit", p.id, fmean([float(g.hit_limit) for g in readings]))
        for r, (g, f) in enumerate(zip(readings, found)):
            records.append({"item_id": p.id, "sample": r if k else None, "kind": p.kind, "topic": p.topic,
                            "prompt": p.prompt, "reply": g.text, "score": float(len(f)), "pattern_lines": len(f),
                            "pattern_sentences": [s.text for s in f],
                            "pattern_rules": [pattern.rule(s.text) for s in f],
                            "reply_tokens": g.n_tokens, "hit_limit": g.hit_limit})
    for r, nll in zip(refs, nlls):
        table.add("reference_nll", r.id, nll)
        records.append({"item_id": r.id, "kind": "reference", "prompt": r.prompt, "reply": r.reply, "nll": nll,
                        "n_tokens": model.token_count(r.reply)})
    info = {"prompts": {kind: sum(p.kind == kind for p in rows) for kind in KINDS}, "references": len(refs),
            "max_new_tokens": options.max_new_tokens, "pattern": pattern.describe(),
            "decoding": f"{k} samples per prompt at temperature {options.temperature}" if k else "greedy",
            "guards": "reference_nll, reply_tokens and frac_hit_limit here; knowledge accuracy from the knowledge probe"}
    return table.result("pattern_rate", records=records, info=info, seed=ctx.seed, n_boot=ctx.n_boot)


PROBE = ProbeSpec(
    name="pattern_rate", options=Options, run=run, default=False,
    summary="lines of a named unwanted pattern (default: references to earlier context that never existed) in "
            "replies, with reference-reply NLL and length as guards",
    headlines=(Headline("hallucinated-context lines per 100 replies", "pattern_lines_per_100", False),),
    quick={"n_invite": 8, "n_neutral": 4, "max_new_tokens": 48, "n_references": 6},
)
