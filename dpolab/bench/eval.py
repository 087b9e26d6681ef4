"""`dpolab bench eval`: the default eval on the `hf` backend and on another one, side by side in one run.

Both runs evaluate the same loaded weights with the same probes, sizes, seed and batch size, one after the other
in this process (the hf run first). Each backend sits behind a `Recorder`, which logs every request the probes
make and its answer, so the two runs can be compared request by request:

- identical_share: of the hf run's greedy replies, the share whose request (the same conversation and limits)
  the other run also made and answered with the same text. A dialogue whose transcripts part ways makes different
  requests from then on; those count as not identical, so the share is a lower bound.
- max_logprob_diff: the largest |difference| of any log-prob both runs computed for the same request (a summed
  continuation, a next-token candidate, a raw text). Sampled replies are not compared: the engines draw from
  different random generators.
- headlines: each probe's headline metrics on both backends, and whether the other backend's value lies inside
  the hf run's 95% CI.

Timing: each backend's eval wall time and its time per probe (the probes' own clocks in the summary). Making the
engine (loading, and for CTranslate2 converting the weights when they are not in the cache yet) is timed apart,
as `setup_seconds`; a conversion is paid once per set of weights.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dpolab.models.chat import ChatModel, Conversation, Generation
from dpolab.models.scoring import TextScore
from dpolab.progress import Progress


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, ensure_ascii=False)


@dataclass
class Recorder:
    """A ChatModel that passes every call to `inner` and remembers each request's answer, by request."""

    inner: ChatModel
    greedy: dict[str, str] = field(default_factory=dict)  # request -> reply text
    logprobs: dict[str, float] = field(default_factory=dict)  # request -> log-prob
    sampled: int = 0  # sampled replies (not compared)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def backend(self) -> str | None:
        return getattr(self.inner, "backend", None)

    def clear_cache(self) -> None:
        if hasattr(self.inner, "clear_cache"):
            self.inner.clear_cache()

    def token_count(self, text: str) -> int:
        return self.inner.token_count(text)

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, seed: int | None = None) -> list[Generation]:
        out = self.inner.generate(conversations, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature, seed=seed)
        if do_sample:
            self.sampled += len(out)
        else:
            for conv, g in zip(conversations, out):
                self.greedy[_key(conv, max_new_tokens)] = g.text
        return out

    def score_continuations(self, conversations: Sequence[Conversation],
                            continuations: Sequence[Sequence[str]]) -> list[list[float]]:
        out = self.inner.score_continuations(conversations, continuations)
        for conv, texts, values in zip(conversations, continuations, out):
            for text, v in zip(texts, values):
                self.logprobs[_key("continuation", conv, text)] = v
        return out

    def next_token_logprobs(self, conversations: Sequence[Conversation], candidates: Sequence[str], *,
                            prefix: str = "") -> list[list[float]]:
        out = self.inner.next_token_logprobs(conversations, candidates, prefix=prefix)
        for conv, values in zip(conversations, out):
            for cand, v in zip(candidates, values):
                self.logprobs[_key("next", conv, prefix, cand)] = v
        return out

    def score_texts(self, texts: Sequence[str]) -> list[TextScore]:
        out = self.inner.score_texts(texts)
        for text, s in zip(texts, out):
            self.logprobs[_key("text", text)] = s.logprob
        return out


def agreement(a: Recorder, b: Recorder) -> dict[str, Any]:
    """How far run b agrees with run a, request by request (see the module docstring)."""
    same = sum(1 for k, text in a.greedy.items() if b.greedy.get(k) == text)
    shared = [k for k in a.logprobs if k in b.logprobs]
    diffs = [abs(a.logprobs[k] - b.logprobs[k]) for k in shared
             if math.isfinite(a.logprobs[k]) and math.isfinite(b.logprobs[k])]
    return {"greedy_replies": len(a.greedy), "identical_replies": same,
            "identical_share": same / len(a.greedy) if a.greedy else None,
            "logprobs_compared": len(diffs), "logprobs_not_compared": len(a.logprobs) - len(diffs),
            "max_logprob_diff": max(diffs) if diffs else None, "sampled_replies": {"hf": a.sampled, "other": b.sampled}}


def headline_agreement(hf, other) -> list[dict[str, Any]]:
    """Each probe's headline metrics on both runs, and whether the other's value is inside hf's 95% CI."""
    from dpolab.probes import PROBES

    rows = []
    for probe in hf.probes:
        for h in PROBES.get(probe).headlines:
            a, b = hf.metric(probe, h.metric), other.metric(probe, h.metric)
            if a is None or b is None or a.value is None or b.value is None:
                continue
            inside = a.ci_low is not None and a.ci_high is not None and a.ci_low <= b.value <= a.ci_high
            rows.append({"probe": probe, "metric": h.metric, "hf": a.value, "hf_ci": [a.ci_low, a.ci_high],
                         "other": b.value, "inside_hf_ci": inside})
    return rows


def bench_backends(model: str, *, backend: str, probes: str | Sequence[str] | None = None,
                   sizes: dict[str, dict] | None = None, limit: int | None = None, batch_size: int = 32,
                   seed: int = 0, int8: bool = False, progress: Progress | None = None,
                   echo: Callable[[str], None] = print, keep: dict[str, Recorder] | None = None) -> dict[str, Any]:
    """Run the eval on `hf` and on `backend`; return the JSON report (see the module docstring).

    keep: a dict that receives each backend's Recorder, for a caller that looks at the requests themselves.
    """
    from dpolab.bench.hardware import describe
    from dpolab.models.backends import BACKENDS, chat_model
    from dpolab.models.generate import HFChatModel
    from dpolab.models.load import load_model
    from dpolab.probes.run import run_eval

    import torch

    BACKENDS.check(backend)
    loaded = load_model(model)
    runs: dict[str, dict[str, Any]] = {}
    recorders: dict[str, Recorder] = {}
    summaries = {}
    for name in ("hf", backend):
        t0 = time.perf_counter()
        engine = HFChatModel(loaded, batch_size=batch_size) if name == "hf" else chat_model(
            loaded, backend=backend, batch_size=batch_size, int8=int8)
        setup = time.perf_counter() - t0
        recorders[name] = Recorder(engine)
        echo(f"[{name}] eval ({getattr(engine, 'backend', name)})")
        t0 = time.perf_counter()
        summaries[name] = run_eval(recorders[name], probes=probes, sizes=sizes, limit=limit, seed=seed,
                                   progress=progress)
        seconds = time.perf_counter() - t0
        probe_seconds = {p: s for p, s in summaries[name].wall_time_s.items() if p != "total"}
        runs[name] = {"engine": getattr(engine, "backend", name), "setup_seconds": setup, "seconds": seconds,
                      "probe_seconds": probe_seconds}
        echo(f"[{name}] {seconds:.1f} s")
        del engine
    if keep is not None:
        keep.update(recorders)
    agree = agreement(recorders["hf"], recorders[backend])
    machine = describe(torch.get_num_threads())
    hf_s, other_s = runs["hf"]["seconds"], runs[backend]["seconds"]
    return {"model": model, "backend": backend, "int8": int8, "batch_size": batch_size, "seed": seed,
            "probes": list(summaries["hf"].probes), "sizes": summaries["hf"].sizes, "backends": runs,
            "speedup": hf_s / other_s, "identical_share": agree["identical_share"],
            "max_logprob_diff": agree["max_logprob_diff"], "agreement": agree,
            "headlines": headline_agreement(summaries["hf"], summaries[backend]),
            "cpu": machine["cpu"], "machine": machine}


def format_table(report: dict[str, Any]) -> list[str]:
    """The report as lines of text: time per probe on both backends, then the agreement."""
    other = report["backend"]
    hf, b = report["backends"]["hf"], report["backends"][other]
    lines = [f"dpolab bench eval: {report['model']} on {report['cpu']}, hf vs {b['engine']} (batch {report['batch_size']})",
             f"{'probe':<14}{'hf s':>9}{other + ' s':>16}{'ratio':>8}"]
    for probe, s in hf["probe_seconds"].items():
        o = b["probe_seconds"].get(probe)
        lines.append(f"{probe:<14}{s:>9.1f}{o:>16.1f}{s / o if o else float('nan'):>7.2f}x")
    lines.append(f"{'total':<14}{hf['seconds']:>9.1f}{b['seconds']:>16.1f}{report['speedup']:>7.2f}x")
    lines.append(f"setup (load/convert): hf {hf['setup_seconds']:.1f} s, {other} {b['setup_seconds']:.1f} s")
    a = report["agreement"]
    share = "-" if a["identical_share"] is None else f"{a['identical_share']:.1%}"
    diff = "-" if a["max_logprob_diff"] is None else f"{a['max_logprob_diff']:.2e}"
    lines.append(f"identical greedy replies: {a['identical_replies']}/{a['greedy_replies']} ({share}); "
                 f"largest log-prob difference {diff} over {a['logprobs_compared']} shared requests")
    outside = [f"{h['probe']}.{h['metric']}" for h in report["headlines"] if not h["inside_hf_ci"]]
    lines.append(f"headline metrics inside the hf run's CI: {len(report['headlines']) - len(outside)}/{len(report['headlines'])}"
                 + (f" (outside: {', '.join(outside)})" if outside else ""))
    return lines
