"""Render the report's sections into the template and write OUT/report.html atomically."""
from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

from dpolab.errors import DataError
from dpolab.experiment.summary import DUETPD_SOURCE, matrix_title
from dpolab.io import atomic_write_text
from dpolab.report import views
from dpolab.report.load import load_experiment
from dpolab.report.sections import probe_sections

TEMPLATES = Path(__file__).parent / "templates"
# What a finished run folder holds: the runner writes timings.json last, after results.parquet (and its .csv).
FINISHED = ("results.parquet", "timings.json")


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
    env = _environment()
    rows = views.all_rows(exp)
    page = {
        "csp": _policy(env.get_template("report.js").render()),
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
        "rows": rows,
        "row_filters": views.row_filters(rows),
        "files": views.run_files(exp),
        "timings": views.timings(exp, phases),
        "spec_text": exp.spec_text,
        "environment": views.environment(exp),
        "sizes": views.eval_sizes(exp),
    }
    return env.get_template("report.html.j2").render(**page)


def _policy(script: str) -> str:
    """The page's Content-Security-Policy: nothing loads from anywhere (figures are data: URIs), and the only
    script that runs is the report's own, named by its hash, so markup that slipped past escaping could run none."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
            "base-uri 'none'; form-action 'none'")


def write_report(out_dir: str | Path, *, phases: Sequence[tuple[str, float]] | None = None) -> Path:
    """Write OUT/report.html for the experiment folder `out_dir` (see dpolab.experiment.runner); returns its path.

    phases: (phase, seconds) of the run so far; without it the phases come from OUT/timings.json, if present.
    """
    out_dir = Path(out_dir)
    html = render_report(out_dir, phases=phases)
    return atomic_write_text(out_dir / "report.html", html)


def rebuild_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html again from a finished run folder, with this dpolab's report: after an upgrade, without
    rerunning. The phases and the wall time come from the run's timings.json, as the run's own report took them, so
    the two differ only in the generation time and in what the newer report shows.
    """
    run = Path(run_dir)
    if not run.is_dir():
        what = "not a folder" if run.exists() else "no such folder"
        raise DataError(f"{run}: {what}; give the folder `dpolab run` wrote")
    missing = [name for name in FINISHED if not (run / name).is_file()]
    if missing:
        raise DataError(f"{run}: not a finished run folder, it has no {' or '.join(missing)} (`dpolab run` writes them "
                        "when it ends; `dpolab run SPEC --out DIR --resume` finishes a cut run)")
    return write_report(run)
