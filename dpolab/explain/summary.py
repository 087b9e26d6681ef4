"""explain.json read back as lines a terminal shows: each figure beside its null, in plain words."""
from __future__ import annotations

from typing import Any


def _n(x: Any, signed: bool = False, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def beyond_chance(band: dict[str, Any], value_key: str = "value") -> bool:
    """Whether a figure lies outside its random-direction null interval."""
    v, lo, hi = band.get(value_key), band.get("null_low"), band.get("null_high")
    return None not in (v, lo, hi) and not lo <= v <= hi


def format_explain(r: dict[str, Any]) -> list[str]:
    acc, eff = r["probe_accuracy"], r["effect_of_training"]
    lines = [
        f"{r['behaviour']}: {r['tuned']} against {r['base']}",
        f"  training's effect on {r['metric']}: {_n(eff['value'], True)} [{_n(eff['ci_low'], True)}, "
        f"{_n(eff['ci_high'], True)}]",
        f"  probe (layer {acc['layer']}, {r['replies']['pooled']} replies): held-out accuracy {_n(acc['value'])} "
        f"[{_n(acc['ci_low'])}, {_n(acc['ci_high'])}]; shuffled labels {_n(acc['random_label']['value'])}",
        f"  net shift along the probe, all layers: {_n(r['total_shift']['value'], True)} "
        f"(random directions {_n(r['total_shift']['null_low'], True)} to {_n(r['total_shift']['null_high'], True)}, "
        f"z {_n(r['total_shift']['z'], True, 1)})",
        f"  group shares of the change ({r['direction_of_change']}), beside random directions:",
    ]
    for g, v in r["groups"].items():
        mark = "  beyond chance" if beyond_chance(v, "share") else ""
        lines.append(f"    {g}  {_pct(v['share']):>6}  null {_pct(v['null_low'])}-{_pct(v['null_high'])}  "
                     f"z {_n(v['z'], True, 1)}{mark}")
    layers = [x for x in r["layers"] if beyond_chance(x, "shift")]
    lines.append("  layers whose shift is outside the null: " + (", ".join(str(x["layer"]) for x in layers) or "none"))
    for name, row in [("ablate top-k", r["ablation"]), *((f"patch {k}", v) for k, v in r["patching"].items())]:
        rnd = row["random"]
        lines.append(f"  {name} ({row['k']}): {_pct(row['fraction_of_dpo'])} of training's effect "
                     f"[{_pct(row['ci_low'])}, {_pct(row['ci_high'])}]; random neurons {_pct(rnd['fraction_of_dpo'])} "
                     f"[{_pct(rnd['ci_low'])}, {_pct(rnd['ci_high'])}]")
    return lines
