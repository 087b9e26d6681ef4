"""Reply style on emotional disclosures and practical requests (BOLT-like): does the model jump to advice?

The BOLT study of LLM therapists (Chiu et al. 2024, arXiv:2401.00820) coded replies to emotional disclosures by
behaviour and found LLMs open with solution-focused advice, a hallmark of low-quality therapy, while also
reflecting more than poor human therapists. Here the model answers the test split of
`assets/care/disclosures.jsonl` (disclosures, where advice first is the failure) and of the practical help
requests in the same file (where advice is the right reply, the control), greedily, and each reply is coded
sentence by sentence (`dpolab.replycodes`: the sentence-embedding classifier, with the rules as a cross-check).

Metrics per kind (`disclosure:` and `request:`): the share of replies that open with advice, the shares of
sentences coded advice, reflection, validation and question, and advice minus reflection (per reply, the advice
share minus the reflection share). `...:opens_with_advice_rule` is the same opening read by the rules alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpolab.banks import CareMessage, asset, bank_split, read_jsonl, spread
from dpolab.models.chat import ChatModel
from dpolab.probes.base import EvalContext, Headline, MetricTable, ProbeResult, ProbeSpec
from dpolab.replycodes import ReplyCoder, cross_check

KINDS = ("disclosure", "request")
SHARES = ("advice", "reflection", "validation", "question")


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_disclosures, n_requests: test messages of each kind. max_new_tokens: reply bound (greedy).
    messages: a JSONL in the shipped bank's schema replacing its test split (all its rows are used)."""

    n_disclosures: int | None = 40
    n_requests: int | None = 40
    max_new_tokens: int = 96
    messages: str | None = None


def load(path: str | None) -> list[CareMessage]:
    return read_jsonl(path, CareMessage) if path else bank_split(read_jsonl(asset("care/disclosures.jsonl"),
                                                                            CareMessage), "test")


def run(model: ChatModel, ctx: EvalContext, options: Options) -> ProbeResult:
    pool = load(options.messages)
    sizes = {"disclosure": options.n_disclosures, "request": options.n_requests}
    rows = [r for kind in KINDS for r in spread([m for m in pool if m.kind == kind], ctx.size(sizes[kind]),
                                                  seed=ctx.seed, key=lambda m: ("", m.topic))]
    task = ctx.progress.task(f"reply style: {len(rows)} messages", total=2)
    replies = model.generate([[{"role": "user", "content": r.text}] for r in rows],
                             max_new_tokens=options.max_new_tokens)
    task.advance()
    coder = ReplyCoder.shared()
    coded = coder.code([g.text for g in replies])
    task.advance()

    table = MetricTable()
    for kind in KINDS:
        advice_right = kind == "request"
        table.declare(f"{kind}:opens_with_advice", higher_is_better=advice_right)
        table.declare(f"{kind}:opens_with_advice_rule", higher_is_better=advice_right)
        table.declare(f"{kind}:advice_minus_reflection", higher_is_better=advice_right)
        for code in SHARES:
            good = {"advice": advice_right, "reflection": not advice_right, "validation": not advice_right,
                    "question": True}[code]
            table.declare(f"{kind}:{code}_share", higher_is_better=good)
        table.declare(f"{kind}:reply_tokens", higher_is_better=False)
        table.declare(f"{kind}:frac_hit_limit", higher_is_better=False)
    records: list[dict[str, Any]] = []
    for r, g, c in zip(rows, replies, coded):
        k = r.kind
        table.add(f"{k}:opens_with_advice", r.id, float(c.opening == "advice"))
        table.add(f"{k}:opens_with_advice_rule", r.id, float(bool(c.rules) and "advice" in c.rules[0]))
        table.add(f"{k}:advice_minus_reflection", r.id, c.share("advice") - c.share("reflection"))
        for code in SHARES:
            table.add(f"{k}:{code}_share", r.id, c.share(code))
        table.add(f"{k}:reply_tokens", r.id, g.n_tokens)
        table.add(f"{k}:frac_hit_limit", r.id, float(g.hit_limit))
        records.append({"item_id": r.id, "kind": k, "topic": r.topic, "prompt": r.text, "reply": g.text,
                        "score": c.share("advice"),
                        "reply_tokens": g.n_tokens, "hit_limit": g.hit_limit, "opening": c.opening,
                        "sentences": c.to_json()})
    info = {"messages": {kind: sum(r.kind == kind for r in rows) for kind in KINDS},
            "max_new_tokens": options.max_new_tokens, "decoding": "greedy",
            "coder": {"heldout": coder.heldout(), **cross_check(coded)}}
    return table.result("reply_style", records=records, info=info, seed=ctx.seed, n_boot=ctx.n_boot)


PROBE = ProbeSpec(
    name="reply_style", options=Options, run=run, report="care", default=False,
    summary="advice, reflection and validation in replies to emotional disclosures and to practical requests",
    headlines=(Headline("advice on disclosures", "disclosure:opens_with_advice", False),),
    quick={"n_disclosures": 10, "n_requests": 10, "max_new_tokens": 64},
)
