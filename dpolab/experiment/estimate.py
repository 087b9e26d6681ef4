"""How long a run will take, said at its start: the work the spec asks of the model, counted on a scripted model at
full size and at a small calibration size, times this machine's seconds for that work, timed at the calibration size
on the real base model; refined after each cell from the phases measured so far (dpolab.experiment.runner).

Work is priced, not just counted (Costs, timed on the base first): a generate call runs in batches of the engine's
size, each batch max_new_tokens decode steps whose cost grows with the batch (on 2 CPUs a step of 16 replies costs
about 3 of one, so 16 times the replies is not 16 times the time), and every prompt or scored text costs its tokens.

What is timed, and how it is scaled to the spec's sizes:
- eval: the spec's probes run on the base at `--limit 2`; each probe's seconds times its work at full size over its
  work at the calibration size (a resumed run whose baseline exists takes the baseline's own seconds instead). A
  trained model's eval reads stances as the baseline chose, without calibrating a reader: its work is counted so;
- pairs: each context built at `limit 2` on the base with that reader, scaled the same way, once per context and
  seed; a self-sft placebo's samples timed on those pairs, per pair;
- training: two optimizer steps of each method (the cell's train config, on a context's calibration pairs) give
  seconds per token of a step and the fixed cost of a training (loading, warm-up, saving); a cell's training is
  that fixed cost, its steps at its pairs' tokens, and a forward pass over its pairs for a cached reference.
  A method of a registered kind (dpolab.methods) counts as its plain training times its rounds, plus its own
  sampling priced like the probes' (kind_sampling_s; its judging and RL's PPO passes roughly); an edit is not
  timed at all. Both are refined once a cell of theirs has run.

What it cannot see: how many pairs a context keeps at full size (two items' worth, scaled, is a guess; at --quick
sizes it is often off by half), and other work sharing the CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpolab.progress import duration

if TYPE_CHECKING:
    from dpolab.data.schema import PreferencePair
    from dpolab.experiment.spec import ExperimentSpec
    from dpolab.models.chat import ChatModel
    from dpolab.probes.summary import EvalSummary

CALIBRATION_LIMIT = 2  # items per probe and per context in the timed calibration
CALIBRATION_STEPS = 2  # optimizer steps of each timed training: the first carries the warm-up
REFERENCE_SHARE = 1 / 3  # a cached reference's forward pass over a pair, as a share of its forward and backward
DRY_BOOT = 100  # bootstrap resamples where the metrics are thrown away (dry runs, the timed eval)
PARTS = ("pairs", "tune", "eval")  # a cell's phases as the estimate prices them


@dataclass(frozen=True)
class Costs:
    """What the model's requests cost on this machine, timed on the base model with the engine's batch sizes: what
    makes one request dearer than another of the same count (a longer text, a fuller batch).

    generate_batch: conversations the engine generates together (the spec's probes.batch_size).
    step_s: seconds of one decode step for a batch of one and for a full batch; a batch in between costs in
        proportion (a step of 16 replies costs about 3 of one reply here, not 16).
    token_s: seconds per token of a prompt or scored text (a forward pass).
    pass_s, score_batch: a scoring call runs its texts in passes of score_batch rows, and each pass costs pass_s
        besides its tokens (a pass through 30 layers for a few short rows is mostly this): timed at two sizes,
        so two items' many small passes are not scaled up as if they were tokens.
    """

    generate_batch: int
    step_s: tuple[float, float]
    token_s: float
    pass_s: float = 0.0
    score_batch: int = 16

    def decoding(self, replies: int, max_new_tokens: int) -> float:
        """Seconds of the decode steps of `replies` replies generated together, in the engine's batches (their
        prompts not counted)."""
        size = max(1, self.generate_batch)
        full, rest = divmod(max(0, replies), size)
        return max_new_tokens * (full * self.step(size) + (self.step(rest) if rest else 0.0))

    def scoring(self, n_texts: int, tokens: float) -> float:
        """Seconds of one scoring call of `n_texts` texts holding `tokens` tokens in all."""
        return self.token_s * tokens + self.pass_s * math.ceil(n_texts / max(1, self.score_batch))

    def step(self, batch: int) -> float:
        one, full = self.step_s
        if self.generate_batch <= 1:
            return one
        return one + (full - one) * (batch - 1) / (self.generate_batch - 1)


def _text(conversation) -> str:
    return "\n".join(m["content"] for m in conversation)


class Tally:
    """A ChatModel that passes every request on to `model` and adds up what it would cost under `costs`: each
    generate call in batches of costs.generate_batch, each batch max_new_tokens decode steps of its size and its
    prompts' tokens; each scored candidate, next-token reading or text its tokens. Tokens are counted by `count`
    (the real model's tokenizer, when `model` is a fake).

    run_eval clears a model's cache after each probe; the tally starts a new count there, so `parts` holds one
    count per probe, in run order."""

    def __init__(self, model: ChatModel, costs: Costs, count: Callable[[str], int] | None = None):
        self.model, self.costs = model, costs
        self.count = count or model.token_count
        self.parts: list[float] = [0.0]

    def __getattr__(self, name: str) -> Any:  # name, format, backend: the model's own
        return getattr(self.model, name)

    @property
    def total(self) -> float:
        return sum(self.parts)

    def _tokens(self, texts) -> float:
        """A scoring call over `texts`: their tokens and its passes."""
        texts = list(texts)
        return self.costs.scoring(len(texts), sum(self.count(t) for t in texts))

    def generate(self, conversations, *, max_new_tokens: int, **kwargs):
        prompts = self.costs.token_s * sum(self.count(_text(c)) for c in conversations)  # the prefills
        self.parts[-1] += self.costs.decoding(len(conversations), max_new_tokens) + prompts
        return self.model.generate(conversations, max_new_tokens=max_new_tokens, **kwargs)

    def score_continuations(self, conversations, continuations):
        self.parts[-1] += self._tokens(f"{_text(c)} {t}" for c, texts in zip(conversations, continuations) for t in texts)
        return self.model.score_continuations(conversations, continuations)

    def next_token_logprobs(self, conversations, candidates, *, prefix: str = ""):
        self.parts[-1] += self._tokens(f"{_text(c)} {prefix}" for c in conversations)
        return self.model.next_token_logprobs(conversations, candidates, prefix=prefix)

    def score_texts(self, texts):
        self.parts[-1] += self._tokens(texts)
        return self.model.score_texts(texts)

    def token_count(self, text: str) -> int:
        return self.model.token_count(text)

    def clear_cache(self) -> None:
        self.parts.append(0.0)
        if hasattr(self.model, "clear_cache"):
            self.model.clear_cache()


COUNTING = "Count from 1 to 1000, one number after another, and do not stop."  # a prompt the model keeps answering
STEPS = 24  # decode steps of each timed generate call


def measure_costs(base: ChatModel, *, generate_batch: int, clock: Callable[[], float] = time.perf_counter) -> Costs:
    """Costs timed on `base`: generate calls of one and of a full batch, and a forward pass over a few texts."""
    def step_s(batch: int) -> float:
        convs = [[{"role": "user", "content": f"{COUNTING} ({i})"}] for i in range(batch)]
        t0 = clock()
        out = base.generate(convs, max_new_tokens=STEPS)
        return (clock() - t0) / max(1, max(g.n_tokens for g in out))

    def score_s(texts: list[str]) -> float:
        t0 = clock()
        base.score_texts(texts)
        return clock() - t0

    step_s(1)  # warm-up: the first call of a shape pays for allocations
    steps = (step_s(1), step_s(max(1, generate_batch)))
    score_batch = max(1, int(getattr(base, "score_batch_size", None) or generate_batch))
    long = [f"{COUNTING} " + " ".join(str(n) for n in range(i, i + 150)) for i in range(8)]
    short = ["Yes."]
    score_s(short)  # warm-up
    # t = passes * pass_s + tokens * token_s at two sizes: one short text (a pass, few tokens) and eight long ones
    t_short, t_long = min(score_s(short) for _ in range(3)), score_s(long)
    n_short, n_long = (sum(base.token_count(t) for t in texts) for texts in (short, long))
    p_long = math.ceil(len(long) / score_batch)
    token_s = max((t_long - p_long * t_short) / max(1, n_long - p_long * n_short), t_long / max(1, n_long) / 10)
    pass_s = max(0.0, t_short - n_short * token_s)
    if hasattr(base, "clear_cache"):
        base.clear_cache()
    return Costs(generate_batch=generate_batch, step_s=steps, token_s=token_s, pass_s=pass_s, score_batch=score_batch)


def scaled(seconds: float, full: float, small: float) -> float:
    """Seconds timed at the small size, at full size: in proportion to the work (as is, when there was none)."""
    return seconds * full / small if small > 0 else seconds


def _cap(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def probe_work(spec: ExperimentSpec, costs: Costs, *, limit: int | None, count: Callable[[str], int] | None = None,
               stance: str | None = None) -> dict[str, float]:
    """The work each of the spec's probes asks at its sizes (capped by `limit`) under `costs`, counted on
    FakeChatModel: no model runs, only the probes' own code (e.g. the toxicity scorer). stance: the reader, if not
    the spec's (a trained model's eval reads stances as the baseline chose, without calibrating)."""
    from dpolab.models.fake import FakeChatModel
    from dpolab.probes.run import parse_probes, run_eval

    names = parse_probes(spec.probes.names)
    tally = Tally(FakeChatModel(), costs, count)
    run_eval(tally, probes=names, sizes=spec.probes.sizes, limit=_cap(limit, spec.probes.limit),
             stance=stance or spec.probes.stance, n_boot=DRY_BOOT)
    return dict(zip(names, tally.parts))


def context_work(source: str, options: dict[str, Any], costs: Costs, *, seed: int, limit: int | None,
                 count: Callable[[str], int] | None = None) -> float:
    """The work a context's build asks at its sizes (capped by `limit`) under `costs`, counted on FakeChatModel."""
    from dpolab.contexts import build_pairs
    from dpolab.models.fake import FakeChatModel

    tally = Tally(FakeChatModel(), costs, count)
    build_pairs(source, tally, options=options, seed=seed, limit=limit)
    return tally.total


@dataclass
class CellCost:
    """One cell's expected seconds per part, and per part the key it shares with other cells: cells with one key
    take alike (a context's training on another seed), None when the part has nothing to do (pairs an earlier cell
    built)."""

    name: str
    seconds: dict[str, float]
    keys: dict[str, str | None]
    group: str  # "detox/dpo": how the breakdown lists it


@dataclass
class Estimate:
    """The run's expected wall time, and its updates as cells end."""

    cpu: str
    threads: int
    calibration_s: float
    probes: dict[str, float]  # the baseline eval's seconds per probe, at the spec's sizes
    baseline_s: float  # the baseline eval still to run (0 when a resumed run has it)
    cells: list[CellCost]
    spent_s: float = 0.0  # the run's time before the estimate was made: loading the base, calibrating
    costs: dict[str, Any] = field(default_factory=dict)  # what was timed (Costs, each method's training), for the record
    notes: list[str] = field(default_factory=list)
    updates: list[tuple[int, float]] = field(default_factory=list)  # (cells finished in the grid, total seconds)

    @property
    def at_start_s(self) -> float:
        return self.spent_s + self.baseline_s + sum(sum(c.seconds.values()) for c in self.cells)

    def remaining(self, measured: dict[str, dict[str, float]], *, running: str | None = None,
                  running_s: float = 0.0) -> float:
        """Seconds still to go in the cells not in `measured` (cell -> part -> seconds it took): each part the mean
        of the finished cells that share its key, else its calibrated seconds times how far the finished cells'
        parts of that kind ran over or under theirs. The running cell counts less the time it has had (not below
        zero)."""
        done = [c for c in self.cells if c.name in measured]
        factor = {}
        for part in PARTS:
            timed = [c for c in done if c.keys[part] is not None and c.seconds[part] > 0]
            expected = sum(c.seconds[part] for c in timed)
            took = sum(measured[c.name].get(part, 0.0) for c in timed)
            factor[part] = took / expected if expected > 0 and took > 0 else 1.0
        left = 0.0
        for cell in self.cells:
            if cell.name in measured:
                continue
            seconds = 0.0
            for part in PARTS:
                key = cell.keys[part]
                if key is None:
                    continue
                alike = [measured[c.name].get(part, 0.0) for c in done if c.keys[part] == key]
                seconds += statistics.fmean(alike) if alike else cell.seconds[part] * factor[part]
            left += max(0.0, seconds - running_s) if cell.name == running else seconds
        return left

    def line(self) -> str:
        return (f"estimate: about {minutes(self.at_start_s)} in all on {self.cpu}, {self.threads} "
                f"thread{'s' if self.threads != 1 else ''} "
                f"(calibrated in {duration(self.calibration_s)}; refined after each cell)")

    def breakdown_lines(self) -> list[str]:
        """The estimate part by part, for a log."""
        lines = [f"  so far {duration(self.spent_s)}: loading the base model, calibrating"]
        if self.baseline_s:
            per_probe = ", ".join(f"{p} {duration(s)}" for p, s in self.probes.items())
            lines.append(f"  baseline eval {duration(self.baseline_s)} ({per_probe})")
        groups: dict[str, list[CellCost]] = {}
        for cell in self.cells:
            groups.setdefault(cell.group, []).append(cell)
        for group, cells in groups.items():
            parts = []
            for part in PARTS:
                total = sum(c.seconds[part] for c in cells)
                built = sum(c.keys[part] is not None for c in cells)
                if built:
                    parts.append(f"{'train' if part == 'tune' else part} {duration(total / built)}")
            lines.append(f"  {group} x {len(cells)}: " + ", ".join(parts) + " per cell")
        return lines + [f"  note: {n}" for n in self.notes]

    def to_json(self) -> dict[str, Any]:
        return {"at_start_s": round(self.at_start_s, 1), "calibration_s": round(self.calibration_s, 1),
                "cpu": self.cpu, "threads": self.threads,
                "breakdown": {"spent_s": round(self.spent_s, 1), "baseline_eval_s": round(self.baseline_s, 1),
                              "probes_s": {p: round(s, 1) for p, s in self.probes.items()},
                              "costs": self.costs,
                              "cells": {c.name: {p: round(s, 1) for p, s in c.seconds.items()} for c in self.cells},
                              "notes": self.notes},
                "updates": [[n, round(s, 1)] for n, s in self.updates]}


def kind_sampling_s(kind: str, options: Any, costs: Costs, *, prompts: int, tokens: float | None,
                    training: _Training | None, max_new_tokens: int | None) -> float:
    """What a registered method kind does besides plain training, priced: the replies it samples (and scores), and
    for rl its rollouts' log-probs and its PPO passes. prompts: the context's pairs (a prompt each, near enough);
    tokens: a pair's tokens (a sampled sequence counts half); max_new_tokens: the context's, when the kind takes it.
    Rough by design: it is refined by the first cell of the kind that runs."""
    seq = (tokens or 0.0) / 2
    new = getattr(options, "max_new_tokens", None) or max_new_tokens or 64
    if kind == "rl":
        replies = options.steps * options.prompts_per_step * options.group_size
        passes = options.epochs_per_batch * replies * seq * (training.token_s if training else 0.0)
        return costs.decoding(replies, new) + costs.scoring(replies, replies * seq) + passes
    if kind == "iterative":
        per_round = (options.prompts_per_round or prompts) * options.k
        samples = (options.rounds + int(options.final_sample)) * per_round
        return costs.decoding(samples, new) + costs.scoring(samples, samples * seq)  # a model judge reads them
    if kind == "curriculum":
        samples = prompts * options.k
        return costs.decoding(samples, new) + costs.scoring(samples, samples * seq)
    return 0.0


def minutes(seconds: float) -> str:
    """"27 min" from a minute and a half on, "42 s" below."""
    return f"{seconds / 60:.0f} min" if seconds >= 90 else duration(seconds)


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """The global random states as they were: the calibration's sampling and training leave the run's draws alone."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _pair_tokens(model: ChatModel, pairs: Sequence[PreferencePair]) -> float | None:
    """Mean tokens of a pair's two sequences (prompt text with each reply); None without pairs."""
    if not pairs:
        return None
    counts = []
    for p in pairs:
        prompt = model.token_count("\n".join(m["content"] for m in p.prompt))
        counts.append(2 * prompt + model.token_count(p.chosen) + model.token_count(p.rejected))
    return statistics.fmean(counts)


@dataclass
class _Pairs:
    """A context's pairs as calibrated: those built at the calibration size and what the full build should take."""

    pairs: list  # PreferencePair, at the calibration size
    seconds: float  # the full build
    n: int  # pairs at full size
    tokens: float | None  # mean tokens per pair


@dataclass
class _Training:
    """A method's training as calibrated: fixed seconds per training, and seconds per token of a step."""

    fixed_s: float
    token_s: float


def _time_training(spec: ExperimentSpec, context: str, method: str, pairs: list, tokens: float, work: Path, *,
                   seed: int, clock: Callable[[], float]) -> _Training:
    """CALIBRATION_STEPS real optimizer steps of the cell's training config on `pairs`, in `work`."""
    from dpolab.data import write_pairs
    from dpolab.training.loop import train

    work.mkdir(parents=True, exist_ok=True)
    data = write_pairs(pairs, work / "pairs.jsonl")
    cfg = spec.train_config(context, method, data=str(data), out=str(work / "train"), seed=seed)
    cfg = cfg.model_copy(update={"max_steps": CALIBRATION_STEPS})
    t0 = clock()
    result = train(cfg)
    wall = clock() - t0
    step_s = min(cfg.batch_size / m["pairs_per_s"] for m in result.metrics)  # the steps after the warm-up
    return _Training(fixed_s=max(0.0, wall - len(result.metrics) * step_s), token_s=step_s / (cfg.batch_size * tokens))


def calibrate(spec: ExperimentSpec, cells: Sequence[tuple[str, str, int]], *, base: ChatModel,
              baseline: EvalSummary | None = None, built: set[tuple[str, int]] = frozenset(),
              costs: Costs | None = None, clock: Callable[[], float] = time.perf_counter) -> Estimate:
    """The estimate of the baseline eval (unless `baseline`, a resumed run's, gives its seconds) and of `cells`,
    the cells still to run in order, timed on `base`, the run's base model.

    built: (context, seed) whose pairs an earlier run built (cached: no time).
    costs: what requests cost on this machine; default timed on `base` (measure_costs).
    """
    import torch

    from dpolab.bench.hardware import cpu_label
    from dpolab.contexts import CONTEXTS, build_pairs
    from dpolab.contexts.placebo import parse_placebo, self_sft_pairs
    from dpolab.experiment.spec import cell_name
    from dpolab.losses import needs_reference
    from dpolab.methods import METHOD_KINDS, context_value
    from dpolab.probes.run import run_eval
    from dpolab.training.loop import optimizer_steps

    start = clock()
    notes: list[str] = []
    with _rng_kept(), tempfile.TemporaryDirectory(prefix="dpolab-estimate-") as tmp:
        work = Path(tmp)
        costs = costs or measure_costs(base, generate_batch=spec.probes.batch_size, clock=clock)
        count = base.token_count
        # the dry runs first: they pay the probes' one-time loads (a classifier, the toxicity scorer), which the
        # timed run would otherwise scale up with the work
        full = probe_work(spec, costs, limit=None, count=count)
        if baseline is not None:
            probes = {p: s for p, s in baseline.wall_time_s.items() if p != "total"}
            reader, baseline_s = baseline.stance_reader(), 0.0
            notes.append("eval: the baseline's own seconds per probe")
        else:
            small = probe_work(spec, costs, limit=CALIBRATION_LIMIT, count=count)
            timed = run_eval(base, probes=spec.probes.names, sizes=spec.probes.sizes,
                             limit=_cap(CALIBRATION_LIMIT, spec.probes.limit), stance=spec.probes.stance, n_boot=DRY_BOOT)
            probes = {p: scaled(timed.wall_time_s[p], full[p], small[p]) for p in full}
            reader, baseline_s = timed.stance_reader(), sum(probes.values())
        # a cell's eval reads stances as the baseline chose, without calibrating a reader first
        cell_work = probe_work(spec, costs, limit=None, count=count, stance=reader) if reader else full
        cell_probes = {p: scaled(s, cell_work.get(p, 0.0), full.get(p, 0.0)) for p, s in probes.items()}
        eval_s = sum(cell_probes.values())

        sources: dict[str, _Pairs] = {}
        placebos: dict[str, _Pairs] = {}
        for context, _, seed in cells:
            placebo = parse_placebo(context)
            source = context if placebo is None else placebo[1]
            if source not in sources:
                options = spec.context_options(source, reader or spec.probes.stance)  # as the run will build it
                needs_model = CONTEXTS.get(source).needs_model
                full = context_work(source, options, costs, seed=seed, limit=None, count=count) if needs_model else 0.0
                # a build that asks nothing of the model (a user's file, generated lotteries) is quick: built whole
                limit = CALIBRATION_LIMIT if full else None
                small = context_work(source, options, costs, seed=seed, limit=limit, count=count) if full else 0.0
                t0 = clock()
                data = build_pairs(source, base if needs_model else None, options=options, seed=seed, limit=limit)
                seconds = clock() - t0
                if not data.pairs:
                    notes.append(f"{source}: no pairs at the calibration size; counted as one")
                sources[source] = _Pairs(list(data.pairs), scaled(seconds, full, small),
                                         round(scaled(max(len(data.pairs), 1), full, small)), _pair_tokens(base, data.pairs))
            if placebo is not None and placebo[0] == "self-sft" and source not in placebos:
                got = sources[source]
                t0 = clock()
                sft = self_sft_pairs(got.pairs, base, seed=seed).pairs if got.pairs else []
                per_pair = (clock() - t0) / max(len(got.pairs), 1)
                placebos[source] = _Pairs(sft, per_pair * got.n, got.n, _pair_tokens(base, sft) or got.tokens)

        known = [p.tokens for p in [*sources.values(), *placebos.values()] if p.tokens is not None]
        for got in [*sources.values(), *placebos.values()]:  # a context without calibration pairs: the others' length
            got.tokens = got.tokens if got.tokens is not None or not known else statistics.fmean(known)
        trainings: dict[str, _Training] = {}
        for context, method, seed in cells:
            placebo = parse_placebo(context)
            source = context if placebo is None else placebo[1]
            got = placebos[source] if placebo is not None and placebo[0] == "self-sft" else sources[source]
            if method in trainings or spec.method_kind(method) == "edit" or not got.pairs:
                continue
            trainings[method] = _time_training(spec, context, method, got.pairs, got.tokens, work / f"train-{method}",
                                               seed=seed, clock=clock)

        cell_costs = []
        pairs_built = set(built)
        for context, method, seed in cells:
            placebo = parse_placebo(context)
            source = context if placebo is None else placebo[1]
            self_sft = placebo is not None and placebo[0] == "self-sft"
            got = placebos[source] if self_sft else sources[source]
            if self_sft:
                pairs_key, pairs_s = f"self-sft:{source}", got.seconds
            elif (source, seed) not in pairs_built:
                pairs_key, pairs_s = source, sources[source].seconds
            else:
                pairs_key, pairs_s = None, 0.0
            pairs_built.add((source, seed))
            kind = spec.method_kind(method)
            tune_s = 0.0
            if kind != "edit":
                training = trainings.get(method) or next(iter(trainings.values()), None)
                cfg = spec.train_config(context, method, data="-", out="-", seed=seed)
                if training is not None and got.tokens is not None:
                    pair_s = training.token_s * got.tokens
                    reference = got.n * pair_s * REFERENCE_SHARE if needs_reference(cfg.loss) and \
                        cfg.reference in ("auto", "cached") else 0.0
                    tune_s = training.fixed_s + optimizer_steps(cfg, got.n) * cfg.batch_size * pair_s + reference
                if kind in METHOD_KINDS:
                    options = spec.methods[method].kind_options()
                    tune_s = tune_s * getattr(options, "rounds", 1) + kind_sampling_s(
                        kind, options, costs, prompts=got.n, tokens=got.tokens, training=training,
                        max_new_tokens=context_value(source, spec.contexts[source].options if source in spec.contexts
                                                     else {}, "max_new_tokens", None))
            explains = placebo is None and bool(spec.contexts[context].explain)
            cell_costs.append(CellCost(name=cell_name(context, method, seed),
                                       seconds={"pairs": pairs_s, "tune": tune_s, "eval": eval_s},
                                       keys={"pairs": pairs_key, "tune": f"{source}/{method}",
                                             "eval": "eval, explain" if explains else "eval"},
                                       group=f"{context}/{method}"))
    kinds = {spec.method_kind(m) for _, m, _ in cells}
    if "edit" in kinds:
        notes.append("edit methods: not timed until their first cell has run")
    if kinds & set(METHOD_KINDS.names()):
        notes.append("curriculum, iterative and rl methods: their plain training times their rounds, and their "
                     "sampling priced as the probes' (their judges and RL's extra passes roughly)")
    if any(spec.contexts[c].explain for c, _, _ in cells if c in spec.contexts):
        notes.append("explain: not timed until its first cell has run")
    notes.append("results and report: not counted (seconds)")
    record = {"requests": dataclasses.asdict(costs), "training": {m: dataclasses.asdict(t) for m, t in trainings.items()},
              "cell_eval_probes_s": {p: round(s, 1) for p, s in cell_probes.items()}}
    return Estimate(cpu=cpu_label(), threads=torch.get_num_threads(), calibration_s=clock() - start, probes=probes,
                    baseline_s=baseline_s, cells=cell_costs, notes=notes, costs=record)
