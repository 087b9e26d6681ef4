"""detox: DPO for toxicity (as in Lee et al. 2024, arXiv:2401.01967, who pair non-toxic over toxic continuations),
built on-policy: k sampled replies per provocative train prompt, scored by the toxicity probe's scorer.

chosen = the sample with the lowest toxicity, rejected = the highest. Scores are kept for ODPO (Amini et al. 2024,
arXiv:2402.10571), which needs score_chosen > score_rejected: score = score_scale·(1 − toxicity), in toxicity points
by default (0–100). ODPO's default offset is α·log(1 + gap) (dpolab.losses.odpo): zero for a zero gap, positive and
growing with the toxicity gap, about α·log(gap) once the gap is several points. On the 0–1 scale with the paper's
f = log, the median gap of the default run (0.093) gave log(gap) < 0 for nearly every pair, so ODPO asked for less
margin than DPO (its loss started at 0.203, below log 2). info["odpo"] summarises the gaps and the offsets they
give at the loss's defaults (α = 1, f = log1p), from the function the loss uses, and the loss they imply at the
reference. Prompts whose best and worst samples are within `min_gap` (ties; identical samples) give no pair and
are counted in info["skipped_ties"]. The scorer reads the reply only, as the probe does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dpolab.contexts import ideal as ideal_mod
from dpolab.contexts.base import ContextData, ContextSpec, cap, check_choice, check_min, special_strings, usable
from dpolab.data.schema import PreferencePair
from dpolab.errors import ConfigError
from dpolab.losses.odpo import DEFAULT_OFFSET, offset_summary
from dpolab.models.chat import ChatModel
from dpolab import scorers
from dpolab.progress import NullProgress, Progress
from dpolab.banks import Prompt, asset, bank_split, read_jsonl, spread

NAME = "detox"


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_prompts: provocative train prompts. k: samples per prompt (at least 2).
    temperature: sampling temperature. max_new_tokens: reply bound (the probe's default).
    scorer: a name in dpolab.scorers.SCORERS (the probe's default: profanity).
    min_gap: a prompt gives a pair only when its worst sample's toxicity exceeds its best's by more than this
        (0: only exact ties are skipped).
    score_scale: score_chosen/score_rejected are score_scale·(1 − toxicity) (100: toxicity points).
    calm_candidate: also offer an ideal calm reply (template or endpoint) among each prompt's candidates.
    ideal: "templates" or "endpoint", for calm_candidate.
    prompts: a JSONL of {"id","prompt"} replacing the shipped bank's train split (all its rows are used).
    """

    n_prompts: int | None = 48
    k: int = 3
    temperature: float = 1.0
    max_new_tokens: int = 48
    scorer: str = "profanity"
    min_gap: float = 0.0
    score_scale: float = 100.0
    calm_candidate: bool = False
    ideal: Literal["templates", "endpoint"] = "templates"
    prompts: str | None = None

    def __post_init__(self) -> None:
        check_min("n_prompts", self.n_prompts, 1)
        check_min("k", self.k, 2)
        check_min("max_new_tokens", self.max_new_tokens, 1)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive (the samples must differ), got {self.temperature}")
        check_min("min_gap", self.min_gap, 0.0)
        if self.score_scale <= 0:
            raise ConfigError(f"score_scale must be positive, got {self.score_scale}")
        scorers.SCORERS.check(self.scorer)
        check_choice("ideal", self.ideal, ideal_mod.SOURCES)


def build(model: ChatModel, *, options: Options, seed: int, limit: int | None = None,
          progress: Progress | None = None) -> ContextData:
    score = scorers.SCORERS.get(options.scorer)
    pool = read_jsonl(options.prompts, Prompt) if options.prompts else bank_split(
        read_jsonl(asset("toxicity_prompts.jsonl"), Prompt), "train")
    prompts = spread(pool, cap(options.n_prompts, limit), seed=seed, key=lambda p: ("", ""))
    task = (progress or NullProgress()).task("context: detox samples", total=1)
    convs = [[{"role": "user", "content": p.prompt}] for p in prompts for _ in range(options.k)]
    replies = model.generate(convs, max_new_tokens=options.max_new_tokens, do_sample=True,
                             temperature=options.temperature, seed=seed)
    task.advance()
    calm: list[str] = []
    if options.calm_candidate:
        writer = ideal_mod.writer(options.ideal, seed=seed)
        calm = writer.write([ideal_mod.Request("calm_reply", [{"role": "user", "content": p.prompt}], {}, key=(p.id,))
                             for p in prompts])
    specials = special_strings(model)
    texts = [r.text for r in replies]
    tox = score(texts + calm)
    pairs: list[PreferencePair] = []
    ties = unusable = too_few = 0
    k = options.k
    for j, p in enumerate(prompts):
        cands = [(texts[j * k + i], tox[j * k + i], "sample", replies[j * k + i].n_tokens) for i in range(k)]
        if calm:
            cands.append((calm[j], tox[len(texts) + j], "calm_reply", model.token_count(calm[j])))
        good = [c for c in cands if usable(c[0], specials)]
        unusable += len(cands) - len(good)
        if len(good) < 2:
            too_few += 1
            continue
        best = min(good, key=lambda c: c[1])
        worst = max(good, key=lambda c: c[1])
        if worst[1] - best[1] <= options.min_gap or best[0] == worst[0]:
            ties += 1
            continue
        pairs.append(PreferencePair(
            id=f"{p.id}/detox", prompt=[{"role": "user", "content": p.prompt}], chosen=best[0], rejected=worst[0],
            score_chosen=options.score_scale * (1.0 - best[1]), score_rejected=options.score_scale * (1.0 - worst[1]),
            meta={"context": NAME, "kind": "detox", "item_id": p.id, "toxicity_chosen": best[1],
                  "toxicity_rejected": worst[1], "chosen_source": best[2], "rejected_source": worst[2],
                  "tokens_chosen": best[3], "tokens_rejected": worst[3],
                  "toxicity_samples": [c[1] for c in cands]},
        ))
    gaps = [p.meta["toxicity_rejected"] - p.meta["toxicity_chosen"] for p in pairs]
    info = {
        "prompts": len(prompts), "k": k, "scorer": options.scorer, "temperature": options.temperature,
        "max_new_tokens": options.max_new_tokens, "pairs": len(pairs), "pairs_by_kind": {"detox": len(pairs)},
        "skipped_ties": ties, "unusable_samples": unusable,
        "skipped_too_few_usable": too_few, "calm_candidate": options.calm_candidate,
        "score": f"{options.score_scale:g} * (1 - toxicity) (score_chosen > score_rejected)",
        "score_scale": options.score_scale,
        "odpo": offset_summary([p.score_chosen - p.score_rejected for p in pairs], alpha=1.0, offset=DEFAULT_OFFSET),
        "mean_toxicity_samples": sum(tox[: len(texts)]) / max(1, len(texts)),
        "mean_gap": sum(gaps) / len(gaps) if gaps else None,
        "pairs_gap_above_0.5": sum(g > 0.5 for g in gaps),
        "samples_hit_limit": sum(r.hit_limit for r in replies),
    }
    return ContextData(pairs=pairs, info=info)


def uses_endpoint(options: Options) -> bool:
    """Endpoint replies enter the pairs only as the calm candidate."""
    return options.calm_candidate and options.ideal == "endpoint"


CONTEXT = ContextSpec(name=NAME, options=Options, build=build, quick={"n_prompts": 8, "k": 2},
                      file_options=("prompts",), banks=("toxicity_prompts.jsonl", "ideal_replies.jsonl"),
                      uses_endpoint=uses_endpoint)
