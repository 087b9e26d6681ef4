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


@data_app.command("validate")
def data_validate(
    file: str = typer.Argument(..., help="A .jsonl, .ndjson, .json, .parquet or .csv file, or a folder saved with datasets' save_to_disk."),
    model: str | None = typer.Option(None, "--model", help="Also render every pair with this model's chat template (built-in name, folder or hub id)."),
    max_length: int | None = typer.Option(None, "--max-length", min=1, help="With --model: flag pairs whose prompt cannot be cut to fit this many tokens."),
) -> None:
    """List every bad row of a preference-data file (file, line or row, field, reason); exit 1 if there is any."""
    from dpolab.data import check_pairs  # imported here so `dpolab --help` stays fast

    if max_length is not None and model is None:
        raise typer.BadParameter("needs --model to count tokens", param_hint="--max-length")
    tokenizer = None
    if model is not None:
        from dpolab.models import load_tokenizer

        tokenizer = load_tokenizer(model)
    result = check_pairs(file, tokenizer=tokenizer, max_length=max_length)
    for problem in result.problems:
        typer.echo(str(problem))
    if result.problems:
        rows = f"{result.n_skipped} of {result.n_rows} rows invalid" if result.n_rows else "no rows"
        typer.secho(f"{file}: {rows}, {len(result.problems)} problem(s)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.secho(f"{file}: {result.n_rows} rows, all valid", fg=typer.colors.GREEN)


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, with no traceback."""
    try:
        app()
    except DpolabError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


def _loss_help() -> str:
    from dpolab.losses import LOSSES

    return f"loss: {', '.join(LOSSES.names())}"


@app.command()
def train(
    model: str = typer.Option(None, help="built-in name (smollm2-135m-instruct), Hugging Face folder, or hub id"),
    data: str = typer.Option(None, help="preference data: .jsonl .json .parquet .csv or a save_to_disk folder"),
    loss: str = typer.Option(None, help=_loss_help()),
    beta: float = typer.Option(None, help="strength of the pull towards the reference"),
    lr: float = typer.Option(None, help="peak learning rate"),
    batch_size: int = typer.Option(None, help="pairs per optimizer step (all processes)"),
    max_steps: int = typer.Option(None, help="optimizer steps (default: one epoch)"),
    out: str = typer.Option(None, help="output folder"),
    config: str = typer.Option(None, help="YAML config; command-line options override it"),
    lora: bool = typer.Option(None, "--lora/--full", help="LoRA adapters (peft) or full fine-tuning"),
    resume: str = typer.Option(None, help="continue the run in this OUT folder from its newest checkpoint"),
    seed: int = typer.Option(None),
    skip_invalid: bool = typer.Option(None, "--skip-invalid", help="drop invalid rows and report how many"),
    set_: list[str] = typer.Option([], "--set", help="any config key: --set warmup_steps=10 --set loss_args.alpha=0.5"),
) -> None:
    """Train a DPO-family method on preference data."""
    from dpolab.config import parse_value
    from dpolab.training.loop import train as run_train

    overrides = {k: v for k, v in dict(model=model, data=data, loss=loss, beta=beta, lr=lr, batch_size=batch_size,
                                       max_steps=max_steps, out=out, lora=lora, seed=seed, skip_invalid=skip_invalid).items() if v is not None}
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = parse_value(value)
    try:
        result = run_train(config, resume=resume, **overrides)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    last = result.metrics[-1] if result.metrics else {}
    typer.echo(f"done: {result.steps} steps -> {result.out}" + (f"; final loss {last['loss']:.4f}, margin {last['rewards/margins']:+.4f}" if last else ""))
