"""length-biased-judge: two sampled replies per instruction, the longer one chosen: a judge with the length bias of
common reward models, the setting in which DPO inflates verbosity (Park et al. 2024, arXiv:2403.19159; iLR-DPO,
arXiv:2406.11817).

Length is the reply's token count under the model's tokenizer. Ties (equal lengths) give no pair and are counted.
The judge's scores are kept: score = token count, so ODPO's offset is alpha * log(length difference).
"""
from __future__ import annotations

from dataclasses import dataclass

from dpolab.contexts.base import ContextData, ContextSpec, cap, check_min, special_strings, usable
from dpolab.data.schema import PreferencePair
from dpolab.errors import ConfigError
from dpolab.models.chat import ChatModel
from dpolab.progress import NullProgress, Progress
from dpolab.banks import Instruction, asset, bank_split, read_jsonl, spread
from dpolab.losses.odpo import offset_summary

NAME = "length-biased-judge"


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_instructions: train instructions, two samples each.
    temperature: sampling temperature. max_new_tokens: reply bound; a cut-off reply counts at the bound, so two
        cut-off replies tie (SmolLM2-135M at temperature 1 runs past 160 tokens about half the time).
    instructions: a JSONL of {"id","instruction"} replacing the shipped bank's train split.
    """

    n_instructions: int | None = 40
    temperature: float = 1.0
    max_new_tokens: int = 160
    instructions: str | None = None

    def __post_init__(self) -> None:
        check_min("n_instructions", self.n_instructions, 1)
        check_min("max_new_tokens", self.max_new_tokens, 1)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive (the samples must differ), got {self.temperature}")


def build(model: ChatModel, *, options: Options, seed: int, limit: int | None = None,
          progress: Progress | None = None) -> ContextData:
    pool = (read_jsonl(options.instructions, Instruction) if options.instructions
            else bank_split(read_jsonl(asset("instructions.jsonl"), Instruction), "train"))
    rows = spread(pool, cap(options.n_instructions, limit), seed=seed, key=lambda r: ("", ""))
    task = (progress or NullProgress()).task("context: length samples", total=1)
    convs = [[{"role": "user", "content": r.instruction}] for r in rows for _ in range(2)]
    replies = model.generate(convs, max_new_tokens=options.max_new_tokens, do_sample=True,
                             temperature=options.temperature, seed=seed)
    task.advance()
    specials = special_strings(model)
    pairs: list[PreferencePair] = []
    ties = unusable = 0
    for j, r in enumerate(rows):
        a, b = replies[2 * j], replies[2 * j + 1]
        if not (usable(a.text, specials) and usable(b.text, specials)):
            unusable += 1
            continue
        if a.n_tokens == b.n_tokens:
            ties += 1
            continue
        long, short = (a, b) if a.n_tokens > b.n_tokens else (b, a)
        pairs.append(PreferencePair(
            id=f"{r.id}/length", prompt=[{"role": "user", "content": r.instruction}], chosen=long.text,
            rejected=short.text, score_chosen=float(long.n_tokens), score_rejected=float(short.n_tokens),
            meta={"context": NAME, "kind": "length", "item_id": r.id, "tokens_chosen": long.n_tokens,
                  "tokens_rejected": short.n_tokens, "chosen_hit_limit": long.hit_limit,
                  "rejected_hit_limit": short.hit_limit},
        ))
    n = max(1, len(pairs))
    info = {
        "instructions": len(rows), "temperature": options.temperature, "max_new_tokens": options.max_new_tokens,
        "pairs": len(pairs), "pairs_by_kind": {"length": len(pairs)}, "skipped_ties": ties,
        "skipped_unusable": unusable, "score": "reply tokens (the judge prefers longer)",
        "mean_tokens_chosen": sum(p.meta["tokens_chosen"] for p in pairs) / n,
        "mean_tokens_rejected": sum(p.meta["tokens_rejected"] for p in pairs) / n,
        "chosen_hit_limit": sum(p.meta["chosen_hit_limit"] for p in pairs),
        "odpo": offset_summary([p.score_chosen - p.score_rejected for p in pairs], alpha=1.0),
    }
    return ContextData(pairs=pairs, info=info)


CONTEXT = ContextSpec(name=NAME, options=Options, build=build, quick={"n_instructions": 8, "max_new_tokens": 64},
                      file_options=("instructions",), banks=("instructions.jsonl",))
