"""The report: an experiment folder -> one self-contained HTML file (OUT/report.html) that opens from disk."""
from __future__ import annotations

from dpolab.report.write import render_report, write_report

__all__ = ["render_report", "write_report"]
