"""Render the report's sections into the template and write OUT/report.html atomically."""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from dpolab.experiment.summary import DUETPD_SOURCE, matrix_title
from dpolab.io import atomic_write_text
from dpolab.report import views
from dpolab.report.load import load_experiment
from dpolab.report.sections import probe_sections

TEMPLATES = Path(__file__).parent / "templates"


def _environment():
    import jinja2

    # autoescape everything: model replies, prompts and the spec are text from files, never markup
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_report(out_dir: str | Path, *, phases: Sequence[tuple[str, float]] | None = None,
                  generated: str | None = None) -> str:
    """The report's HTML for the experiment in `out_dir`.

    phases: (phase, seconds) of the run, when the caller has them before timings.json is written.
    generated: the timestamp shown in the header (default: now); the only part that varies between renders.
    """
    exp = load_experiment(out_dir)
    page = {
        "header": views.header(exp),
        "generated": generated or time.strftime("%Y-%m-%d %H:%M:%S"),
        "counts": views.verdict_counts(exp),
        "headlines": views.headline_items(exp),
        "findings": views.finding_items(exp),
        "matrix": views.matrix(exp),
        "placebo_matrix": views.matrix(exp, against="placebo"),
        "matrix_title": matrix_title(exp.rows),
        "duetpd": views.duetpd_table(exp),
        "duetpd_source": DUETPD_SOURCE,
        "limitations": views.limitations(exp),
        "sections": probe_sections(exp),
        "mechanism": views.mechanism(exp),
        "training_figure": views.training_figure(exp),
        "training_table": views.training_table(exp),
        "odpo_offsets": views.odpo_offsets(exp),
        "rows": views.all_rows(exp),
        "timings": views.timings(exp, phases),
        "spec_text": exp.spec_text,
        "environment": views.environment(exp),
        "sizes": views.eval_sizes(exp),
    }
    return _environment().get_template("report.html.j2").render(**page)


def write_report(out_dir: str | Path, *, phases: Sequence[tuple[str, float]] | None = None) -> Path:
    """Write OUT/report.html for the experiment folder `out_dir` (see dpolab.experiment.runner); returns its path.

    phases: (phase, seconds) of the run so far; without it the phases come from OUT/timings.json, if present.
    """
    out_dir = Path(out_dir)
    html = render_report(out_dir, phases=phases)
    return atomic_write_text(out_dir / "report.html", html)
