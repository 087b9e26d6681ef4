"""The `dpolab` command: parse arguments, load configs, call the library. No logic of its own."""
from __future__ import annotations

import sys

import typer

from dpolab.errors import DpolabError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Does preference optimization improve or harm a model's behaviour?")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate preference data.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: side-by-side ratios on this machine.")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, with no traceback."""
    try:
        app()
    except DpolabError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
