"""curriculum: Curry-DPO (Pattnaik et al. 2024, arXiv:2403.07230): k sampled replies per prompt ranked by a judge,
the best paired with each other reply, trained in stages from easy (a large score gap) to hard (a small one).

The paper's construction (its Fig. 1 and §3): replies ranked r1 > r2 > ... > rk by their ratings give the pairs
(r1, rk), (r1, r(k-1)), ..., (r1, r2), ordered by the rating difference of chosen and rejected, largest first (the
"easy", most discriminative pair); iteration i trains DPO on each prompt's i-th pair, starting from iteration
i-1's model and, in the iterative variant, with that model as the reference. Here the ratings are a judge's scores
(dpolab.judges) of the base model's own samples, so the method runs on any context's prompts.

Files in the cell's work folder, kept for --resume:
    samples.jsonl      first line {"settings": ...}, then one row per prompt: its k replies and their scores.
                       Reused when the settings (model, seed, k, temperature, max_new_tokens, prompts) match;
                       rescored without resampling when only the judge changed.
    pairs/stage-S.jsonl  each stage's pairs (TRL format; meta holds the gap and the rejected reply's rank).
    stage-S/           the stage's train() folder (model/, metrics.jsonl; checkpoints/ until it is done, for a stage
                       cut short); stage-S/DONE (the stage's record, JSON) marks it finished: a resumed cell skips it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dpolab.errors import ConfigError
from dpolab.methods import CellJob, MethodKind, Tuned, context_prompts

ORDERS = ("gap", "reverse", "none")
BUDGETS = ("equal", "per-stage")
# the judge a context's own pairs were chosen by, when the method's options name none
DEFAULT_MAX_NEW_TOKENS = 64  # for contexts without a max_new_tokens option of their own


@dataclass(frozen=True, kw_only=True)
class Options:
    """k: replies sampled per prompt from the base model (at least 3: two pairs per prompt make a curriculum; the
        paper ranks 4 per prompt).
    temperature: sampling temperature.
    max_new_tokens: reply bound; None: the context's own max_new_tokens option, or 64 if it has none.
    judge: a name in dpolab.judges.JUDGES scoring the replies (higher is better); None: the context's own judge
        (detox -> toxicity, length-biased-judge -> length, resist-only and holistic -> correctness); other
        contexts must name one.
    judge_args: the judge's own options (e.g. {template: ..., model: ...} for judge model), checked at load.
    order: which pairs train first. Per prompt the pairs are the best reply against each other reply; a prompt's
        pairs are sorted by score gap, largest first (with r1 fixed as chosen, the gap s(r1) - s(rj) falls as rj's
        rank rises, so this is also the paper's order by the rejected reply's rank: (r1, rk) first).
          gap: easy -> hard, the paper's curriculum: stage s holds every prompt's s-th largest-gap pair.
          reverse: hard -> easy, the anti-curriculum control (stage s holds every prompt's s-th smallest-gap pair);
            not in the paper.
          none: every pair in one stage, shuffled: the paper's comparison of ordered multiple pairs against the
            same pairs without a curriculum.
    stages: how many stages (gap, reverse): the k - 1 pair ranks merged into this many consecutive groups, the
        earlier stages taking the extra rank when they do not divide evenly; None: k - 1 (the paper's setting).
    iterative_reference: each stage's reference is the previous stage's model (the paper's iterative Curry-DPO);
        false: every stage's reference is the original base model (its non-iterative variant).
    budget: equal: the stages share the optimizer steps single-pair DPO gets with the same train config (max_steps,
            else ceil(epochs x best-vs-worst pairs / batch_size)), in proportion to their pairs (at least one
            each), so a curriculum and its single-pair baseline are compared at the same compute;
        per-stage: every stage is a full train() run of its own (max_steps, else epochs over its pairs), as in
            the paper, which trains each iteration like a DPO run.
    single_pair: the baseline from the same samples: one stage of (best, worst) per prompt (order and stages do
        not apply). With the same k, temperature, judge and seed a `curriculum` cell and a `single_pair` cell on
        one context sample the same replies (info.samples_sha says so).
    """

    k: int = 4
    temperature: float = 1.0
    max_new_tokens: int | None = None
    judge: str | None = None
    judge_args: dict[str, Any] = field(default_factory=dict)
    order: Literal["gap", "reverse", "none"] = "gap"
    stages: int | None = None
    iterative_reference: bool = True
    budget: Literal["equal", "per-stage"] = "equal"
    single_pair: bool = False

    def __post_init__(self) -> None:
        if self.k < 3:
            raise ConfigError(f"k must be at least 3 (two pairs per prompt make a curriculum), got {self.k}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive (the samples must differ), got {self.temperature}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.judge is not None:
            from dpolab.judges import JUDGES, check_judge_args

            JUDGES.check(self.judge)
            check_judge_args(self.judge, self.judge_args)
        elif self.judge_args:
            raise ConfigError("judge_args needs a judge: set judge too")
        if self.stages is not None:
            most = 1 if self.order == "none" or self.single_pair else self.k - 1
            if not 1 <= self.stages <= most:
                why = "order none and single_pair train one stage" if most == 1 else f"k = {self.k} gives {most} pair ranks"
                raise ConfigError(f"stages must be between 1 and {most} ({why}), got {self.stages}")


# --- pairs and stages: pure functions of the scores ----------------------------------------------------------

@dataclass(frozen=True)
class RankedPair:
    """One pair of a prompt: sample indices and scores of the best reply (chosen) and another (rejected)."""

    prompt: int  # index of the prompt
    chosen: int  # sample index of the prompt's best reply
    rejected: int  # sample index of the other reply
    score_chosen: float
    score_rejected: float
    rank_rejected: int  # the rejected reply's rank among the prompt's usable replies, 2..k (1 = the best)

    @property
    def gap(self) -> float:
        return self.score_chosen - self.score_rejected


@dataclass
class PromptPairs:
    """A prompt's pairs, easy -> hard (gap falling), and the pairs left out because both replies tie."""

    pairs: list[RankedPair]
    ties: int


def rank_pairs(prompt: int, scores: Sequence[float | None], texts: Sequence[str] | None = None) -> PromptPairs:
    """The best reply against each other one, easy -> hard (Curry-DPO, arXiv:2403.07230 §3).

    scores: one per sample, None for an unusable sample (left out). Ranks sort by score, highest first, equal
        scores by sample index. Pairs run from (r1, rk) to (r1, r2), so their gaps s(r1) - s(rj) never rise; a pair
        whose two scores are equal (or whose two texts are the same) is a tie: skipped and counted.
    """
    ranked = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: (-scores[i], i))
    pairs: list[RankedPair] = []
    ties = 0
    if len(ranked) < 2:
        return PromptPairs(pairs, ties)
    best = ranked[0]
    for rank in range(len(ranked), 1, -1):  # rk first: the largest gap
        j = ranked[rank - 1]
        if scores[j] == scores[best] or (texts is not None and texts[j] == texts[best]):
            ties += 1
            continue
        pairs.append(RankedPair(prompt, best, j, float(scores[best]), float(scores[j]), rank))
    return PromptPairs(pairs, ties)


def assign_stages(prompts: Sequence[PromptPairs], *, order: str, k: int, stages: int | None = None) -> list[list[RankedPair]]:
    """The pairs of each stage, in training order; stages left empty (every prompt tied there) are dropped.

    gap: stage s holds each prompt's s-th pair easy -> hard; reverse: its s-th hard -> easy; none: one stage of all.
    stages: the k - 1 positions merged into this many consecutive groups (position p goes to p * stages // (k - 1)).
    """
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}; choose from {', '.join(ORDERS)}")
    if order == "none":
        return [[p for pp in prompts for p in pp.pairs]]
    levels = k - 1
    n = stages or levels
    out: list[list[RankedPair]] = [[] for _ in range(n)]
    for pp in prompts:
        seq = pp.pairs if order == "gap" else pp.pairs[::-1]
        for pos, pair in enumerate(seq):
            out[pos * n // levels].append(pair)
    return [s for s in out if s]


def single_pairs(prompts: Sequence[PromptPairs]) -> list[RankedPair]:
    """Single-pair DPO's data: (best, worst) of each prompt, the easiest pair of each."""
    return [pp.pairs[0] for pp in prompts if pp.pairs]


def split_steps(total: int, counts: Sequence[int]) -> list[int]:
    """`total` optimizer steps over stages in proportion to their pairs, at least one each, summing to
    max(total, stages): one step each first, the rest by largest remainder (earlier stages win equal remainders)."""
    n = sum(counts)
    rest = max(0, total - len(counts))
    raw = [rest * c / n for c in counts]
    steps = [math.floor(r) for r in raw]
    for i in sorted(range(len(counts)), key=lambda i: (-(raw[i] - steps[i]), i))[: rest - sum(steps)]:
        steps[i] += 1
    return [1 + s for s in steps]


# --- samples ------------------------------------------------------------------------------------------------

@dataclass
class PromptSamples:
    """A prompt's sampled replies and their scores (None for a reply that cannot be a training text)."""

    prompt_id: str
    prompt: list[dict[str, str]]
    texts: list[str]
    n_tokens: list[int]
    hit_limit: list[bool]
    scores: list[float | None]

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pick_judge(options: Options, source: str) -> str:
    """The judge's name: the option, or the context's own judge."""
    from dpolab.judges import context_judge

    return context_judge(options.judge, source, kind="curriculum")


def _judge(job: CellJob, name: str):
    """The judge with its options; a counting judge (length) counts the base model's tokens, as the length-biased
    context does."""
    from dpolab.judges import make_judge

    return make_judge(name, job.options.judge_args, token_count=job.base.token_count)


def _judge_key(job: CellJob, name: str) -> str:
    return json.dumps({"judge": name, "args": job.options.judge_args}, sort_keys=True, default=str)


def _prompts(data: str) -> list[tuple[str, list[dict[str, str]]]]:
    """Each distinct prompt of the context's pairs once, in file order, with the id of its first pair."""
    return [(p.id, p.messages) for p in context_prompts(data)]


def _sample_settings(job: CellJob, max_new_tokens: int, prompts) -> dict[str, Any]:
    o = job.options
    digest = hashlib.sha256(json.dumps([p for _, p in prompts], sort_keys=True).encode()).hexdigest()[:16]
    return {"model": job.model_name, "seed": job.seed, "k": o.k, "temperature": o.temperature,
            "max_new_tokens": max_new_tokens, "prompts": digest}


def _read_samples(path: Path) -> tuple[dict[str, Any], str, list[PromptSamples]] | None:
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not lines or "settings" not in lines[0]:
        return None
    head = lines[0]
    return head["settings"], head.get("judge", ""), [PromptSamples(**row) for row in lines[1:]]


def _write_samples(path: Path, settings: dict[str, Any], judge: str, rows: list[PromptSamples]) -> None:
    from dpolab.io import atomic_write_text

    lines = [json.dumps({"settings": settings, "judge": judge})] + [json.dumps(r.record(), ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def _score(rows: list[PromptSamples], judge, specials: tuple[str, ...]) -> None:
    """Scores of every usable reply; None for a blank reply, one holding a special token, or a non-finite score."""
    from dpolab.contexts.base import usable

    where = [(r, i) for r in rows for i, t in enumerate(r.texts) if usable(t, specials)]
    scores = judge.score([r.prompt for r, _ in where], [r.texts[i] for r, i in where]) if where else []
    for r in rows:
        r.scores = [None] * len(r.texts)
    for (r, i), s in zip(where, scores):
        r.scores[i] = float(s) if math.isfinite(s) else None


def _samples(job: CellJob, judge, judge_key: str, max_new_tokens: int) -> tuple[list[PromptSamples], bool]:
    """Every prompt's k replies from the base model and their scores: from work/samples.jsonl when its settings
    match (rescored if only the judge changed), else sampled and written. Returns (rows, reused)."""
    from dpolab.contexts.base import special_strings

    path = job.work / "samples.jsonl"
    prompts = _prompts(job.config.data)
    settings = _sample_settings(job, max_new_tokens, prompts)
    specials = special_strings(job.base)
    cached = _read_samples(path)
    if cached is not None and cached[0] == settings:
        rows = cached[2]
        if cached[1] != judge_key:
            _score(rows, judge, specials)
            _write_samples(path, settings, judge_key, rows)
        return rows, True
    k = job.options.k
    convs = [p for _, p in prompts for _ in range(k)]
    job.say(f"curriculum: sampling {k} replies for each of {len(prompts)} prompts")
    gens = job.base.generate(convs, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=job.options.temperature, seed=job.seed)
    rows = [PromptSamples(prompt_id=pid, prompt=p, texts=[g.text for g in gens[j * k:(j + 1) * k]],
                          n_tokens=[g.n_tokens for g in gens[j * k:(j + 1) * k]],
                          hit_limit=[g.hit_limit for g in gens[j * k:(j + 1) * k]], scores=[])
            for j, (pid, p) in enumerate(prompts)]
    _score(rows, judge, specials)
    _write_samples(path, settings, judge_key, rows)
    return rows, False


# --- training -----------------------------------------------------------------------------------------------

def _stage_pairs(stage: int, pairs: list[RankedPair], rows: list[PromptSamples], context: str):
    from dpolab.data.schema import PreferencePair

    out = []
    for p in pairs:
        row = rows[p.prompt]
        out.append(PreferencePair(
            id=f"{row.prompt_id}/curry/{p.chosen}v{p.rejected}", prompt=row.prompt, chosen=row.texts[p.chosen],
            rejected=row.texts[p.rejected], score_chosen=p.score_chosen, score_rejected=p.score_rejected,
            meta={"context": context, "kind": "curriculum", "prompt_id": row.prompt_id, "stage": stage, "gap": p.gap,
                  "rank_rejected": p.rank_rejected, "chosen_sample": p.chosen, "rejected_sample": p.rejected}))
    return out


def _write_pairs(path: Path, pairs) -> None:
    from dpolab.data.formats import write_pairs
    from dpolab.io import atomic_write

    atomic_write(path, lambda tmp: write_pairs(pairs, tmp), suffix=".jsonl")


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _train_stage(job: CellJob, stage_dir: Path, **overrides: Any):
    """train() into stage_dir: continued from its newest checkpoint when a run was cut short there, else fresh."""
    from dpolab.training import loop
    from dpolab.training.checkpoint import list_checkpoints

    if list_checkpoints(stage_dir):
        return loop.train(resume=stage_dir)
    shutil.rmtree(stage_dir, ignore_errors=True)
    return loop.train(job.config, out=str(stage_dir), **overrides)


def run(job: CellJob) -> Tuned:
    """Sample and score (or reuse), build the stages, train them in order (skipping DONE ones); the last stage's
    model is the cell's."""
    from dpolab.io import atomic_write_json
    from dpolab.models.load import load_model
    from dpolab.training.loop import resolve_config

    o, cfg = job.options, job.config
    judge_name = pick_judge(o, job.source)
    if cfg.reference_model is not None:
        raise ConfigError("method kind 'curriculum' sets each stage's reference itself (options.iterative_reference); "
                          "remove reference_model from the train keys")
    if not o.iterative_reference:
        resolve_config(cfg, reference_model=cfg.model)  # fails now, not after stage 1 (e.g. reference: adapter)
    max_new_tokens = o.max_new_tokens or int(job.context_default("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    judge = _judge(job, judge_name)

    rows, reused = _samples(job, judge, _judge_key(job, judge_name), max_new_tokens)
    per_prompt = [rank_pairs(j, r.scores, r.texts) for j, r in enumerate(rows)]
    best_worst = single_pairs(per_prompt)
    plan = [best_worst] if o.single_pair else assign_stages(per_prompt, order=o.order, k=o.k, stages=o.stages)
    if not best_worst:
        raise ConfigError(f"curriculum: no pairs: every prompt's usable replies tie under judge {judge_name!r} "
                          f"({len(rows)} prompts, k = {o.k}); raise k or temperature, or choose another judge")
    single_budget = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(best_worst) / cfg.batch_size))
    if o.budget == "equal":
        steps = split_steps(single_budget, [len(s) for s in plan])
    else:
        steps = [cfg.max_steps or max(1, math.ceil(cfg.epochs * len(s) / cfg.batch_size)) for s in plan]

    records: list[dict[str, Any]] = []
    model = None
    start = cfg.model
    for s, (pairs, n_steps) in enumerate(zip(plan, steps), start=1):
        stage_dir = job.work / f"stage-{s}"
        done = stage_dir / "DONE"
        reference = "start" if s == 1 else "previous stage" if o.iterative_reference else "base"
        if done.exists():
            records.append({**json.loads(done.read_text(encoding="utf-8")), "resumed": True})
            start = str(stage_dir / "model")
            continue
        data = job.work / "pairs" / f"stage-{s}.jsonl"
        _write_pairs(data, _stage_pairs(s, pairs, rows, job.context))
        job.say(f"curriculum: stage {s}/{len(plan)}: {len(pairs)} pairs, {n_steps} steps, reference {reference}")
        result = _train_stage(job, stage_dir, model=start, data=str(data), max_steps=n_steps, save_model=True,
                              reference_model=cfg.model if reference == "base" else None)
        final = json.loads((stage_dir / "train_summary.json").read_text(encoding="utf-8"))["final"] or {}
        record = {"stage": s, "pairs": len(pairs), "mean_gap": _mean([p.gap for p in pairs]),
                  "mean_rank_rejected": _mean([p.rank_rejected for p in pairs]), "steps": result.steps,
                  "final_loss": final.get("loss"), "final_margin": final.get("rewards/margins"),
                  "reference": reference, "start": start}
        atomic_write_json(done, record)
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # done: model/ is what the next stage needs
        records.append({**record, "resumed": False})
        start = str(stage_dir / "model")
        model = result.model if s == len(plan) else None
        del result
    if model is None:  # the last stage finished in an earlier call
        model = load_model(start, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code).model
    model.eval()

    sha = hashlib.sha256(json.dumps([[r.texts, r.scores] for r in rows]).encode()).hexdigest()[:16]
    info = {
        "judge": judge.name, "judge_key": judge_name, "judge_args": o.judge_args, "k": o.k,
        "temperature": o.temperature, "max_new_tokens": max_new_tokens, "order": "single-pair" if o.single_pair else o.order,
        "iterative_reference": o.iterative_reference, "budget": o.budget, "single_pair": o.single_pair,
        "prompts": len(rows), "samples": sum(len(r.texts) for r in rows),
        "unusable_samples": sum(s is None for r in rows for s in r.scores),
        "prompts_without_pairs": sum(not pp.pairs for pp in per_prompt),
        "pairs_skipped_ties": sum(pp.ties for pp in per_prompt),
        "pairs_available": sum(len(pp.pairs) for pp in per_prompt), "pairs_trained": sum(len(p) for p in plan),
        "single_pair_steps": single_budget, "steps": sum(r["steps"] for r in records),
        "samples_reused": reused, "samples_sha": sha, "stages": records,
    }
    return Tuned(model=model, steps=info["steps"], info=info)


KIND = MethodKind(name="curriculum", options=Options, run=run,
                  summary="Curry-DPO: k judged samples per prompt, best vs each other, trained in stages easy -> hard "
                          "(arXiv:2403.07230)")
