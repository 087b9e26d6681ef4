"""The `dpolab` command: parse arguments, load configs, call the library. No logic of its own."""
from __future__ import annotations

import sys

import typer

from dpolab import DEFAULT_MODEL
from dpolab.bench.train import SYSTEMS as BENCH_SYSTEMS
from dpolab.errors import DpolabError
from dpolab.experiment.layout import FORMAT_HELP, Format
from dpolab.models.backends import BACKEND_CHOICES
from dpolab.stance import READERS, STANCE_CHOICES
from dpolab.tracking import TRACKERS

BACKEND_HELP = (f"inference engine: {', '.join(BACKEND_CHOICES)} (auto: vllm for a model on a GPU when it is installed, "
                "otherwise hf)")
INT8_HELP = "ctranslate2 with 8-bit weights: faster, but not the model that was trained; marked in the results"

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


@bench_app.command("train")
def bench_train(
    steps: int = typer.Option(8, "--steps", min=1, help="optimizer steps per system and workload"),
    json_path: str | None = typer.Option(None, "--json", help="also write the result as JSON to this file"),
    workloads: str = typer.Option("persuasion,short", "--workloads", help="comma-separated: persuasion, short"),
    pairs: int | None = typer.Option(None, "--pairs", min=1, help="pairs per workload (default: steps x batch size, each used once)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="pairs per optimizer step"),
    systems: str = typer.Option("dpolab,trl-default,trl-precompute", "--systems",
                                help="comma-separated: " + ", ".join(BENCH_SYSTEMS)),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="built-in name or local Hugging Face folder (full fine-tuning)"),
    lr: float = typer.Option(5e-6, "--lr", help="learning rate, the same for every system"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads in every system (default: torch's choice)"),
    length_tokenizer: str | None = typer.Option(None, "--length-tokenizer", help="count workload lengths with this model's tokenizer (default: --model's)"),
    keep: str | None = typer.Option(None, "--keep", help="keep the pairs, logs and outputs in this folder"),
) -> None:
    """dpolab's trainer against TRL's DPOTrainer: pairs/s, peak memory, per-step loss agreement, model FLOP/s."""
    from dpolab.bench.train import BenchSettings, format_table, run_bench
    from dpolab.io import atomic_write_json

    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    settings = BenchSettings(model=model, workloads=split(workloads), systems=split(systems), steps=steps, pairs=pairs,
                             batch_size=batch_size, lr=lr, threads=threads, length_tokenizer=length_tokenizer)
    result = run_bench(settings, keep=keep, echo=lambda line: typer.echo(line, err=True))
    typer.echo(format_table(result))
    if json_path:
        atomic_write_json(json_path, result)
        typer.echo(f"wrote {json_path}")


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, with no traceback."""
    from dpolab.runtime import tune_allocator

    tune_allocator()
    try:
        app()
    except DpolabError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


def _loss_help() -> str:
    from dpolab.losses import LOSSES

    return (f"loss: {', '.join(LOSSES.names())}; or a weighted list of them: "
            "--set 'loss=[dpo, sft]' --set 'loss_weights=[1.0, 0.2]'")


@app.command()
def train(
    model: str = typer.Option(None, help=f"built-in name ({DEFAULT_MODEL}), Hugging Face folder, or hub id"),
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
    report_to: list[str] = typer.Option(None, "--report-to", help="also record the run in a tracker (repeat for "
                                        "several): " + ", ".join(TRACKERS.names())),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow's store (default: $MLFLOW_TRACKING_URI, "
                                     "else a file store in OUT/mlruns)"),
    set_: list[str] = typer.Option([], "--set", help="any config key: --set warmup_steps=10 --set loss_args.alpha=0.5"),
) -> None:
    """Train a DPO-family method on preference data."""
    from dpolab.config import parse_value
    from dpolab.training.loop import train as run_train

    overrides = {k: v for k, v in dict(model=model, data=data, loss=loss, beta=beta, lr=lr, batch_size=batch_size,
                                       max_steps=max_steps, out=out, lora=lora, seed=seed, skip_invalid=skip_invalid,
                                       report_to=report_to or None, tracking_uri=tracking_uri).items() if v is not None}
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


def _spec_help() -> str:
    from dpolab.contexts import CONTEXTS
    from dpolab.probes import PROBES

    return (f"experiment spec (YAML); default: the built-in default experiment. Contexts: {', '.join(CONTEXTS.names())}. "
            f"Probes: {', '.join(PROBES.names())}")


def _preset_help() -> str:
    import yaml

    from dpolab.experiment.spec import DEFAULT_SPEC

    names = list((yaml.safe_load(DEFAULT_SPEC.read_text()) or {}).get("presets") or {})
    return ("a size or variant the spec names: default (the spec as written) or one of its presets; the built-in "
            f"spec's: {', '.join(names)} (full: hours, with the power to see small changes)")


@app.command()
def run(
    spec: str = typer.Argument(None, help=_spec_help()),
    out: str = typer.Option(None, help="output folder (default runs/experiment-<time>)"),
    quick: bool = typer.Option(False, "--quick", help="the spec's small variant (minutes, not half an hour)"),
    preset: str = typer.Option(None, "--preset", help=_preset_help()),
    resume: bool = typer.Option(False, "--resume", help="continue the experiment in --out, skipping finished cells"),
    backend: str = typer.Option(None, "--backend", help=BACKEND_HELP + "; overrides the spec's backend:"),
    int8: bool = typer.Option(None, "--int8", help=INT8_HELP),
    executor: str = typer.Option("local", "--executor", help="where the cells run: local (one after another here) or "
                                 "ray (each cell a Ray task; the spec's `resources` sets its CPUs/GPUs)"),
    address: str = typer.Option(None, "--address", help="the Ray cluster to join (with --executor ray); default: "
                                "start a local one"),
    estimate: bool = typer.Option(None, "--estimate/--no-estimate", show_default=False,
                                  help="at the start, time the run's parts at small sizes on this machine and say how "
                                  "long the whole run will take, refined after each cell (default: on, but off with "
                                  "--quick, whose run is too short for its minute of calibration)"),
    fmt: Format = typer.Option(Format.TABLE, "--format", help=FORMAT_HELP + "; with markdown, csv or json the "
                               "progress lines go to stderr and stdout holds only the summary"),
) -> None:
    """Does DPO improve or harm the model? Train every (context, method, seed) cell, evaluate, compare, report."""
    import time

    from dpolab.experiment.runner import run_experiment
    from dpolab.experiment.spec import load_spec

    if resume and out is None:
        raise typer.BadParameter("--resume needs --out DIR", param_hint="--resume")
    if estimate is None:
        estimate = not quick
    overrides = {k: v for k, v in {"backend": backend, "int8": int8}.items() if v is not None}
    loaded = load_spec(spec, quick=quick, preset=preset, overrides=overrides)
    out = out or f"runs/experiment-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        report = run_experiment(loaded, out, resume=resume, quick=quick, executor=executor, address=address,
                                estimate=estimate, log=None if fmt == Format.TABLE else sys.stderr)
    except KeyboardInterrupt:
        again = "".join([" --quick" if quick else "", f" --preset {preset}" if preset else "",
                         f" --backend {backend}" if backend else "", " --int8" if int8 else "",
                         f" --executor {executor}" if executor != "local" else "",
                         f" --address {address}" if address else "",
                         "" if estimate == (not quick) else " --estimate" if estimate else " --no-estimate",
                         f" --format {fmt.value}" if fmt != Format.TABLE else ""])
        typer.secho(f"interrupted; finished cells are kept. Continue with: dpolab run {spec or ''} --out {out} --resume"
                    + again, fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    from dpolab.experiment.summary import print_summary

    print_summary(report.rows, fmt=fmt)  # `dpolab show OUT` prints it again, in any --format


def _behaviour_help() -> str:
    from dpolab.explain.behaviours import BEHAVIOURS

    return f"behaviour to take apart: {', '.join(BEHAVIOURS.names())}"


@app.command()
def explain(
    base: str = typer.Option(DEFAULT_MODEL, "--base", help="the model before training: built-in name or Hugging Face folder"),
    tuned: str = typer.Option(..., "--tuned", help="the trained model: a Hugging Face folder, or a run's cell folder"),
    probe: str = typer.Option("toxicity", "--probe", help=_behaviour_help()),
    out: str = typer.Option(..., "--out", help="folder for explain.json and the Parquet tables; rerun to resume"),
    n_random: int = typer.Option(200, "--n-random", min=2, help="random unit directions in each null"),
    top_k: int = typer.Option(60, "--top-k", min=1, help="neurons ablated or patched, and random ones beside them"),
    patch: str = typer.Option("TP,any", "--patch", help="neurons patched: a group's top-k movers (TP, TN, AP, AN) or any group's"),
    size: list[str] = typer.Option([], "--size", help="the behaviour probe's options: --size n_prompts=100"),
    seed: int = typer.Option(0, "--seed", help="seeds sampling, folds, nulls and bootstrap"),
) -> None:
    """Why training moved a behaviour: a linear probe, each MLP neuron's part of the change along it, ablation and
    patching, every figure beside random directions or random neurons."""
    from dpolab.config import parse_value
    from dpolab.explain.run import ExplainOptions, explain as run_explain
    from dpolab.explain.summary import format_explain

    sizes = {}
    for item in size:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--size expects KEY=VALUE, got {item!r}")
        sizes[key.strip()] = parse_value(value)
    options = ExplainOptions(n_random=n_random, top_k=top_k, patch=tuple(p.strip() for p in patch.split(",") if p.strip()),
                             sizes=sizes, seed=seed)
    result = run_explain(base, tuned, probe, out, options=options, say=lambda line: typer.echo(line, err=True))
    for line in format_explain(result):
        typer.echo(line)
    typer.echo(f"wrote {out}/explain.json")


@app.command()
def compare(
    dir_a: str = typer.Argument(..., help="an experiment folder (with results.parquet)"),
    dir_b: str = typer.Argument(..., help="another experiment folder"),
    all_rows: bool = typer.Option(False, "--all", help="show every metric, not only those whose verdict or value differs"),
    fmt: Format = typer.Option(Format.TABLE, "--format", help=FORMAT_HELP),
) -> None:
    """Show what differs between two experiment runs: verdicts, values and metrics present in only one."""
    from dpolab.experiment.summary import compare_runs

    compare_runs(dir_a, dir_b, show_all=all_rows, fmt=fmt)


@app.command()
def contrast(
    run_dir: str = typer.Argument(..., help="an experiment folder, finished or still running (its finished cells)"),
    a: str = typer.Argument(..., help="a method of the run as CONTEXT/METHOD, e.g. detox/curry"),
    b: str = typer.Argument(..., help="the method to set it against, e.g. detox/curry-single"),
    all_rows: bool = typer.Option(False, "--all", help="every metric, not only the matrix's behaviours"),
    fmt: Format = typer.Option(Format.TABLE, "--format", help=FORMAT_HELP),
    n_boot: int = typer.Option(None, "--n-boot", min=100, help="bootstrap resamples (default: the run's)"),
) -> None:
    """A against B in one run: the paired change over the same test items, matched by training seed, with 95% CIs
    and q-values (is Curry-DPO better than single-pair DPO, not just each better than the baseline?)."""
    from dpolab.experiment.contrast import contrast as run_contrast, print_contrast

    print_contrast(run_contrast(run_dir, a, b, n_boot=n_boot), fmt=fmt, show_all=all_rows)


@app.command()
def show(
    run_dir: str = typer.Argument(..., help="a finished experiment folder (with results.parquet)"),
    fmt: Format = typer.Option(Format.TABLE, "--format", help=FORMAT_HELP),
) -> None:
    """Print a finished run's summary again, as `dpolab run` printed it at its end: what moved against the
    baseline and the placebo, in sentences, and which seed findings reproduced."""
    from dpolab.experiment.results import read_run
    from dpolab.experiment.summary import print_summary

    print_summary(read_run(run_dir), fmt=fmt)


@app.command()
def report(
    run: str = typer.Argument(..., help="a finished run folder (what `dpolab run` wrote)"),
) -> None:
    """Rebuild RUN/report.html from the run's files with this version's report: after an upgrade, no rerun."""
    from dpolab.report.write import rebuild_report

    typer.echo(f"wrote {rebuild_report(run)}")


def _probe_help() -> str:
    from dpolab.probes import PROBES

    return f"comma-separated probes: {', '.join(PROBES.names())}"


def _eval_help() -> str:
    """The eval command's description, with the default and the on-request probes as their specs declare them."""
    from dpolab.probes import PROBES, default_probes

    on = default_probes()
    rest = [n for n in PROBES.names() if n not in on]
    return (f"Measure a model's behaviours with CIs: by default {', '.join(on)}"
            + (f"; on request (--probes) {', '.join(rest)}." if rest else "."))


@app.command("eval", help=_eval_help())
def eval_(
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="built-in name, Hugging Face folder, or hub id"),
    out: str = typer.Option(..., "--out", help="folder for summary.json and the per-probe Parquet files"),
    probes: str | None = typer.Option(None, "--probes", help=_probe_help() + " (default: those marked default)"),
    items: str | None = typer.Option(None, "--items", help="MCQ items JSONL (id, domain, category, question, options, answer[, target, source]) instead of the shipped test split; all its items are used"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="at most N items, prompts or instructions per probe"),
    stance: str = typer.Option("auto", "--stance", help=f"how MCQ answers are read: {', '.join(STANCE_CHOICES)} (auto: calibrated)"),
    seed: int = typer.Option(0, "--seed", help="seeds sampling, item selection and bootstrap"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="conversations per generate call"),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    int8: bool = typer.Option(False, "--int8", help=INT8_HELP),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: torch's choice)"),
    set_: list[str] = typer.Option([], "--set", help="probe option: --set persuasion.turns=2 --set toxicity.k=4"),
    all_metrics: bool = typer.Option(False, "--all-metrics", help="print the by-technique/domain/category breakdowns too"),
    inspect_log: str | None = typer.Option(None, "--inspect-log", help="also write the eval as Inspect logs (one .eval per probe) into this folder; open with `inspect view --log-dir DIR`"),
) -> None:
    from rich.console import Console

    from dpolab.config import parse_value
    from dpolab.probes import run_eval
    from dpolab.probes.run import beside_table, summary_table
    from dpolab.progress import progress_display

    if inspect_log is not None:  # a missing inspect_ai fails now, not after the eval
        from dpolab.probes.inspect_log import require_inspect

        require_inspect()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    sizes: dict[str, dict] = {}
    for item in set_:
        key, sep, value = item.partition("=")
        probe, dot, option = key.partition(".")
        if not sep or not dot:
            raise typer.BadParameter(f"expected PROBE.OPTION=VALUE, got {item!r}", param_hint="--set")
        sizes.setdefault(probe.strip(), {})[option.strip()] = parse_value(value)
    console = Console(stderr=True)
    with progress_display(console) as bars:  # bars on a terminal, plain lines in a log
        summary = run_eval(model, probes=probes, items=items, limit=limit, out=out, seed=seed, sizes=sizes,
                           stance=stance, batch_size=batch_size, backend=backend, int8=int8, progress=bars)
    table_console = Console(width=None if sys.stdout.isatty() else 120)
    table_console.print(summary_table(summary, headline_only=not all_metrics))
    found = summary.probe("self_report")
    if found is not None and found.beside:
        table_console.print(beside_table(summary))
    typer.echo(f"wrote {out}/summary.json and per-probe Parquet files ({summary.wall_time_s['total']:.0f} s)")
    if inspect_log is not None:
        inspect_log_cmd(out, out=inspect_log)


@app.command("inspect-log")
def inspect_log_cmd(
    eval_dir: str = typer.Argument(..., help="a finished eval folder (summary.json and the per-probe Parquet files)"),
    out: str = typer.Option(..., "--out", help="folder for the Inspect logs, one .eval per probe"),
) -> None:
    """Write a finished eval folder as Inspect logs, without rerunning it: one sample per item with its transcript,
    scores and metadata; open them with `inspect view --log-dir DIR`."""
    from dpolab.probes.inspect_log import write_inspect_log

    paths = write_inspect_log(eval_dir, out)
    typer.echo(f"wrote {len(paths)} Inspect logs to {out} (open with: inspect view --log-dir {out})")


@bench_app.command("eval")
def bench_eval_cmd(
    backend: str = typer.Option("ctranslate2", "--backend", help="the backend set against hf: "
                                + ", ".join(b for b in BACKEND_CHOICES if b not in ("auto", "hf"))),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="built-in name or local Hugging Face folder"),
    probes: str | None = typer.Option(None, "--probes", help=_probe_help() + " (default: the default eval)"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="at most N items, prompts or instructions per probe"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="conversations per generate call, both backends"),
    int8: bool = typer.Option(False, "--int8", help=INT8_HELP),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: torch's choice)"),
    json_path: str | None = typer.Option(None, "--json", help="also write the result as JSON to this file"),
) -> None:
    """The default eval on hf and on another backend in one run: time per probe, speedup, and how far they agree."""
    from rich.console import Console

    from dpolab.bench.eval import bench_backends, format_table
    from dpolab.io import atomic_write_json
    from dpolab.progress import progress_display

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    with progress_display(Console(stderr=True)) as bars:
        report = bench_backends(model, backend=backend, probes=probes, limit=limit, batch_size=batch_size, seed=seed,
                                int8=int8, progress=bars, echo=lambda line: typer.echo(line, err=True))
    for line in format_table(report):
        typer.echo(line)
    if json_path:
        atomic_write_json(json_path, report)
        typer.echo(f"wrote {json_path}")


@bench_app.command("batching")
def bench_batching_cmd(
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="built-in name or local Hugging Face folder"),
    n_items: int = typer.Option(4, "--items", min=1, help="test items; each runs once per technique"),
    techniques: str | None = typer.Option(None, "--techniques", help="comma-separated appeal techniques (default: all 7)"),
    turns: int = typer.Option(3, "--turns", min=1, help="persuasion turns after turn 0"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="bound on each reply"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="dialogues per generate call in the batched run"),
    stance: str = typer.Option("cloze", "--stance", help=f"stance reader for both runs: {', '.join(READERS.names())}"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, or float64 (exact: no near-tie can make "
                              "the two runs' greedy transcripts differ)"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's choice)"),
    json_path: str | None = typer.Option(None, "--json", help="also write the result as JSON to this file"),
) -> None:
    """The persuasion probe, all dialogues batched, against one dialogue at a time (hf backend): speedup and identity."""
    from rich.console import Console

    from dpolab.io import atomic_write_json
    from dpolab.bench.batching import bench_batching
    from dpolab.banks import TECHNIQUES
    from dpolab.progress import progress_display

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    techs = tuple(t.strip() for t in techniques.split(",") if t.strip()) if techniques else TECHNIQUES
    with progress_display(Console(stderr=True)) as bars:
        result = bench_batching(model, n_items=n_items, techniques=techs, turns=turns, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, reader=stance, dtype=dtype, progress=bars)
    r = result.to_json()
    typer.echo(f"{r['dialogues']} dialogues x {r['turns']} turns, {r['reader']} reader")
    typer.echo(f"  batched (batch {r['batch_size']}): {r['batched_s']:8.1f} s  {r['batched_dialogues_per_s']:.3f} dialogues/s")
    typer.echo(f"  one at a time:      {r['sequential_s']:8.1f} s  {r['sequential_dialogues_per_s']:.3f} dialogues/s")
    typer.echo(f"  speedup {r['speedup']:.2f}x; identical transcripts {r['identical_transcripts']}/{r['dialogues']}, "
               f"identical stances {r['identical_stances']}/{r['dialogues']}")
    if json_path:
        atomic_write_json(json_path, r)
        typer.echo(f"wrote {json_path}")
