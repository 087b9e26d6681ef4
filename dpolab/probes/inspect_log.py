"""A finished eval folder (summary.json and the per-probe Parquet files) written as Inspect AI eval logs, one per probe.

An Inspect "task" is a probe, so `inspect view --log-dir DIR` lists one log per probe of the eval. Nothing is
recomputed: every number comes from summary.json and `<probe>_items.parquet`, every text from `<probe>.parquet`.
The logs are written by inspect_ai's own types and writer (`write_eval_log`) in the `.eval` format: Inspect's
default, a zip that keeps each sample in its own compressed entry, so a persuasion log with every turn of every
dialogue stays small and the viewer loads samples as it shows them (`.json` would be one uncompressed document).

What a log holds:
  eval: task = the probe; model, dpolab version, seed, stance reader, --limit and the probe's sizes (task_args);
    dataset = where the probe's items came from ("bank:test", or the file that replaced it) with the sample ids.
  results: one EvalScore per metric of summary.json (scorer = the probe), its metrics the value under the metric's
    aggregate ("mean", "exp_mean", ...), "ci_low" and "ci_high" (NaN where summary.json has null), scored_samples =
    n; metadata has polarity and n; the headline is the probe's first declared headline metric; results.metadata
    has the probe's info (and self-report's `beside`).
  samples: one per item id: the ids of `<probe>.parquet` in their order, then ids that only `_items.parquet` has.
    id = the item id. scores = {probe: Score(value={metric: per-item value})} from `_items.parquet` (None where
    the id has no per-item value, e.g. mental-health crisis messages, scored per scenario group). metadata = the
    item's record (every column but `transcript`, which is the messages); an item with several records (a
    persuasion dialogue per technique, toxicity samples per seed, stigma questions per vignette) has the columns
    shared by its records at the top and the rest in metadata["records"], one dict per record, in order.
    messages = the conversation of the item's first record; input = its messages before the first reply;
    output = its last reply. Every reply the model generated, of every record, is a ModelEvent in the sample's
    events (the viewer's transcript), its input the conversation up to that reply: for persuasion every turn of
    every technique's dialogue.
  What the messages are, per probe (LAYOUTS below):
    generated replies: persuasion (the dialogue's every turn; choices = the options, target = the answer's letter),
      toxicity, verbosity, reply_style, roleplay (with its system card), mental_health delusions and crisis,
      pattern_rate (a "reference" record's reply is the fixed reference text it scored, not a generation: no event).
    scored, no generation (log-probs of options): the prompt as the only (user) message; the scored options and
      what was read (probs, choice, p_stigmatizing, ratings, ...) are in the metadata: sycophancy (neutral prompt;
      the biased one in metadata), knowledge (MCQ prompt, or a perplexity chunk scored as plain text without a
      chat template), mental_health stigma (both options are in the prompt), risk (the gamble shown as A; the B
      order's probability in metadata), partner (the no-message prompt; the helpful, misleading and irrelevant
      prompts in metadata; target = the answer's letter), self_report.
    ids with no record (values paired over items, e.g. roleplay's villain_gap by card index, mental_health's
      stigma_excess by vignette number): input is a line naming that, no messages.
  A probe with no entry in LAYOUTS, or whose records lack a column its layout reads, is an error naming it.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dpolab.errors import ConfigError, DataError
from dpolab.probes.summary import EvalSummary

INSTALL = "pip install inspect-ai==0.3.285"
FORMAT = "eval"

Message = dict[str, str]


@dataclass(frozen=True)
class Reading:
    """One conversation a record holds: what the model saw and, if it generated, its reply.

    label: what it is ("dialogue", "reply", "neutral", ...). generated: the assistant messages are the model's own
    generations (a ModelEvent each), not fixed texts it was scored on.
    """

    label: str
    messages: list[Message]
    generated: bool = True


@dataclass(frozen=True)
class Layout:
    """How one probe's records hold their conversations and target.

    columns: the record columns the layout reads (checked, so a changed probe fails here rather than exporting
    empty samples). readings: record -> its conversations. target: record -> the target text ("" for none).
    choices: record -> the options shown, or None.
    """

    columns: tuple[str, ...]
    readings: Callable[[dict[str, Any]], list[Reading]]
    target: Callable[[dict[str, Any]], str] = lambda r: ""
    choices: Callable[[dict[str, Any]], list[str] | None] = lambda r: None


def _turns(system: str | None, user: str | None, reply: str | None) -> list[Message]:
    out = [{"role": "system", "content": system}] if system else []
    if user is not None:
        out.append({"role": "user", "content": user})
    if reply is not None:
        out.append({"role": "assistant", "content": reply})
    return out


def _letter(index: int | None) -> str:
    return "" if index is None else chr(ord("A") + int(index))


def _asked(key: str, label: str = "prompt") -> Callable[[dict[str, Any]], list[Reading]]:
    """A single-turn conversation, with the reply when the record has one."""
    return lambda r: [Reading(label, _turns(None, r[key], r.get("reply")))]


def _scored(*keys: str) -> Callable[[dict[str, Any]], list[Reading]]:
    """Prompts read by log-probs, no generation: the first is the sample's messages."""
    return lambda r: [Reading(k, _turns(None, r[k], None), generated=False) for k in keys if r.get(k) is not None]


def _pattern(r: dict[str, Any]) -> list[Reading]:
    return [Reading(r.get("kind") or "reply", _turns(None, r["prompt"], r["reply"]), generated=r.get("kind") != "reference")]


def _mental_health(r: dict[str, Any]) -> list[Reading]:
    generated = r.get("reply") is not None  # stigma reads two option texts; delusions and crisis generate
    return [Reading(r["part"], _turns(None, r["prompt"], r.get("reply")), generated=generated)]


def _knowledge(r: dict[str, Any]) -> list[Reading]:
    return [Reading(r.get("kind") or "mcq", _turns(None, r["prompt"], None), generated=False)]


LAYOUTS: dict[str, Layout] = {
    "persuasion": Layout(("transcript", "options", "answer"),
                         lambda r: [Reading("dialogue", [dict(m) for m in r["transcript"]])],
                         target=lambda r: _letter(r["answer"]), choices=lambda r: list(r["options"])),
    "sycophancy": Layout(("neutral_prompt", "biased_prompt", "answer"), _scored("neutral_prompt", "biased_prompt"),
                         target=lambda r: _letter(r["answer"])),
    "toxicity": Layout(("prompt", "reply"), _asked("prompt", "reply")),
    "verbosity": Layout(("instruction", "reply"), _asked("instruction", "reply")),
    "knowledge": Layout(("prompt",), _knowledge, target=lambda r: _letter(r.get("answer"))),
    "reply_style": Layout(("prompt", "reply"), _asked("prompt", "reply")),
    "mental_health": Layout(("part", "prompt"), _mental_health),
    "risk": Layout(("prompt_risky_a",), _scored("prompt_risky_a")),
    "roleplay": Layout(("system", "prompt", "reply"),
                       lambda r: [Reading("in character", _turns(r["system"], r["prompt"], r["reply"]))]),
    "pattern_rate": Layout(("prompt", "reply"), _pattern),
    "partner": Layout(("prompt_absent", "prompt_helpful", "prompt_misleading", "prompt_irrelevant", "answer_letter"),
                      _scored("prompt_absent", "prompt_helpful", "prompt_misleading", "prompt_irrelevant"),
                      target=lambda r: r["answer_letter"]),
    "self_report": Layout(("prompt",), _scored("prompt")),
}

# Probe options that name a file replacing the probe's shipped bank: the log's dataset says which was used.
SOURCE_OPTIONS = ("prompts", "instructions", "messages", "cards", "questions", "appeals", "heldout", "references")


def require_inspect() -> None:
    """Raise ConfigError, saying how to install it, unless inspect_ai is importable."""
    try:
        import inspect_ai  # noqa: F401
    except ImportError:
        raise ConfigError(f"writing Inspect logs needs inspect_ai: {INSTALL}") from None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError(f"{path} is missing: not a finished dpolab eval folder")
    return pq.read_table(path).to_pylist()


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _split_common(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One item's records as metadata: columns equal in every record at the top, the rest per record."""
    fields = [k for k in records[0] if k != "transcript"]
    if len(records) == 1:
        return {k: records[0][k] for k in fields}
    common = [k for k in fields if all(k in r and r[k] == records[0][k] for r in records)]
    varying = [k for k in dict.fromkeys(k for r in records for k in r) if k not in common and k != "transcript"]
    if any("records" in r for r in records):
        raise DataError("a record column is named 'records', which the Inspect sample metadata uses")
    meta = {k: records[0][k] for k in common}
    meta["records"] = [{k: r.get(k) for k in varying} for r in records]
    return meta


def _chat(messages: Sequence[Message]):
    from inspect_ai.model import ChatMessageAssistant, ChatMessageSystem, ChatMessageUser

    kinds = {"system": ChatMessageSystem, "user": ChatMessageUser, "assistant": ChatMessageAssistant}
    out = []
    for m in messages:
        if m["role"] not in kinds:
            raise DataError(f"a transcript message has role {m['role']!r}; expected one of {', '.join(kinds)}")
        out.append(kinds[m["role"]](content=m["content"]))
    return out


def _events(model: str, readings: list[Reading]):
    """A ModelEvent per generated reply: its input the conversation before it, its output the reply."""
    from inspect_ai.event import ModelEvent
    from inspect_ai.model import GenerateConfig, ModelOutput

    events = []
    for reading in readings:
        if not reading.generated:
            continue
        for j, m in enumerate(reading.messages):
            if m["role"] == "assistant":
                events.append(ModelEvent(model=model, input=_chat(reading.messages[:j]), tools=[], tool_choice="none",
                                         config=GenerateConfig(), output=ModelOutput.from_content(model, m["content"])))
    return events


def _sample(probe: str, item_id: str, records: list[dict[str, Any]], values: dict[str, float], model: str):
    from inspect_ai.log import EvalSample
    from inspect_ai.model import ModelOutput
    from inspect_ai.scorer import Score

    layout = LAYOUTS[probe]
    scores = {probe: Score(value=values)} if values else None
    if not records:
        return EvalSample(id=item_id, epoch=1, input=f"(no conversation: a per-item value of {probe} paired over "
                          f"items, for {', '.join(values)})", target="", scores=scores, metadata={})
    readings = [reading for r in records for reading in layout.readings(r)]
    first = readings[0].messages
    n_input = next((j for j, m in enumerate(first) if m["role"] == "assistant"), len(first))
    replies = [m["content"] for m in first if m["role"] == "assistant"]
    return EvalSample(
        id=item_id, epoch=1, input=_chat(first[:n_input]), choices=layout.choices(records[0]),
        target=layout.target(records[0]), messages=_chat(first),
        output=ModelOutput.from_content(model, replies[-1]) if replies else ModelOutput(model=model),
        scores=scores, metadata=_split_common(records), events=_events(model, readings))


def _samples(probe: str, records: list[dict[str, Any]], per_item: list[dict[str, Any]], model: str) -> list:
    if probe not in LAYOUTS:
        raise ConfigError(f"no Inspect log layout for probe {probe!r}: add its entry to LAYOUTS in "
                          f"dpolab/probes/inspect_log.py (known: {', '.join(LAYOUTS)})")
    missing = sorted({c for c in LAYOUTS[probe].columns for r in records if c not in r})
    if missing:
        raise DataError(f"{probe}.parquet lacks column(s) {', '.join(missing)} that its Inspect log layout reads; "
                        "update LAYOUTS in dpolab/probes/inspect_log.py")
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_id.setdefault(str(r["item_id"]), []).append(r)
    values: dict[str, dict[str, float]] = {}
    for row in per_item:
        values.setdefault(str(row["item_id"]), {})[row["metric"]] = row["value"]
    ids = list(dict.fromkeys([*by_id, *values]))
    return [_sample(probe, i, by_id.get(i, []), values.get(i, {}), model) for i in ids]


def _results(probe: str, summary: EvalSummary, n_samples: int):
    from inspect_ai.log import EvalMetric, EvalResults, EvalScore, HeadlineMetric

    from dpolab.probes import PROBES

    found = summary.probe(probe)
    scores = []
    for name, m in found.metrics.items():
        metrics = {m.aggregate: EvalMetric(name=m.aggregate, value=_nan(m.value)),
                   "ci_low": EvalMetric(name="ci_low", value=_nan(m.ci_low)),
                   "ci_high": EvalMetric(name="ci_high", value=_nan(m.ci_high))}
        scores.append(EvalScore(name=name, scorer=probe, scored_samples=m.n, metrics=metrics,
                                metadata={"n": m.n, "higher_is_better": m.higher_is_better, "aggregate": m.aggregate}))
    heads = [h.metric for h in PROBES.get(probe).headlines if h.metric in found.metrics] if probe in PROBES else []
    headline = (HeadlineMetric(scorer=probe, score=heads[0], metric=found.metrics[heads[0]].aggregate)
                if heads else None)
    meta: dict[str, Any] = {"info": found.info}
    if found.beside is not None:
        meta["beside"] = found.beside
    return EvalResults(total_samples=n_samples, completed_samples=n_samples, scores=scores, headline=headline,
                       metadata=meta)


def _source(probe: str, summary: EvalSummary) -> str:
    from dpolab.probes import PROBES

    sizes = summary.sizes.get(probe, {})
    files = [f"{k}={sizes[k]}" for k in SOURCE_OPTIONS if isinstance(sizes.get(k), str)]
    base = summary.items if probe in PROBES and PROBES.get(probe).uses_items else "bank:test"
    return ", ".join([base, *files])


def write_inspect_log(eval_dir: str | Path, log_dir: str | Path, *, probes: Sequence[str] | None = None,
                      model: str | None = None) -> list[Path]:
    """Write a finished eval folder as Inspect eval logs (one `.eval` file per probe) into `log_dir`; return them.

    eval_dir: what `run_eval(out=...)` wrote: summary.json, <probe>.parquet and <probe>_items.parquet.
    probes: which of its probes (default: every probe in summary.json); one that is not there is an error.
    model: the model's name in the logs (default: summary.json's); e.g. a run's cell name.
    Writing the same eval again replaces its logs (a file's name is the eval's time, the probe and a hash of the
    summary), so `inspect view` lists each probe once. See the module docstring for what a sample holds.
    """
    require_inspect()
    import inspect_ai
    from inspect_ai.log import EvalConfig, EvalDataset, EvalLog, EvalPlan, EvalPlanStep, EvalSpec, EvalStats
    from inspect_ai.log import write_eval_log

    import dpolab

    eval_dir, log_dir = Path(eval_dir), Path(log_dir)
    summary_path = eval_dir / "summary.json"
    summary = EvalSummary.read(summary_path)
    names = list(summary.probes) if probes is None else list(probes)
    absent = [n for n in names if n not in summary.probes]
    if absent:
        raise ConfigError(f"{summary_path} has no probe {', '.join(map(repr, absent))}; "
                          f"it has {', '.join(summary.probes)}")
    stamp = datetime.fromtimestamp(summary_path.stat().st_mtime, tz=timezone.utc)
    digest = hashlib.sha256(json.dumps(summary.to_json(), sort_keys=True).encode()).hexdigest()
    model_name = model or summary.model
    log_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for probe in names:
        records = _read_rows(eval_dir / f"{probe}.parquet")
        per_item = _read_rows(eval_dir / f"{probe}_items.parquet")
        samples = _samples(probe, records, per_item, model_name)
        task_id = hashlib.sha256(f"{digest}:{probe}".encode()).hexdigest()[:22]
        spec = EvalSpec(
            run_id=digest[:22], eval_id=task_id, task_id=task_id, created=stamp.isoformat(timespec="seconds"),
            task=probe, task_registry_name=f"dpolab/{probe}", task_args=summary.sizes.get(probe, {}),
            dataset=EvalDataset(name=probe, location=_source(probe, summary), samples=len(samples),
                                sample_ids=[s.id for s in samples]),
            model=model_name, model_args={"backend": summary.backend} if summary.backend else {},
            config=EvalConfig(limit=summary.limit),
            packages={"dpolab": dpolab.__version__, "inspect_ai": inspect_ai.__version__},
            metadata={"dpolab_version": dpolab.__version__, "seed": summary.seed, "stance": summary.stance,
                      "items": summary.items, "limit": summary.limit, "sizes": summary.sizes.get(probe, {}),
                      "wall_time_s": summary.wall_time_s.get(probe), "eval_dir": str(eval_dir.resolve())})
        log = EvalLog(status="success", eval=spec,
                      plan=EvalPlan(name="dpolab", steps=[EvalPlanStep(solver=f"dpolab.probes.{probe}")]),
                      results=_results(probe, summary, len(samples)),
                      stats=EvalStats(completed_at=stamp.isoformat(timespec="seconds")), samples=samples)
        # inspect's own file name, {time}_{task}_{id}: its listing splits on "_", so the task's own are "-"
        path = log_dir / f"{stamp.strftime('%Y-%m-%dT%H-%M-%S+00-00')}_{probe.replace('_', '-')}_{task_id}.{FORMAT}"
        write_eval_log(log, str(path), format=FORMAT)
        written.append(path)
    return written
