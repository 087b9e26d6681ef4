"""Iterative online DPO: rounds of sampling from the current policy, judging, and training against the previous
round's model; with the rdpo loss it is iLR-DPO (Liu et al. 2024, "Iterative Length-Regularized Direct Preference
Optimization", arXiv:2406.11817).

Round r (0-based), from the model M_r (M_0: the base model, sampled through job.base):
  1. sample k replies to each of the round's prompts from M_r;
  2. score them with the judge and pair the best over the worst of each prompt (a prompt whose usable replies all
     score the same is a tie, one with fewer than two usable replies is unusable; both give no pair and are
     counted) -> round-r/pairs.jsonl, TRL format, the judge's scores in score_chosen/score_rejected;
  3. train M_{r+1} from M_r on those pairs with the method's loss and train keys. The trainer's reference is the
     model it starts from, so round r's reference is M_r, the previous round's model, as in the paper's
     iterations. Loss dpo: iterative DPO, whose replies grow better and longer; loss rdpo with loss_args alpha:
     iLR-DPO, whose length margin (R-DPO's, dpolab.losses.rdpo) is meant to keep the judge's gain without it.
With final_sample, M_R is sampled and judged the same way, so the judge's score and the reply length are measured
on every model M_0..M_R (info["trend"]), and info["change"] gives M_R − M_0 paired over round 0's prompts, with
intervals: does iterating lengthen replies, and does the penalty stop it at an equal judge score.

Files under job.work: round-r/samples.json (the replies, and the fingerprint of the weights that wrote them),
round-r/scores.json, round-r/pairs.jsonl, round-r/train (the trainer's folder: model/, checkpoints/,
metrics.jsonl) and round-r/DONE (the round's record); final/ likewise. On --resume a round with DONE is skipped; a
round cut short reuses its samples, scores and pairs and continues its training from the trainer's newest
checkpoint (train(resume=...); from step 0 when none was written yet, with the same data order).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpolab.errors import ConfigError
from dpolab.io import atomic_write_json, atomic_write_text
from dpolab.judges import JUDGES, Judge, check_judge_args, context_judge, make_judge
from dpolab.methods import CellJob, MethodKind, Prompt, Tuned, context_prompts

if TYPE_CHECKING:
    from dpolab.config import TrainConfig
    from dpolab.models.chat import ChatModel
    from dpolab.training.loop import TrainResult

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True, kw_only=True)
class Options:
    """rounds: sample-judge-train rounds.
    k: replies sampled per prompt per round (at least 2); the pair is the judge's best over its worst.
    judge: a name in dpolab.judges.JUDGES; default: the context's own (detox: toxicity, length-biased-judge:
        length), required for other contexts.
    judge_args: the judge's options (e.g. {model: ..., template: ...} for model, {base_url: ..., model: ...} for
        endpoint). The toxicity judge takes the context's scorer unless set here; the length judge counts tokens.
    max_new_tokens, temperature: sampling; default: the context's own when it has them, else 64 and 1.0.
    prompts_per_round: prompts sampled per round, a different seeded slice of the context's prompts each round;
        default: all of them every round.
    final_sample: also sample and judge the last round's model, so every model's score and length are measured.
    keep_models: keep every round's model folder (round-r/train/model); by default an earlier round's is deleted
        once a later round is done (about 0.5 GB each for SmolLM2-135M in float32). A finished round's trainer
        checkpoints are always deleted: only its model is needed to go on.
    """

    rounds: int = 3
    k: int = 4
    judge: str | None = None
    judge_args: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None
    temperature: float | None = None
    prompts_per_round: int | None = None
    final_sample: bool = True
    keep_models: bool = False

    def __post_init__(self) -> None:
        for name, low in (("rounds", 1), ("k", 2), ("max_new_tokens", 1), ("prompts_per_round", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} must be at least {low}, got {value}")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"temperature must be positive (the k samples must differ), got {self.temperature}")
        if self.judge is not None:
            JUDGES.check(self.judge)
            check_judge_args(self.judge, self.judge_args)


@dataclass
class SampleStats:
    """The judged samples of one model. judge_*: the mean judge score over prompts (each prompt's mean over its
    replies) with a 95% bootstrap interval over prompts; tokens_*: the same for reply length in tokens."""

    model: str  # the folder (or name) of the sampled model
    fingerprint: str | None  # dpolab.models.load.weights_fingerprint of the sampled weights, when they are torch
    prompts: int
    samples: int
    judge_mean: float
    judge_ci_low: float
    judge_ci_high: float
    tokens_mean: float
    tokens_ci_low: float
    tokens_ci_high: float
    hit_limit: float  # fraction of replies cut at max_new_tokens
    unscored: int  # replies the judge gave no number (NaN), e.g. an endpoint rating it could not read


@dataclass
class RoundRecord:
    """One round: its samples' numbers, the pairs made of them, and the training on them."""

    round: int
    sampled: SampleStats
    pairs: int
    ties: int  # prompts whose usable replies all scored the same: no pair
    unusable: int  # prompts with fewer than two usable replies (blank, special tokens, no score): no pair
    tokens_chosen: float  # mean length in tokens of the chosen replies (NaN without pairs)
    tokens_rejected: float
    score_gap: float  # mean judge score of chosen minus rejected
    steps: int
    loss_first: float | None  # the loss at the first and last optimizer step of the round (metrics.jsonl)
    loss_final: float | None
    resumed_from: int | None  # the trainer's step this round's training continued from after an interruption
    start_model: str  # the model trained from, which is also the round's reference
    model: str  # the model after the round (start_model again when the round had no pair)

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, data: dict[str, Any]) -> RoundRecord:
        return cls(**{**data, "sampled": SampleStats(**data["sampled"])})


@dataclass
class Settings:
    """What the run resolved from its options and context."""

    judge: Judge
    judge_name: str
    judge_args: dict[str, Any]
    k: int
    max_new_tokens: int
    temperature: float
    prompts: list[Prompt]


# -- the pieces, module-level so a test can watch or interrupt them ------------------------------------------------


def round_prompts(prompts: list[Prompt], per_round: int | None, r: int, *, seed: int) -> list[Prompt]:
    """All prompts, or round r's slice of a seeded permutation, wrapping around."""
    if per_round is None or per_round >= len(prompts):
        return list(prompts)
    order = random.Random(seed).sample(range(len(prompts)), len(prompts))
    return [prompts[order[(r * per_round + j) % len(prompts)]] for j in range(per_round)]


def sample_replies(policy: ChatModel, prompts: Sequence[Prompt], *, k: int, max_new_tokens: int, temperature: float,
                   seed: int) -> list[list[dict[str, Any]]]:
    """k sampled replies per prompt: {text, n_tokens, hit_limit}."""
    convs = [p.messages for p in prompts for _ in range(k)]
    gens = policy.generate(convs, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, seed=seed)
    flat = [{"text": g.text, "n_tokens": g.n_tokens, "hit_limit": g.hit_limit} for g in gens]
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]


def train_round(cfg: TrainConfig, *, start: str, data: Path, out: Path) -> TrainResult:
    """Train from `start` (also the reference) on `data` into `out`; continue an interrupted run of the same
    round from its newest checkpoint."""
    from dpolab.training import loop

    if (out / "config.yaml").exists():
        return loop.train(resume=out)
    return loop.train(cfg, model=start, data=str(data), out=str(out), save_model=True)


# -- one model's samples ------------------------------------------------------------------------------------------


def _fingerprint(policy) -> str | None:
    import torch

    from dpolab.models.load import weights_fingerprint

    model = getattr(policy, "model", None)
    return weights_fingerprint(model) if isinstance(model, torch.nn.Module) else None


def _judged(folder: Path, policy: ChatModel, model_label: str, prompts: list[Prompt], s: Settings, *,
            seed: int) -> dict[str, Any]:
    """Sample (or reuse folder/samples.json) and judge (or reuse folder/scores.json) one model's replies."""
    samples_file, scores_file = folder / "samples.json", folder / "scores.json"
    if samples_file.exists():
        samples = json.loads(samples_file.read_text(encoding="utf-8"))
    else:
        replies = sample_replies(policy, prompts, k=s.k, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                 seed=seed)
        samples = {"model": model_label, "fingerprint": _fingerprint(policy), "seed": seed, "k": s.k,
                   "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                   "items": [{"prompt_id": p.id, "prompt": p.messages, "replies": r} for p, r in zip(prompts, replies)]}
        atomic_write_json(samples_file, samples)
    if scores_file.exists():
        scores = json.loads(scores_file.read_text(encoding="utf-8"))["scores"]
    else:
        convs = [it["prompt"] for it in samples["items"] for _ in it["replies"]]
        texts = [r["text"] for it in samples["items"] for r in it["replies"]]
        flat = [float(x) for x in s.judge.score(convs, texts)] if texts else []
        if len(flat) != len(texts):
            raise ConfigError(f"judge {s.judge_name!r} gave {len(flat)} scores for {len(texts)} replies")
        scores, at = [], 0
        for it in samples["items"]:
            scores.append(flat[at:at + len(it["replies"])])
            at += len(it["replies"])
        atomic_write_json(scores_file, {"judge": s.judge_name, "judge_args": s.judge_args, "scores": scores})
    for it, sc in zip(samples["items"], scores, strict=True):
        for reply, score in zip(it["replies"], sc, strict=True):
            reply["score"] = score
    return samples


def _per_prompt(samples: dict[str, Any], key: str) -> dict[str, float]:
    """Each prompt's mean of a reply value ("score", "n_tokens") over its replies; NaN values left out."""
    out = {}
    for it in samples["items"]:
        x = [float(r[key]) for r in it["replies"] if math.isfinite(float(r[key]))]
        out[it["prompt_id"]] = sum(x) / len(x) if x else math.nan
    return out


def _stats(samples: dict[str, Any], *, seed: int) -> SampleStats:
    from dpolab.stats import bootstrap_ci

    items = samples["items"]
    replies = [r for it in items for r in it["replies"]]
    judge = bootstrap_ci(list(_per_prompt(samples, "score").values()), seed=seed)
    tokens = bootstrap_ci(list(_per_prompt(samples, "n_tokens").values()), seed=seed)
    return SampleStats(model=samples["model"], fingerprint=samples["fingerprint"], prompts=len(items),
                       samples=len(replies), judge_mean=judge.value, judge_ci_low=judge.ci_low,
                       judge_ci_high=judge.ci_high, tokens_mean=tokens.value, tokens_ci_low=tokens.ci_low,
                       tokens_ci_high=tokens.ci_high,
                       hit_limit=sum(r["hit_limit"] for r in replies) / max(1, len(replies)),
                       unscored=sum(not math.isfinite(r["score"]) for r in replies))


@dataclass
class _Pairs:
    rows: list[dict[str, Any]]
    ties: int
    unusable: int


def _pairs(samples: dict[str, Any], *, r: int, judge: str, specials: tuple[str, ...]) -> _Pairs:
    """Each prompt's best reply over its worst, among its usable, scored replies."""
    from dpolab.contexts.base import usable
    from dpolab.data.formats import pair_record
    from dpolab.data.schema import PreferencePair

    rows, ties, unusable = [], 0, 0
    for it in samples["items"]:
        ok = [x for x in it["replies"] if usable(x["text"], specials) and math.isfinite(x["score"])]
        if len(ok) < 2:
            unusable += 1
            continue
        best = max(ok, key=lambda x: x["score"])  # the first of equals, so the pair is deterministic
        worst = min(ok, key=lambda x: x["score"])
        if best["score"] == worst["score"] or best["text"] == worst["text"]:
            ties += 1
            continue
        pair = PreferencePair(
            id=f"r{r}/{it['prompt_id']}", prompt=it["prompt"], chosen=best["text"], rejected=worst["text"],
            score_chosen=best["score"], score_rejected=worst["score"],
            meta={"kind": "iterative", "round": r, "prompt_id": it["prompt_id"], "judge": judge,
                  "policy": samples["model"], "policy_fingerprint": samples["fingerprint"],
                  "tokens_chosen": best["n_tokens"], "tokens_rejected": worst["n_tokens"],
                  "chosen_hit_limit": best["hit_limit"], "rejected_hit_limit": worst["hit_limit"]})
        rows.append(pair_record(pair))
    return _Pairs(rows=rows, ties=ties, unusable=unusable)


def _losses(train_dir: Path) -> tuple[float | None, float | None]:
    path = train_dir / "metrics.jsonl"
    if not path.exists():
        return None, None
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return (lines[0]["loss"], lines[-1]["loss"]) if lines else (None, None)


# -- the run ------------------------------------------------------------------------------------------------------


def settings(job: CellJob) -> Settings:
    """The judge, sampling and prompts of a cell: its options, with the context's defaults filled in."""
    opts: Options = job.options
    name = context_judge(opts.judge, job.source, kind="iterative")
    args = dict(opts.judge_args)
    check_judge_args(name, args)
    if name == "toxicity" and "scorer" in job.context_options and "scorer" not in args:
        args["scorer"] = job.context_options["scorer"]
    prompts = context_prompts(job.config.data)
    if not prompts:
        raise ConfigError(f"context {job.context!r} has no prompts to sample from")
    max_new = opts.max_new_tokens or job.context_default("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    temperature = opts.temperature or job.context_default("temperature", DEFAULT_TEMPERATURE)
    return Settings(judge=make_judge(name, args, token_count=job.base.token_count), judge_name=name, judge_args=args,
                    k=opts.k, max_new_tokens=int(max_new), temperature=float(temperature), prompts=prompts)


def _policy(job: CellJob, path: str) -> ChatModel:
    """The model at `path` as a ChatModel for sampling: job.base for the starting model, else loaded (hf)."""
    if path == job.config.model:
        return job.base
    from dpolab.models.backends import chat_model
    from dpolab.models.load import load_model

    loaded = load_model(path, dtype=job.config.dtype, trust_remote_code=job.config.trust_remote_code)
    return chat_model(loaded, backend="hf")


def _round(job: CellJob, r: int, start: str, s: Settings, specials: tuple[str, ...]) -> RoundRecord:
    folder = job.work / f"round-{r}"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = round_prompts(s.prompts, job.options.prompts_per_round, r, seed=job.seed)
    policy = None if (folder / "scores.json").exists() else _policy(job, start)
    samples = _judged(folder, policy, start, prompts, s, seed=job.seed * 1009 + r)
    del policy
    stats = _stats(samples, seed=job.seed)
    made = _pairs(samples, r=r, judge=s.judge_name, specials=specials)
    pairs_file = folder / "pairs.jsonl"
    if not pairs_file.exists():
        atomic_write_text(pairs_file, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in made.rows))
    n = len(made.rows)
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    steps, resumed, model = 0, None, start
    if made.rows:
        result = train_round(job.config, start=start, data=pairs_file, out=folder / "train")
        steps, resumed, model = result.steps, result.resumed_from, str(folder / "train" / "model")
        del result
    else:
        job.say(f"iterative round {r + 1}: no pair ({made.ties} ties, {made.unusable} unusable); the model is unchanged")
    first, final = _losses(folder / "train")
    return RoundRecord(
        round=r, sampled=stats, pairs=n, ties=made.ties, unusable=made.unusable,
        tokens_chosen=mean([row["meta"]["tokens_chosen"] for row in made.rows]),
        tokens_rejected=mean([row["meta"]["tokens_rejected"] for row in made.rows]),
        score_gap=mean([row["score_chosen"] - row["score_rejected"] for row in made.rows]),
        steps=steps, loss_first=first if made.rows else None, loss_final=final if made.rows else None,
        resumed_from=resumed, start_model=start, model=model)


def _prune(job: CellJob, done: RoundRecord, earlier: list[RoundRecord]) -> None:
    """After round `done`: its trainer checkpoints, and (unless keep_models) the model folders of earlier rounds
    that are not the current model."""
    import shutil

    shutil.rmtree(job.work / f"round-{done.round}" / "train" / "checkpoints", ignore_errors=True)
    if job.options.keep_models:
        return
    for rec in earlier:
        folder = Path(rec.model)
        if rec.model != done.model and folder.is_relative_to(job.work) and folder.exists():
            shutil.rmtree(folder)


def _change(first: dict[str, Any], last: dict[str, Any], *, seed: int) -> dict[str, dict[str, float]]:
    """The final model minus the base model (M_R − M_0) in judge score and reply tokens, paired over the prompts
    both were sampled on (round 0's), with a bootstrap interval and p over prompts."""
    from dpolab.stats import paired_bootstrap_delta

    out = {}
    for name, key in (("judge", "score"), ("tokens", "n_tokens")):
        a, b = _per_prompt(first, key), _per_prompt(last, key)
        ids = [i for i in a if i in b]
        d = paired_bootstrap_delta([a[i] for i in ids], [b[i] for i in ids], seed=seed)
        out[name] = {"delta": d.value, "ci_low": d.ci_low, "ci_high": d.ci_high, "p": d.p, "prompts": d.n}
    return out


def _line(st: SampleStats) -> str:
    return (f"judge {st.judge_mean:.3g} [{st.judge_ci_low:.3g}, {st.judge_ci_high:.3g}], "
            f"{st.tokens_mean:.1f} tokens ({st.samples} replies to {st.prompts} prompts)")


def run(job: CellJob) -> Tuned:
    from dpolab.contexts.base import special_strings

    opts: Options = job.options
    s = settings(job)
    specials = special_strings(job.base)
    records: list[RoundRecord] = []
    model = job.config.model
    for r in range(opts.rounds):
        done = job.work / f"round-{r}" / "DONE"
        if done.exists():
            rec = RoundRecord.read(json.loads(done.read_text(encoding="utf-8")))
            job.say(f"iterative round {r + 1}/{opts.rounds}: done earlier")
        else:
            rec = _round(job, r, model, s, specials)
            atomic_write_json(done, rec.record())
            _prune(job, rec, records)
            loss = rec.loss_final if rec.loss_final is not None else math.nan
            job.say(f"iterative round {r + 1}/{opts.rounds}: {_line(rec.sampled)}; {rec.pairs} pairs ({rec.ties} ties, "
                    f"{rec.unusable} unusable), {rec.steps} steps, loss {loss:.4f}")
        records.append(rec)
        model = rec.model

    final_stats, change = None, None
    policy = _policy(job, model) if model != job.config.model else None
    if opts.final_sample:
        folder = job.work / "final"
        folder.mkdir(parents=True, exist_ok=True)
        prompts = round_prompts(s.prompts, opts.prompts_per_round, 0, seed=job.seed)  # round 0's: a paired change
        sampler = policy if policy is not None else job.base
        final = _judged(folder, sampler, model, prompts, s, seed=job.seed * 1009 + opts.rounds)
        final_stats = _stats(final, seed=job.seed)
        change = _change(_judged(job.work / "round-0", None, job.config.model, prompts, s, seed=job.seed * 1009),
                         final, seed=job.seed)
        job.say(f"iterative final model: {_line(final_stats)}")
    tuned = _tuned_model(job, model, policy)
    series = [rec.sampled for rec in records] + ([final_stats] if final_stats else [])
    info = {
        "judge": s.judge_name, "judge_args": s.judge_args, "loss": job.config.loss, "beta": job.config.beta,
        **({"loss_weights": job.config.loss_weights} if job.config.loss_weights is not None else {}),  # a list of losses
        "loss_args": dict(job.config.loss_args), "k": s.k, "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature, "prompts": len(s.prompts),
        "rounds": [rec.record() for rec in records],
        "final": dataclasses.asdict(final_stats) if final_stats else None,
        "change": change,
        "judge_stats": dict(getattr(s.judge, "stats", None) or {}),  # e.g. the endpoint's requests and misses
        # one entry per model M_0..M_R (M_R only with final_sample): the trend the method is about
        "trend": {"model": [f"M{i}" for i in range(len(series))],
                  "judge_mean": [st.judge_mean for st in series], "tokens_mean": [st.tokens_mean for st in series],
                  "hit_limit": [st.hit_limit for st in series]},  # a length near max_new_tokens cannot grow
    }
    return Tuned(model=tuned, steps=sum(rec.steps for rec in records), info=info)


def _tuned_model(job: CellJob, path: str, policy):
    """The final model's torch module, in eval mode: the one loaded for sampling, else loaded from `path`."""
    import torch

    held = getattr(policy, "model", None)
    if isinstance(held, torch.nn.Module):
        return held.eval()
    from dpolab.models.load import load_model

    return load_model(path, dtype=job.config.dtype, trust_remote_code=job.config.trust_remote_code).model.eval()


KIND = MethodKind(name="iterative", options=Options, run=run,
                  summary="iterative online DPO: sample k replies per prompt from the current model, pair the judge's "
                          "best over its worst, train against the previous round's model; loss rdpo = iLR-DPO")
