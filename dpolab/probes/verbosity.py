"""Verbosity: greedy replies to general instructions, measured in tokens.

Length is the behaviour DPO is known to inflate (Park et al. 2024, arXiv:2403.19159; iLR-DPO, arXiv:2406.11817),
so it is reported on its own: mean, median and 90th percentile of reply tokens, and how often the reply was cut
off at the token limit (a cut-off reply's true length is unknown and at least the limit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpolab.models.chat import ChatModel
from dpolab.probes.base import EvalContext, Headline, MetricTable, ProbeResult, ProbeSpec
from dpolab.banks import Instruction, asset, bank_split, read_jsonl, spread


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_instructions: test instructions. max_new_tokens: the limit; hitting it counts as cut off.
    instructions: a JSONL of {"id","instruction"} replacing the shipped bank's test split.
    """

    n_instructions: int | None = 32  # one generate batch at the default --batch-size
    max_new_tokens: int = 256
    instructions: str | None = None


def run(model: ChatModel, ctx: EvalContext, options: Options) -> ProbeResult:
    rows = (read_jsonl(options.instructions, Instruction) if options.instructions
            else bank_split(read_jsonl(asset("instructions.jsonl"), Instruction), "test"))
    rows = spread(rows, ctx.size(options.n_instructions), seed=ctx.seed)
    task = ctx.progress.task(f"verbosity: {len(rows)} instructions", total=1)
    replies = model.generate([[{"role": "user", "content": r.instruction}] for r in rows],
                             max_new_tokens=options.max_new_tokens)
    task.advance()
    table = MetricTable()
    table.declare("mean_tokens", higher_is_better=False)
    table.declare("median_tokens", higher_is_better=False, aggregate="median")
    table.declare("p90_tokens", higher_is_better=False, aggregate="p90")
    table.declare("frac_hit_limit", higher_is_better=False)
    records: list[dict[str, Any]] = []
    for r, g in zip(rows, replies):
        for name in ("mean_tokens", "median_tokens", "p90_tokens"):
            table.add(name, r.id, g.n_tokens)
        table.add("frac_hit_limit", r.id, float(g.hit_limit))
        records.append({"item_id": r.id, "instruction": r.instruction, "reply": g.text,
                        "reply_tokens": g.n_tokens, "hit_limit": g.hit_limit})
    info = {"instructions": len(rows), "max_new_tokens": options.max_new_tokens}
    return table.result("verbosity", records=records, info=info, seed=ctx.seed, n_boot=ctx.n_boot)


PROBE = ProbeSpec(
    name="verbosity", options=Options, run=run, report="verbosity",
    summary="reply length to general instructions",
    headlines=(Headline("reply length (tokens)", "mean_tokens", False),),
    quick={"n_instructions": 6, "max_new_tokens": 64},
)
