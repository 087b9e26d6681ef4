"""Probes: one file per behaviour a preference-trained model may gain or lose; each returns metrics with polarity,
95% bootstrap CIs over items, raw per-item records and per-item values for paired comparisons."""
from dpolab.registry import Registry

PROBES = Registry("probe", {
    "persuasion": "dpolab.probes.persuasion:PROBE",
    "sycophancy": "dpolab.probes.sycophancy:PROBE",
    "toxicity": "dpolab.probes.toxicity:PROBE",
    "verbosity": "dpolab.probes.verbosity:PROBE",
    "knowledge": "dpolab.probes.knowledge:PROBE",
    "reply_style": "dpolab.probes.reply_style:PROBE",
    "mental_health": "dpolab.probes.mental_health:PROBE",
    "risk": "dpolab.probes.risk:PROBE",
    "roleplay": "dpolab.probes.roleplay:PROBE",
    "pattern_rate": "dpolab.probes.pattern_rate:PROBE",
    "partner": "dpolab.probes.partner:PROBE",
    "self_report": "dpolab.probes.self_report:PROBE",
})


def default_probes() -> list[str]:
    """The probes that declare themselves default-on (`ProbeSpec.default`), in registry order: what `dpolab eval`
    and a spec without probe names run."""
    return [n for n in PROBES.names() if PROBES.get(n).default]


def __getattr__(name: str):
    # run_eval is imported on first use, so `import dpolab.probes` (for the names) does not import torch
    if name == "run_eval":
        from dpolab.probes.run import run_eval

        return run_eval
    raise AttributeError(f"module 'dpolab.probes' has no attribute {name!r}")


__all__ = ["PROBES", "default_probes", "run_eval"]
