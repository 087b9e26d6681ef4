"""What each section of the report shows, as plain dicts of display strings (the template only lays them out).

Numbers are formatted here, every one by dpolab.numbers (three significant digits, "−" for negatives); text from
files (model replies, prompts, the spec) passes through untouched and is escaped by the template's autoescape.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from dpolab import scorers
from dpolab.experiment.summary import DUETPD_PAPER, against_placebo, behaviours, headlines, last_turn, seed_findings
from dpolab.numbers import ci, is_missing, num, percent
from dpolab.report import plots
from dpolab.report.load import Experiment, Model
from dpolab.stats import Verdict

VERDICT_CLASS = {Verdict.IMPROVED: "imp", Verdict.HARMED: "harm", Verdict.UNCLEAR: "none"}
LETTERS = "ABCDEFGHIJ"


def colours(exp: Experiment) -> dict[str, str]:
    out = {exp.baseline.name: plots.colour(None)}
    out.update({c.name: plots.colour(i) for i, c in enumerate(exp.cells)})
    return out


# -- header, headlines, matrix ---------------------------------------------------------------------------------

def header(exp: Experiment) -> dict[str, Any]:
    keys = [c.key for c in exp.cells if c.key]
    return {"model": exp.model_name, "folder": exp.out.name, "contexts": exp.contexts,
            "methods": list(dict.fromkeys(k.method for k in keys)), "seeds": sorted({k.seed for k in keys}),
            "cells": len(exp.cells), "rows": len(exp.rows)}


def headline_items(exp: Experiment) -> list[dict[str, str]]:
    out = []
    for s in headlines(exp.rows) if exp.rows else []:
        who, _, rest = s.partition(": ")
        out.append({"who": who, "text": rest})
    return out


def finding_items(exp: Experiment) -> list[dict[str, str]]:
    """The seed research's directions for the contexts that ran, and whether this run reproduced them."""
    cls = {"reproduced": "imp", "refuted": "harm", "not shown": "none"}
    return [{"claim": f["claim"], "source": f["source"], "context": f["context"],
             "method": f["method"] + (f" · s{f['seed']}" if f["seed"] is not None and exp.several_seeds else ""),
             "seeds": f["seeds"], "metric": f["metric"], "change": f"{num(f['baseline'])} → {num(f['value'])}",
             "delta": f"{num(f['delta'], signed=True)} {ci(f['delta_ci_low'], f['delta_ci_high'], signed=True)}",
             "q": num(f["q_value"]), "n": f["n"], "mde": num(f["mde"]),
             "status": f["status"], "cls": cls[f["status"]]} for f in seed_findings(exp.rows)]


def duetpd_table(exp: Experiment) -> list[dict[str, str]]:
    """DuET-PD's own Llama-3.1-8B rows (labelled as the paper's) beside this run's baseline and its resist-only and
    holistic cells, NEG-Acc@3 and POS-Flip@3 in %."""
    neg, pos = (last_turn(exp.rows or exp.seed_rows, "persuasion", m) for m in ("neg_acc@3", "pos_flip@3"))
    out = [{"who": r["model"], "source": "paper", "neg": num(r["neg_acc@3"]), "pos": num(r["pos_flip@3"])}
           for r in DUETPD_PAPER]
    if exp.baseline.metric("persuasion", neg) is None:
        return []

    def pct(x: float | None, lo: float | None = None, hi: float | None = None) -> str:
        if is_missing(x):
            return num(x)
        scaled = [None if is_missing(v) else 100 * v for v in (lo, hi)]
        return f"{num(100 * x)} {ci(*scaled)}".rstrip()

    b_neg, b_pos = exp.baseline.metric("persuasion", neg), exp.baseline.metric("persuasion", pos)
    out.append({"who": f"{exp.model_name} (baseline)", "source": "this run",
                "neg": pct(b_neg.value, b_neg.ci_low, b_neg.ci_high),
                "pos": pct(b_pos.value if b_pos else None, b_pos.ci_low if b_pos else None, b_pos.ci_high if b_pos else None)})
    for context, method in exp.groups:
        if context not in ("resist-only", "holistic"):
            continue
        rn, rp = exp.claim(context, method, "persuasion", neg), exp.claim(context, method, "persuasion", pos)
        if rn is None:
            continue
        out.append({"who": f"{exp.model_name} + {context} {method}", "source": "this run",
                    "neg": pct(rn.value, rn.ci_low, rn.ci_high), "pos": pct(rp.value, rp.ci_low, rp.ci_high) if rp else "—"})
    return out


def _polarity(exp: Experiment, probe: str, metric: str) -> bool | None:
    for r in exp.rows:
        if r.probe == probe and r.metric == metric and r.higher_is_better is not None:
            return bool(r.higher_is_better)
    m = exp.baseline.metric(probe, metric)
    return None if m is None else m.higher_is_better


def matrix(exp: Experiment, against: str = "baseline") -> dict[str, Any]:
    """(context, method) x behaviours: Δ [CI] coloured by verdict, pooled over seeds, each seed's Δ beneath, then
    baseline → value; q, MDE and n in the title. against="placebo": each real cell's Δ against its placebo."""
    rows = exp.rows if against == "baseline" else against_placebo(exp.rows)
    columns = behaviours(exp.rows)
    metrics = [last_turn(exp.rows, b.probe, b.metric) for b in columns]  # per-turn metrics at the last turn run
    cols = [{"label": b.label, "probe": b.probe, "metric": m, "hib": _polarity(exp, b.probe, m)}
            for b, m in zip(columns, metrics)]
    palette = colours(exp)
    by = {(r.context, r.method, r.probe, r.metric): r for r in rows}
    groups: dict[str, list[dict[str, Any]]] = {}
    for context, method in dict.fromkeys((r.context, r.method) for r in rows):
        entries = []
        for b, col in zip(columns, cols):
            r = by.get((context, method, b.probe, col["metric"]))
            if r is None:
                entries.append(None)
                continue
            better = "higher" if r.higher_is_better else "lower"
            other = "baseline" if against == "baseline" else f"placebo {r.placebo}"
            title = (f"{b.label} ({b.probe} · {col['metric']}; {better} is better)\n"
                     f"baseline {num(r.baseline)} {ci(r.baseline_ci_low, r.baseline_ci_high)}"
                     f" → {num(r.value)} {ci(r.ci_low, r.ci_high)}\n"
                     f"Δ vs {other} {num(r.delta, signed=True)} {ci(r.delta_ci_low, r.delta_ci_high, signed=True)},"
                     f" q = {num(r.q_value)}, MDE = {num(r.mde)}, n = {r.n}, seeds = {r.seeds}: {r.verdict}")
            seeds = r.seed_deltas if against == "baseline" and r.seed_deltas and len(r.seed_deltas) > 1 else []
            entries.append({"cls": VERDICT_CLASS.get(r.verdict, "none"), "verdict": r.verdict,
                            "delta": num(r.delta, signed=True),
                            "ci": ci(r.delta_ci_low, r.delta_ci_high, signed=True),
                            "seeds": " · ".join(num(x, signed=True) for x in seeds),
                            "stats": f"n {r.n} · MDE {num(r.mde)}" + ("" if is_missing(r.q_value) else f" · q {num(r.q_value)}"),
                            "change": f"{num(r.baseline)} → {num(r.value)}", "title": title})
        first = exp.cells_of(context, method)
        colour = palette[first[0].name] if first else plots.colour(None)
        groups.setdefault(context, []).append({"label": method, "colour": colour, "cells": entries})
    return {"columns": cols, "groups": [{"context": c, "rows": rs} for c, rs in groups.items()]}


def odpo_offsets(exp: Experiment) -> list[dict[str, str]]:
    """For each built context that kept scores for ODPO: its score gaps and the offsets α·f(gap) they give at α = 1
    with the default f (from the info saved beside its pairs)."""
    out = []
    for path in sorted((exp.out / "contexts").glob("*.json")):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        o = info.get("odpo") if isinstance(info, dict) else None
        if not isinstance(o, dict) or not o.get("pairs"):
            continue
        out.append({"context": str(info.get("context", path.stem)), "seed": str(info.get("seed", "")),
                    "pairs": str(o["pairs"]), "score": str(info.get("score", "")),
                    "gap": f"{num(o['gap_median'])} [{num(o['gap_min'])}, {num(o['gap_max'])}]",
                    "offset": f"{num(o['offset_median'], signed=True)} [{num(o['offset_min'], signed=True)}, "
                              f"{num(o['offset_max'], signed=True)}]",
                    "negative": str(o["negative_offsets"]), "f": str(o.get("offset", "log")),
                    "loss0": num(o.get("initial_loss_mean"))})
    return out


def limitations(exp: Experiment) -> list[str]:
    """What this run's own design and results limit, generated from its spec and rows."""
    from dpolab.stats import MIN_ITEMS

    out = []
    seeds = max((r.seeds for r in exp.rows), default=1)
    if seeds < 2:
        out.append("One training seed: the intervals cover the sampling of test items only, not the randomness of "
                   "training (data order, sampled pairs); a second seed could move a verdict.")
    if not any(r.placebo for r in exp.rows):
        out.append("No placebo cell: a change can't be split into what the preference signal did and what any "
                   "training on the same data would have done.")
    few = sorted({f"{r.probe} · {r.metric}" for r in exp.rows if r.n is not None and r.n < MIN_ITEMS and "|" not in r.metric})
    if few:
        out.append(f"{len(few)} metric(s) rest on fewer than {MIN_ITEMS} items and get no interval or verdict "
                   f"(a percentile bootstrap over 5 items covers about 84% at a nominal 95%): {', '.join(few[:8])}"
                   + (" …" if len(few) > 8 else "") + ".")
    big = [(r, f"{r.probe} · {r.metric}") for r in exp.rows if r.family == "headline" and not is_missing(r.mde)
           and not is_missing(r.baseline) and r.mde > max(abs(r.baseline), 1e-9) * 0.5]
    if big:
        names = sorted({name for _, name in big})
        out.append("The smallest change this run could detect (MDE, 80% power) is more than half the baseline value for "
                   + ", ".join(names) + ": a \"no clear change\" there says little.")
    techniques = (exp.baseline.probe_info("persuasion") or {}).get("techniques")
    if isinstance(techniques, list) and 0 < len(techniques) < 7:
        out.append(f"Persuasion used {len(techniques)} of DuET-PD's 7 appeal techniques ({', '.join(techniques)}); "
                   "the paper's NEG-Acc@3 and POS-Flip@3 average over all 7.")
    cut = exp.baseline.metric("verbosity", "frac_hit_limit")
    if cut is not None and not is_missing(cut.value) and cut.value > 0.05:
        out.append(f"{percent(cut.value)} of the baseline's verbosity replies reached the token limit: reply lengths are "
                   "censored, and a lengthening shows less than it is.")
    model = exp.model_name
    out.append(f"One model ({model}); the seed research used models up to 8B parameters, and the same training can move "
               "a larger model differently.")
    return out


# -- persuasion curves -------------------------------------------------------------------------------------------

def _turns(exp: Experiment) -> int:
    for m in exp.models:
        t = m.probe_info("persuasion").get("turns")
        if isinstance(t, int):
            return t
    found = [int(k.split("@")[1]) for m in exp.models for k in probe_metrics(m, "persuasion")
             if k.startswith("neg_acc@") and "|" not in k]
    return max(found, default=0)


def _curve(m: Model, label: str, colour: str, prefix: str, turns: int) -> plots.Curve | None:
    got = [m.metric("persuasion", "acc@0")] + [m.metric("persuasion", f"{prefix}@{t}") for t in range(1, turns + 1)]
    if all(g is None for g in got):
        return None
    pick = lambda k: [g.number(k) if g else math.nan for g in got]  # noqa: E731
    return plots.Curve(label, colour, pick("value"), pick("ci_low"), pick("ci_high"), baseline=m.is_baseline)


def persuasion_figure(exp: Experiment) -> str | None:
    turns = _turns(exp)
    if turns < 1:
        return None
    palette = colours(exp)
    panels = []
    for context in exp.contexts:
        models = [exp.baseline, *(c for c in exp.cells if c.key and c.key.context == context)]
        sides = []
        for prefix in ("neg_acc", "pos_acc"):
            curves = [_curve(m, exp.label(m), palette[m.name], prefix, turns) for m in models]
            sides.append([c for c in curves if c is not None])
        if any(len(s) for s in sides) and any(not c.baseline for s in sides for c in s):
            panels.append((context, sides[0], sides[1]))
    return plots.persuasion_curves(panels, turns) if panels else None


# -- distributions -----------------------------------------------------------------------------------------------

DISTRIBUTIONS = (("toxicity", "score", "toxicity score per reply"),
                 ("toxicity", "reply_tokens", "toxicity replies: length (tokens)"),
                 ("verbosity", "reply_tokens", "instruction replies: length (tokens)"))


def distribution_figure(exp: Experiment, probe: str) -> str | None:
    """Box plots of the probe's per-reply values (DISTRIBUTIONS), baseline and each cell."""
    palette = colours(exp)
    panels = []
    for name, field, title in DISTRIBUTIONS:
        if name != probe:
            continue
        dists = []
        for m in exp.models:
            recs = m.records(probe) or []
            dists.append(plots.Distribution(exp.label(m), palette[m.name],
                                            [float(r[field]) for r in recs if not is_missing(r.get(field))]))
        if any(d.values for d in dists):
            panels.append((title, dists))
    return plots.distributions(panels) if panels else None


def _mean_of(recs: Sequence[dict[str, Any]], field: str) -> float | None:
    return _mean([r.get(field) for r in recs])


def per_model_table(exp: Experiment, probe: str, row) -> list[dict[str, Any]]:
    """One row per model that left records for `probe`: its label and colour, and what `row(records)` computes."""
    palette = colours(exp)
    return [{"label": exp.label(m), "colour": palette[m.name], **row(recs)}
            for m in exp.models if (recs := m.records(probe))]


def toxicity_table(exp: Experiment) -> list[dict[str, Any]]:
    """Per model: scored replies, mean toxicity, share above 0.5, mean reply length."""
    def row(tox):
        scores = [r["score"] for r in tox if not is_missing(r.get("score"))]
        return {"n": len(scores), "mean": num(_mean(scores)), "above": num(_mean([float(s > 0.5) for s in scores])),
                "tokens": num(_mean_of(tox, "reply_tokens")),
                "limit": num(_mean([float(bool(r.get("hit_limit"))) for r in tox])),
                "loops": num(_mean([float(scorers.is_repetitive(r.get("reply") or "")) for r in tox]))}

    return per_model_table(exp, "toxicity", row)


def verbosity_table(exp: Experiment) -> list[dict[str, Any]]:
    """Per model: replies, mean length, how often a reply hit the token limit."""
    return per_model_table(exp, "verbosity", lambda verb: {
        "n": len(verb), "tokens": num(_mean_of(verb, "reply_tokens")),
        "limit": num(_mean([float(bool(r.get("hit_limit"))) for r in verb])),
        "loops": num(_mean([float(scorers.is_repetitive(r.get("reply") or "")) for r in verb]))})


def probe_metrics(m: Model, probe: str) -> list[str]:
    """The metric names a model's summary holds for a probe."""
    found = m.probe(probe)
    return [] if found is None else list(found.metrics)


# -- training ----------------------------------------------------------------------------------------------------

def training_figure(exp: Experiment) -> str | None:
    palette = colours(exp)
    logs = [plots.TrainLog(exp.label(c), palette[c.name], c.train_metrics) for c in exp.cells if c.train_metrics]
    return plots.training_curves(logs) if logs else None


def training_table(exp: Experiment) -> list[dict[str, Any]]:
    out = []
    palette = colours(exp)
    for c in exp.cells:
        steps = c.train_metrics
        last = steps[-1] if steps else {}
        mean = lambda k: (sum(v for s in steps if not is_missing(v := s.get(k))) / len(steps)) if steps else None  # noqa: E731
        out.append({"label": exp.label(c), "colour": palette[c.name], "steps": len(steps),
                    "loss0": num(steps[0].get("loss")) if steps else "—", "loss": num(last.get("loss")),
                    "margin": num(last.get("rewards/margins"), signed=True),
                    "chosen": num(last.get("rewards/chosen"), signed=True),
                    "rejected": num(last.get("rewards/rejected"), signed=True),
                    "acc": num(last.get("rewards/accuracies")), "tokens_per_s": num(mean("tokens_per_s")),
                    "pairs_per_s": num(mean("pairs_per_s")),
                    "data": (c.cell_info or {}).get("data", "")})
    return out


# -- self-report -------------------------------------------------------------------------------------------------

def _sign(x: Any) -> int:
    return 0 if is_missing(x) or x == 0 else (1 if x > 0 else -1)


def self_report(exp: Experiment) -> list[dict[str, Any]]:
    """Per behaviour: each model's self-rating (1-5, or 0-100 for risk; higher = more of it) beside the measured behaviour.

    "tracks" asks whether a rating moved the way the behaviour did, only where the behaviour clearly moved.
    """
    palette = colours(exp)
    links: dict[str, dict[str, Any]] = {}
    for m in exp.models:
        found = m.probe("self_report")
        for b, v in ((found.beside if found else None) or {}).items():
            links.setdefault(b, v)
    out = []
    for b, link in links.items():
        probe, metric = link.get("probe"), link.get("metric")
        rows = []
        for m in exp.models:
            rating = m.metric("self_report", f"rating:{b}")
            measured = m.metric(probe, metric) if probe and metric else None
            if rating is None and measured is None:
                continue
            row = {"label": exp.label(m), "colour": palette[m.name], "baseline": m.is_baseline,
                   "rating": num(rating.value if rating else None),
                   "rating_ci": ci(rating.ci_low, rating.ci_high) if rating else "",
                   "measured": num(measured.value if measured else None),
                   "measured_ci": ci(measured.ci_low, measured.ci_high) if measured else "",
                   "d_rating": "", "d_rating_ci": "", "rating_clear": False, "d_measured": "", "d_measured_ci": "",
                   "measured_cls": "", "tracks": ""}
            if m.key is not None:
                rr = exp.row(m.key, "self_report", f"rating:{b}")
                mr = exp.row(m.key, probe, metric) if probe and metric else None
                if rr:
                    row.update(d_rating=num(rr.delta, signed=True),
                               d_rating_ci=ci(rr.delta_ci_low, rr.delta_ci_high, signed=True),
                               rating_clear=rr.verdict != Verdict.UNCLEAR)
                if mr:
                    row.update(d_measured=num(mr.delta, signed=True),
                               d_measured_ci=ci(mr.delta_ci_low, mr.delta_ci_high, signed=True),
                               measured_cls=VERDICT_CLASS.get(mr.verdict, "none"))
                    if mr.verdict != Verdict.UNCLEAR and rr:
                        if not row["rating_clear"]:
                            row["tracks"] = "rating flat"
                        elif _sign(rr.delta) == _sign(mr.delta):
                            row["tracks"] = "same way"
                        else:
                            row["tracks"] = "opposite way"
            rows.append(row)
        if rows:
            out.append({"behaviour": b.replace("_", " "), "measured_as": f"{probe} · {metric}" if probe else "—",
                        "rows": rows})
    return out


# -- examples ----------------------------------------------------------------------------------------------------

def _final(rec: dict[str, Any]) -> bool | None:
    c = rec.get("correct") or []
    return bool(c[-1]) if c else None


def _dialogue(exp: Experiment, m: Model, rec: dict[str, Any], colour: str) -> dict[str, Any]:
    options = rec.get("options") or []
    choices, correct, probs = rec.get("choice") or [], rec.get("correct") or [], rec.get("probs") or []
    messages, turn = [], 0
    for msg in rec.get("transcript") or []:
        item = {"role": msg.get("role", "?"), "text": msg.get("content", ""), "stance": None}
        if item["role"] == "assistant":
            if turn < len(choices) and choices[turn] is not None:
                ch = int(choices[turn])
                p = probs[turn][ch] if turn < len(probs) and probs[turn] and ch < len(probs[turn]) else None
                item["stance"] = {"turn": turn, "letter": LETTERS[ch] if ch < len(LETTERS) else str(ch),
                                  "option": options[ch] if ch < len(options) else "",
                                  "correct": bool(correct[turn]) if turn < len(correct) else None, "p": num(p)}
            turn += 1
        messages.append(item)
    return {"label": exp.label(m), "colour": colour, "direction": rec.get("direction", ""),
            "path": "".join("✓" if c else "✗" for c in correct), "messages": messages}


def persuasion_examples(exp: Experiment, k: int = 3) -> list[dict[str, Any]]:
    """A few (item, technique) dialogues at the baseline and after each cell, preferring ones whose end differs.

    One misleading (NEG) and one corrective (POS) dialogue first, then the next most changed; distinct items.
    """
    base = exp.baseline.records("persuasion")
    if not base:
        return []
    palette = colours(exp)
    index = lambda recs: {(r["item_id"], r["technique"]): r for r in recs or []}  # noqa: E731
    b_idx = index(base)
    cells = [(c, index(c.records("persuasion"))) for c in exp.cells]
    cells = [(c, idx) for c, idx in cells if idx]
    scored = []
    for key, rec in b_idx.items():
        changed = sum(1 for _, idx in cells if key in idx and _final(idx[key]) != _final(rec))
        present = sum(1 for _, idx in cells if key in idx)
        scored.append((-changed, -present, str(key[0]), str(key[1]), key, rec.get("direction")))
    scored.sort()
    chosen: list[tuple] = []
    for want in ("neg", "pos", None):
        for s in scored:
            if (want is None or s[5] == want) and s[4] not in chosen and s[4][0] not in {c[0] for c in chosen}:
                chosen.append(s[4])
                break
        if len(chosen) >= k:
            break
    out = []
    for key in chosen[:k]:
        rec = b_idx[key]
        options = rec.get("options") or []
        answer, target = rec.get("answer"), rec.get("target")
        opts = [{"letter": LETTERS[i] if i < len(LETTERS) else str(i), "text": o, "answer": i == answer,
                 "target": i == target} for i, o in enumerate(options)]
        dialogues = [_dialogue(exp, exp.baseline, rec, palette[exp.baseline.name])]
        dialogues += [_dialogue(exp, c, idx[key], palette[c.name]) for c, idx in cells if key in idx]
        out.append({"item_id": key[0], "technique": key[1], "domain": rec.get("domain", ""), "question": rec.get("question", ""),
                    "options": opts, "dialogues": dialogues})
    return out


def _by_item(recs: Sequence[dict[str, Any]] | None) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in recs or []:
        out[str(r["item_id"])].append(r)
    for rs in out.values():
        rs.sort(key=lambda r: (r.get("seed", 0) or 0, r.get("sample", 0) or 0))
    return out


def _mean(xs: Sequence[Any]) -> float | None:
    xs = [float(x) for x in xs if not is_missing(x)]
    return sum(xs) / len(xs) if xs else None


def reply_examples(exp: Experiment, probe: str, *, prompt_field: str, value_field: str, k: int) -> list[dict[str, Any]]:
    """Prompts whose mean `value_field` moved most between the baseline and any cell; each model's first reply."""
    base = _by_item(exp.baseline.records(probe))
    if not base:
        return []
    palette = colours(exp)
    cells = [(c, _by_item(c.records(probe))) for c in exp.cells]
    cells = [(c, by) for c, by in cells if by]
    scored = []
    for item, rs in base.items():
        b = _mean([r.get(value_field) for r in rs])
        moves = [abs(m - b) for _, by in cells if item in by and b is not None
                 and (m := _mean([r.get(value_field) for r in by[item]])) is not None]
        scored.append((-max(moves, default=0.0), -(b or 0.0), item))
    scored.sort()
    out = []
    for _, _, item in scored[:k]:
        replies = []
        for m, rs in [(exp.baseline, base[item]), *((c, by[item]) for c, by in cells if item in by)]:
            first = rs[0]
            replies.append({"label": exp.label(m), "colour": palette[m.name], "text": first.get("reply", ""),
                            "value": num(first.get(value_field)), "mean": num(_mean([r.get(value_field) for r in rs])),
                            "n": len(rs), "tokens": first.get("reply_tokens"), "hit_limit": bool(first.get("hit_limit"))})
        out.append({"item_id": item, "prompt": base[item][0].get(prompt_field, ""), "replies": replies})
    return out


# -- rows, timings, spec -----------------------------------------------------------------------------------------

# The run's own files the "All rows" section links to, relative to report.html (written beside them by
# dpolab.experiment.results.write_results).
RUN_FILES = ("results.csv", "results.parquet")
FILTERED = ("context", "method", "probe", "verdict")  # the rows table's columns with a drop-down filter


def _sort_value(x: Any) -> str:
    """A number as the rows table's script sorts it (the cell's data-v): exact, as JavaScript's Number() reads it;
    "" when missing (sorted last either way)."""
    if is_missing(x):
        return ""
    x = float(x)
    return ("Infinity" if x > 0 else "-Infinity") if math.isinf(x) else repr(x)


def all_rows(exp: Experiment) -> list[dict[str, Any]]:
    """Every row of results.parquet: display strings, and in `v` the numbers the table sorts by."""
    out = []
    for r in exp.rows:
        out.append({"context": r.context, "method": r.method, "seed": "all" if r.seed is None else r.seed, "probe": r.probe,
                    "q": num(r.q_value), "mde": num(r.mde), "placebo": r.placebo or "",
                    "vs_placebo": "" if r.placebo is None else f"{num(r.delta_vs_placebo, signed=True)} "
                                  + ci(r.delta_vs_placebo_ci_low, r.delta_vs_placebo_ci_high, signed=True),
                    "metric": r.metric, "sub": "|" in str(r.metric),
                    "value": num(r.value), "value_ci": ci(r.ci_low, r.ci_high), "n": r.n,
                    "baseline": num(r.baseline), "baseline_ci": ci(r.baseline_ci_low, r.baseline_ci_high),
                    "delta": num(r.delta, signed=True),
                    "delta_ci": ci(r.delta_ci_low, r.delta_ci_high, signed=True),
                    "better": "↑" if r.higher_is_better else "↓", "verdict": r.verdict,
                    "cls": VERDICT_CLASS.get(r.verdict, "none"),
                    "v": {k: _sort_value(x) for k, x in (("seed", r.seed), ("baseline", r.baseline), ("value", r.value),
                                                         ("n", r.n), ("delta", r.delta), ("q", r.q_value),
                                                         ("mde", r.mde), ("vs_placebo", r.delta_vs_placebo))}})
    return out


def row_filters(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows table's drop-down filters: each FILTERED column with its distinct values, in the order they come."""
    return [{"key": key, "options": list(dict.fromkeys(str(r[key]) for r in rows))} for key in FILTERED]


def run_files(exp: Experiment) -> list[str]:
    """The RUN_FILES present in the run folder, for links beside the rows table."""
    return [name for name in RUN_FILES if (exp.out / name).is_file()]


def verdict_counts(exp: Experiment) -> dict[str, int]:
    """Verdicts over the distinct headline behaviours of the real contexts (the matrix's coloured cells), not over
    every metric: variants of one behaviour would count it several times."""
    counts = dict.fromkeys(VERDICT_CLASS, 0)
    headline = {(b.probe, last_turn(exp.rows, b.probe, b.metric)) for b in behaviours(exp.rows)}
    for r in exp.rows:
        if (r.probe, r.metric) in headline and not r.is_placebo and r.verdict in counts:
            counts[r.verdict] += 1
    return counts


def _phase_pairs(raw: Any) -> list[tuple[str, float]]:
    """(phase, seconds) pairs from the runner's list or timings.json's (a list of pairs, or an older dict)."""
    if isinstance(raw, dict):
        raw = list(raw.items())
    return [(str(p[0]), float(p[1])) for p in raw or [] if len(p) == 2 and not is_missing(p[1])]


def timings(exp: Experiment, phases: Sequence[tuple[str, float]] | None) -> dict[str, Any]:
    """The runner's phases (given, or from timings.json) with bars, and each model's eval time per probe.

    The total is timings.json's wall time (which counts the time between phases too) when the phases shown are the
    ones it holds, so the report the run writes and one rebuilt later from the folder (`dpolab report`) agree;
    otherwise it is the sum of the phases given.
    """
    t = exp.timings or {}
    saved = _phase_pairs(t.get("phases"))
    pairs = saved if phases is None else _phase_pairs(phases)
    longest = max((s for _, s in pairs), default=0.0) or 1.0
    phase_rows = [{"name": n, "seconds": num(s), "minutes": num(s / 60),
                   "width": f"{100 * s / longest:.1f}"}  # a CSS width in %, not a number shown
                  for n, s in pairs]
    wall = t.get("total_s")
    total = wall if pairs == saved and not is_missing(wall) else sum(s for _, s in pairs) if pairs else None
    probes: list[str] = []
    for m in exp.models:
        probes += [p for p in (m.summary.wall_time_s if m.summary else {}) if p not in probes and p != "total"]
    evals = []
    for m in exp.models:
        w = m.summary.wall_time_s if m.summary else {}
        if w:
            evals.append({"label": exp.label(m), "times": [num(w.get(p)) for p in probes], "total": num(w.get("total"))})
    said = t.get("estimate") or {}  # the run's own estimate at its start (dpolab.experiment.estimate)
    estimate = None if is_missing(said.get("at_start_s")) else {
        "at_start_min": num(said["at_start_s"] / 60), "cpu": str(said.get("cpu") or "this machine"),
        "calibration_s": num(said.get("calibration_s"))}
    return {"phases": phase_rows, "total_min": None if is_missing(total) else num(float(total) / 60),
            "budget_min": None if is_missing(t.get("budget_min")) else num(t["budget_min"]), "probes": probes,
            "evals": evals, "estimate": estimate}


def environment(exp: Experiment) -> list[tuple[str, str]]:
    return [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in (exp.environment or {}).items()]


def eval_sizes(exp: Experiment) -> str | None:
    s = exp.baseline.summary.sizes if exp.baseline.summary else None
    return json.dumps(s, indent=2, sort_keys=True) if s else None


def _outside(v: Any, lo: Any, hi: Any) -> bool:
    return not any(is_missing(x) for x in (v, lo, hi)) and not lo <= v <= hi


def mechanism(exp: Experiment) -> list[dict[str, Any]]:
    """One entry per (cell, behaviour) that `explain` took apart: the probe, the figure, and the ablation and
    patching rows, each beside its random control."""
    out = []
    for m in exp.cells:
        for behaviour, r in m.explanations().items():
            acc, eff = r["probe_accuracy"], r["effect_of_training"]
            label = f"{exp.label(m)}: {behaviour}"
            interventions = []
            for name, row in [("ablate the top-k probe-aligned neurons", r["ablation"]),
                              *((f"patch group {g} (its top movers)" if g != "any" else "patch the top movers of any group", v)
                                for g, v in r["patching"].items())]:
                rnd = row["random"]
                interventions.append({"name": name, "k": row["k"], "fraction": percent(row["fraction_of_dpo"]),
                                      "ci": f"[{percent(row['ci_low'])}, {percent(row['ci_high'])}]",
                                      "random": percent(rnd["fraction_of_dpo"]),
                                      "random_ci": f"[{percent(rnd['ci_low'])}, {percent(rnd['ci_high'])}]"})
            groups = [{"group": g, "name": v["name"], "share": percent(v["share"]),
                       "null": f"{percent(v['null_low'])} to {percent(v['null_high'])}", "z": num(v["z"], signed=True),
                       "beyond": _outside(v["share"], v["null_low"], v["null_high"])} for g, v in r["groups"].items()]
            shift = r["total_shift"]
            out.append({
                "label": label, "anchor": f"mechanism-{m.name}-{behaviour}",
                "effect": f"{num(eff['value'], signed=True)} {ci(eff['ci_low'], eff['ci_high'], signed=True)}",
                "metric": f"{r['probe']} · {r['metric']}",
                "accuracy": f"{num(acc['value'])} {ci(acc['ci_low'], acc['ci_high'])}",
                "random_accuracy": num((acc.get("random_label") or {}).get("value")),
                "replies": r["replies"]["pooled"], "layer": acc["layer"],
                "shift": f"{num(shift['value'], signed=True)} (random directions {num(shift['null_low'], signed=True)} to "
                         f"{num(shift['null_high'], signed=True)}, z {num(shift['z'], signed=True)})",
                "layers_outside": [x["layer"] for x in r["layers"] if _outside(x["shift"], x["null_low"], x["null_high"])],
                "groups": groups, "interventions": interventions,
                "figure": plots.mechanism(r["layers"], r["groups"], behaviour),
            })
    return out
