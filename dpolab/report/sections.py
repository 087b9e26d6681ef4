"""One report section per probe that ran, each chosen by the probe's own declaration (`ProbeSpec.report`).

A section is a view function, (experiment, probe name) -> a dict the template `sections/<name>.html.j2` lays out,
or None when there is nothing to show. `generic` shows any probe: its metrics per model, value [CI], Δ and verdict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpolab.numbers import ci, num
from dpolab.registry import Registry
from dpolab.report import views
from dpolab.report.load import Experiment

SECTIONS = Registry("report section", {
    "generic": "dpolab.report.sections:generic",
    "persuasion": "dpolab.report.sections:persuasion",
    "toxicity": "dpolab.report.sections:toxicity",
    "verbosity": "dpolab.report.sections:verbosity",
    "self_report": "dpolab.report.sections:self_report",
    "care": "dpolab.report.sections:care",
})


@dataclass(frozen=True)
class Section:
    """A rendered probe section: its anchor and title (the page's navigation), the template and its data."""

    probe: str
    anchor: str
    title: str
    template: str
    data: dict[str, Any]


def probes_in(exp: Experiment) -> list[str]:
    """The probes any model of the run measured, in registry order; probes a newer dpolab registered last."""
    from dpolab.probes import PROBES

    seen: dict[str, None] = {}
    for m in exp.models:
        seen.update(dict.fromkeys(m.probe_names))
    return [n for n in PROBES.names() if n in seen] + [n for n in seen if n not in PROBES]


def probe_sections(exp: Experiment) -> list[Section]:
    from dpolab.probes import PROBES

    out = []
    for name in probes_in(exp):
        kind = PROBES.get(name).report if name in PROBES else "generic"
        view = SECTIONS.get(kind)
        data = view(exp, name)
        if data is not None:
            out.append(Section(probe=name, anchor=data.pop("anchor", name), title=data.pop("title"),
                               template=f"sections/{kind}.html.j2", data=data))
    return out


def generic(exp: Experiment, probe: str) -> dict[str, Any]:
    """Every metric of the probe (breakdowns folded away) for the baseline and each cell."""
    from dpolab.probes import PROBES

    spec = PROBES.get(probe) if probe in PROBES else None
    names: dict[str, None] = {}
    for m in exp.models:
        names.update(dict.fromkeys(views.probe_metrics(m, probe)))
    palette = views.colours(exp)
    metrics = []
    for metric in names:
        rows = []
        for m in exp.models:
            got = m.metric(probe, metric)
            if got is None:
                continue
            row = {"label": exp.label(m), "colour": palette[m.name], "value": num(got.value),
                   "ci": ci(got.ci_low, got.ci_high), "n": got.n,
                   "delta": "", "delta_ci": "", "verdict": "", "cls": ""}
            r = exp.row(m.key, probe, metric) if m.key is not None else None
            if r:
                row.update(delta=num(r.delta, signed=True),
                           delta_ci=ci(r.delta_ci_low, r.delta_ci_high, signed=True),
                           verdict=r.verdict, cls=views.VERDICT_CLASS.get(r.verdict, "none"))
            rows.append(row)
        first = next(got for m in exp.models if (got := m.metric(probe, metric)) is not None)
        metrics.append({"metric": metric, "sub": "|" in metric, "rows": rows,
                        "better": "↑ higher is better" if first.higher_is_better else "↓ lower is better"})
    return {"title": probe.replace("_", " ").capitalize() + (f": {spec.summary}" if spec and spec.summary else ""),
            "metrics": metrics}


def persuasion(exp: Experiment, probe: str) -> dict[str, Any]:
    return {"title": "Persuasion: accuracy by turn (DuET-PD)", "figure": views.persuasion_figure(exp),
            "examples": views.persuasion_examples(exp)}


def toxicity(exp: Experiment, probe: str) -> dict[str, Any]:
    return {"title": "Toxicity, per reply", "figure": views.distribution_figure(exp, probe),
            "table": views.toxicity_table(exp),
            "examples": views.reply_examples(exp, probe, prompt_field="prompt", value_field="score", k=3)}


def verbosity(exp: Experiment, probe: str) -> dict[str, Any]:
    return {"title": "Reply length to instructions (verbosity)", "figure": views.distribution_figure(exp, probe),
            "table": views.verbosity_table(exp),
            "examples": views.reply_examples(exp, probe, prompt_field="instruction", value_field="reply_tokens", k=2)}


def care(exp: Experiment, probe: str) -> dict[str, Any]:
    """A probe whose replies are coded sentence by sentence (reply style, mental health): the generic table, then
    the replies that moved most, each sentence with its code. Records carry `score` (what moved: the advice share,
    agreement with a delusion, attending to a crisis cue) and `sentences`."""
    out = generic(exp, probe)
    examples = views.reply_examples(exp, probe, prompt_field="prompt", value_field="score", k=4)
    by_model = {exp.label(m): m for m in exp.models}
    for ex in examples:
        for r in ex["replies"]:
            rec = next((x for x in by_model[r["label"]].records(probe) or [] if x.get("item_id") == ex["item_id"]), {})
            r["codes"] = [s.get("code") for s in rec.get("sentences") or []]
    out["examples"] = examples
    out["score_label"] = {"reply_style": "advice share"}.get(probe, "flag")
    return out


def self_report(exp: Experiment, probe: str) -> dict[str, Any]:
    return {"anchor": "self-report", "title": "Self-report beside measured behaviour", "rows": views.self_report(exp)}
