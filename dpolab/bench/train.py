"""`dpolab bench train`: dpolab's trainer against TRL's DPOTrainer on the same model, pairs, order, batch and loss.

What is compared. Every system trains the same model (a local safetensors folder, full fine-tuning, fp32) on the
same JSONL file of a workload (dpolab.bench.workloads), in file order (no shuffling), with the same batch size,
number of optimizer steps and objective: sigmoid DPO, beta 0.1, AdamW (betas 0.9/0.999, eps 1e-8, weight decay
0), a constant learning rate with no warm-up, gradient norm clipped at 1.0, dropout off. Systems:

* ``dpolab``: `dpolab.training.loop.train` with its cached reference (one reference pass over the data up front,
  into an empty cache, so it is computed and counted) and the prefix-sharing forward.
* ``dpolab-concat``: the same with forward="concat" (prompt + completion as one sequence), to show what prefix
  sharing buys. Optional.
* ``trl-default``: TRL's DPOTrainer with its defaults (gradient checkpointing on, a reference model copy run at
  every step), except what the comparison must fix: fp32 instead of TRL's default bf16, the learning rate, the
  constant schedule, sequential sampling.
* ``trl-precompute``: gradient checkpointing off and TRL's own ``precompute_ref_log_probs``.

TRL's chat-template tokenization keeps SmolLM2's "\\n" after the final ``<|im_end|>`` as a completion token;
dpolab's cuts it. So that both train on identical token ids, the TRL run gets a copy of the template that writes
nothing after the final assistant turn (prompts render the same either way); the result reports whether TRL's
tokenized prompt/chosen/rejected ids then equal dpolab's for every pair.

Timing. Each system runs in its own fresh Python process with the same torch thread count. The clock starts at
the training call (reading and tokenizing data, loading the policy and reference, the reference pass) and stops
at the end of the last optimizer step; interpreter start-up, imports and the final checkpoint/model save are not
counted, for every system alike. pairs/s = steps x batch size / that time. Peak memory is the process's peak
resident set size (ru_maxrss) at the end. One repetition per system; the result says so.

Model FLOPs. Only the work a pair needs is counted: its prompt once, both responses, the LM head only on
completion positions. For a pair with prompt length P and completion lengths C1, C2, a forward pass is

    F = 2 N (P + C1 + C2)                                   dense matmuls; N = non-embedding parameters
      + 4 L d (P(P+1)/2 + sum_i [C_i P + C_i(C_i+1)/2])     causal attention scores and values; L layers, d = heads x head dim
      + 2 H V (C1 + C2)                                     LM head on completion positions; H hidden size, V vocabulary

and a training pair costs 4F: 3F for the policy's forward and backward, F for the reference pass. Model FLOP/s =
sum of 4F over the pairs trained / dpolab's time, set against the fp32 matmul peak measured in the same run.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from dpolab import DEFAULT_MODEL
from dpolab.errors import ConfigError, DpolabError

SYSTEMS = {
    "dpolab": "dpolab, cached reference, prefix-shared forward",
    "dpolab-lowmem": "dpolab, cached reference, prefix-shared forward, forward_tokens 512 (less memory, a little slower)",
    "dpolab-concat": "dpolab, cached reference, concatenated forward",
    "trl-default": "TRL DPOTrainer defaults (gradient checkpointing on, reference model each step)",
    "trl-precompute": "TRL DPOTrainer, gradient checkpointing off, precompute_ref_log_probs",
}
DEFAULT_SYSTEMS = ("dpolab", "trl-default", "trl-precompute")
RESULT_KEYS = ("dpolab_pairs_per_s", "trl_pairs_per_s", "speedup", "dpolab_peak_rss_mb", "trl_peak_rss_mb",
               "max_step_loss_diff", "dpolab_model_flops_per_s", "matmul_peak_flops_per_s")


class BenchError(DpolabError):
    """A benchmark system failed to run."""


@dataclass
class BenchSettings:
    """One `dpolab bench train` invocation. Defaults are the issue's: 64 pairs, batch 8, 8 steps."""

    model: str = DEFAULT_MODEL
    workloads: tuple[str, ...] = ("persuasion", "short")
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    steps: int = 8
    pairs: int | None = None  # default: steps x batch_size, so every pair is used once
    batch_size: int = 8
    lr: float = 5e-6
    beta: float = 0.1
    threads: int | None = None  # default: torch's choice in this process
    seed: int = 0
    length_tokenizer: str | None = None  # whose tokens the workload's length ranges count; default the model's

    def __post_init__(self):
        from dpolab.bench.workloads import WORKLOADS

        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise ConfigError(f"unknown system(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SYSTEMS)}")
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown or not self.workloads:
            raise ConfigError(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(WORKLOADS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be at least 1")
        if self.pairs is None:
            self.pairs = self.steps * self.batch_size
        if self.pairs < self.batch_size:
            raise ConfigError(f"pairs ({self.pairs}) must be at least batch_size ({self.batch_size})")


# ---------------------------------------------------------------------------------------------------------------------
# model FLOPs


@dataclass(frozen=True)
class ModelShape:
    non_embedding_params: int  # N: every parameter except the input embedding and the LM head matrix
    layers: int  # L
    attention_dim: int  # d = attention heads x head dim (query width)
    hidden: int  # H
    vocab: int  # V


def model_shape(folder: str | Path) -> ModelShape:
    """Shape of a Hugging Face causal-LM folder, read from config.json and the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    total = 0
    seen = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name in seen or "embed_tokens" in name or name.startswith("lm_head") or ".lm_head." in name:
                    continue
                seen.add(name)
                n = 1
                for s in st.get_slice(name).get_shape():
                    n *= s
                total += n
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return ModelShape(non_embedding_params=total, layers=cfg["num_hidden_layers"], attention_dim=heads * head_dim,
                      hidden=cfg["hidden_size"], vocab=cfg["vocab_size"])


def pair_forward_flops(shape: ModelShape, prompt: int, chosen: int, rejected: int) -> float:
    """FLOPs of one forward pass over a pair, prompt counted once (formula in the module docstring)."""
    dense = 2 * shape.non_embedding_params * (prompt + chosen + rejected)
    attended = prompt * (prompt + 1) / 2 + sum(c * prompt + c * (c + 1) / 2 for c in (chosen, rejected))  # query-key pairs
    attention = 4 * shape.layers * shape.attention_dim * attended
    head = 2 * shape.hidden * shape.vocab * (chosen + rejected)
    return dense + attention + head


def pair_train_flops(shape: ModelShape, prompt: int, chosen: int, rejected: int) -> float:
    """One training pair: the policy's forward + backward (3F) and the reference forward (F)."""
    return 4 * pair_forward_flops(shape, prompt, chosen, rejected)


# ---------------------------------------------------------------------------------------------------------------------
# one system, in its own process


@dataclass
class SystemRun:
    system: str
    time_s: float  # training call -> end of the last optimizer step
    setup_s: float  # training call -> start of the first optimizer step (data, model load, reference pass)
    steps: int
    pairs_per_s: float
    peak_rss_mb: float
    losses: list[float]  # per optimizer step
    tokenization_mismatches: int | None = None  # TRL only: pairs whose token ids differ from dpolab's
    notes: list[str] = field(default_factory=list)


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)


def _run_dpolab(spec: dict) -> dict:
    from dpolab.config import TrainConfig
    from dpolab.training.loop import train

    marks: list[float] = []
    t0 = time.perf_counter()
    result = train(model=spec["model"], data=spec["data"], out=spec["out"], loss="dpo", beta=spec["beta"], lr=spec["lr"],
                   batch_size=spec["batch_size"], max_steps=spec["steps"], reference="auto",
                   forward="concat" if spec["system"] == "dpolab-concat" else "prefix", threads=spec["threads"],
                   forward_tokens=512 if spec["system"] == "dpolab-lowmem" else TrainConfig().forward_tokens,
                   shuffle=False, schedule="constant", warmup_steps=0, weight_decay=0.0, adam_betas=(0.9, 0.999),
                   max_grad_norm=1.0, seed=spec["seed"], max_length=8192, save_model=False, save_every=10**9,
                   progress=False, on_step=lambda step, m: marks.append(time.perf_counter()))
    losses = [m["loss"] for m in result.metrics]
    first_step = result.metrics[0]["pairs_per_s"] if result.metrics else None
    setup = (marks[0] - t0 - spec["batch_size"] / first_step) if first_step else None
    return {"time_s": marks[-1] - t0, "setup_s": setup, "losses": losses}


def final_turn_without_newline(template: str) -> str:
    """A ChatML template that writes nothing after the final assistant message's end-of-turn token.

    dpolab ends a completion at `<|im_end|>`; TRL keeps whatever the template writes after it (SmolLM2: "\\n").
    Only the text after the very last assistant message changes, so rendered prompts stay identical.
    """
    old = "'<|im_end|>' + '\n'"
    if old not in template:
        return template
    return template.replace(old, "'<|im_end|>' + ('' if loop.last and message['role'] == 'assistant' else '\n')")


def _run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.chat_template = final_turn_without_newline(tokenizer.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    precompute = spec["system"] == "trl-precompute"

    losses: list[float] = []
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks.setdefault("first_step", time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks["last_step"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    t0 = time.perf_counter()
    config = DPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["lr"], beta=spec["beta"], loss_type=["sigmoid"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=1.0, bf16=False, use_cpu=True,
        model_init_kwargs={"dtype": torch.float32}, max_length=None, train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"],
        data_seed=spec["seed"], gradient_checkpointing=not precompute, precompute_ref_log_probs=precompute,
    )
    trainer = DPOTrainer(model=spec["model"], args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    out = {"time_s": marks["last_step"] - t0, "setup_s": marks["first_step"] - t0, "losses": losses}

    # Same token ids as dpolab? Checked after the clock stopped.
    from dpolab.data import TokenizationSettings, read_pairs, tokenize_pairs
    from dpolab.models import load_tokenizer

    mine = tokenize_pairs(read_pairs(spec["data"]).pairs, load_tokenizer(spec["model"]), TokenizationSettings(max_length=None))
    theirs = trainer.train_dataset
    out["tokenization_mismatches"] = sum(
        (p.prompt_ids, p.chosen_ids, p.rejected_ids) != (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
        for p, t in zip(mine.pairs, theirs)
    ) + abs(len(mine.pairs) - len(theirs))
    return out


def child_main(spec_path: str) -> None:
    """Entry point of a system's process: run it, write a SystemRun as JSON to spec['result']."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    run = _run_trl(spec) if spec["system"].startswith("trl") else _run_dpolab(spec)
    result = SystemRun(system=spec["system"], time_s=run["time_s"], setup_s=run["setup_s"], steps=len(run["losses"]),
                       pairs_per_s=spec["steps"] * spec["batch_size"] / run["time_s"], peak_rss_mb=_peak_rss_mb(),
                       losses=run["losses"], tokenization_mismatches=run.get("tokenization_mismatches"),
                       notes=[f"torch threads {torch.get_num_threads()}"])
    Path(spec["result"]).write_text(json.dumps(asdict(result)), encoding="utf-8")


def run_system(system: str, *, model_dir: str, data: Path, workdir: Path, settings: BenchSettings) -> SystemRun:
    """Run one system in a fresh process (its own peak RSS, empty caches) and read back its SystemRun."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {"system": system, "model": model_dir, "data": str(data), "out": str(workdir / "out"), "result": str(workdir / "result.json"),
            "steps": settings.steps, "batch_size": settings.batch_size, "lr": settings.lr, "beta": settings.beta,
            "threads": settings.threads, "seed": settings.seed}
    (workdir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "DPOLAB_HOME": str(workdir / "home"), "HF_DATASETS_CACHE": str(workdir / "datasets"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = workdir / "log.txt"
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run([sys.executable, "-m", "dpolab.bench.train", str(workdir / "spec.json")], env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not (workdir / "result.json").exists():
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise BenchError(f"{system} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return SystemRun(**json.loads((workdir / "result.json").read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------------------------------------------------
# the whole benchmark


def _resolve_model(name: str) -> str:
    from dpolab.models.load import resolve_model

    path = resolve_model(name)
    if not Path(path).is_dir():
        raise ConfigError(f"bench train needs a local model folder or a built-in name, got {name!r}")
    return path


def summarize(runs: dict[str, SystemRun], *, flops: float, matmul_peak: float) -> dict:
    """The per-workload result: dpolab against the faster TRL configuration (speed) and the leaner one (memory)."""
    ours = runs.get("dpolab")
    trl = {k: v for k, v in runs.items() if k.startswith("trl")}
    fastest = max(trl.values(), key=lambda r: r.pairs_per_s) if trl else None
    leanest = min(trl.values(), key=lambda r: r.peak_rss_mb) if trl else None
    diffs = []
    for r in trl.values():
        if ours and len(r.losses) == len(ours.losses):
            diffs.append(max(abs(a - b) for a, b in zip(ours.losses, r.losses)))
        else:
            diffs.append(float("inf"))  # a missing step is a mismatch, never a silent pass
    out = {
        "dpolab_pairs_per_s": ours.pairs_per_s if ours else None,
        "trl_pairs_per_s": fastest.pairs_per_s if fastest else None,
        "speedup": ours.pairs_per_s / fastest.pairs_per_s if ours and fastest else None,
        "dpolab_peak_rss_mb": ours.peak_rss_mb if ours else None,
        "trl_peak_rss_mb": leanest.peak_rss_mb if leanest else None,
        "max_step_loss_diff": max(diffs) if diffs else None,
        "dpolab_model_flops_per_s": flops / ours.time_s if ours else None,
        "matmul_peak_flops_per_s": matmul_peak,
    }
    out.update({
        "memory_ratio": ours.peak_rss_mb / leanest.peak_rss_mb if ours and leanest else None,
        "model_flops_fraction_of_peak": out["dpolab_model_flops_per_s"] / matmul_peak if ours else None,
        "trl_fastest": fastest.system if fastest else None,
        "trl_leanest": leanest.system if leanest else None,
        "model_flops_per_run": flops,
        "systems": {k: asdict(v) for k, v in runs.items()},
        # dpolab's other configurations (dpolab-lowmem, dpolab-concat) against the same TRL runs
        "variants": {k: {"pairs_per_s": v.pairs_per_s, "peak_rss_mb": v.peak_rss_mb,
                         "speedup": v.pairs_per_s / fastest.pairs_per_s if fastest else None,
                         "memory_ratio": v.peak_rss_mb / leanest.peak_rss_mb if leanest else None}
                     for k, v in runs.items() if k.startswith("dpolab-")},
    })
    return out


def run_bench(settings: BenchSettings, *, keep: str | Path | None = None, echo: Callable[[str], None] = print) -> dict:
    """Run every system on every workload; returns {"hardware", "settings", "workloads"} (see RESULT_KEYS)."""
    import torch

    from dpolab.bench.hardware import describe, matmul_peak_flops
    from dpolab.bench.workloads import write_workload
    from dpolab.data import TokenizationSettings, read_pairs, tokenize_pairs
    from dpolab.models import load_tokenizer

    if any(s.startswith("trl") for s in settings.systems):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise ConfigError("TRL is not installed; install the extra with `pip install 'dpolab[bench]'`, "
                              "or run only dpolab with --systems dpolab") from None
    threads = settings.threads or torch.get_num_threads()
    settings.threads = threads
    model_dir = _resolve_model(settings.model)
    shape = model_shape(model_dir)
    tokenizer = load_tokenizer(model_dir)
    counter = load_tokenizer(settings.length_tokenizer) if settings.length_tokenizer else tokenizer
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="dpolab-bench-"))
    result = {"hardware": describe(threads),
              "settings": {**asdict(settings), "model_dir": model_dir, "repetitions": 1,
                           "timing": "training call (data, model load, reference pass) to end of last optimizer step; "
                                     "one repetition per system, each in a fresh process"},
              "workloads": {}}
    peaks = []
    for name in settings.workloads:
        data = write_workload(name, settings.pairs, counter, root / name / "pairs.jsonl", seed=settings.seed)
        toks = tokenize_pairs(read_pairs(data).pairs, tokenizer, TokenizationSettings(max_length=None)).pairs
        used = [toks[k % len(toks)] for k in range(settings.steps * settings.batch_size)]
        flops = sum(pair_train_flops(shape, len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in used)
        peak = matmul_peak_flops(threads=threads)
        peaks.append(peak)
        echo(f"[{name}] {len(toks)} pairs; prompt tokens mean {statistics.mean(len(p.prompt_ids) for p in toks):.0f}, "
             f"responses mean {statistics.mean(len(p.chosen_ids) + len(p.rejected_ids) for p in toks) / 2:.0f}; "
             f"matmul peak {peak / 1e9:.0f} GFLOP/s")
        runs = {}
        for system in settings.systems:
            echo(f"[{name}] running {system} ...")
            runs[system] = run_system(system, model_dir=model_dir, data=data, workdir=root / name / system, settings=settings)
            r = runs[system]
            echo(f"[{name}] {system}: {r.time_s:.1f} s ({r.setup_s or 0:.1f} s before step 1), {r.pairs_per_s:.3f} pairs/s, "
                 f"peak RSS {r.peak_rss_mb:.0f} MB")
        w = summarize(runs, flops=flops, matmul_peak=peak)
        w["token_lengths"] = {"prompt_mean": statistics.mean(len(p.prompt_ids) for p in toks),
                              "prompt_min": min(len(p.prompt_ids) for p in toks), "prompt_max": max(len(p.prompt_ids) for p in toks),
                              "response_mean": statistics.mean(len(p.chosen_ids) + len(p.rejected_ids) for p in toks) / 2}
        result["workloads"][name] = w
    result["hardware"]["matmul_peak_flops_per_s"] = statistics.median(peaks)
    result["work_dir"] = str(root)
    return result


def format_table(result: dict) -> str:
    """A plain-text table of a run_bench result: one row per system and workload, then the headline ratios."""
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [f"{'workload':<11} {'system':<15} {'time s':>8} {'pairs/s':>8} {'peak RSS MB':>11} {'max |dloss|':>11}"]
    for name, w in result["workloads"].items():
        ours = w["systems"].get("dpolab")
        for system, r in w["systems"].items():
            diff = (max(abs(a - b) for a, b in zip(ours["losses"], r["losses"])) if ours and system != "dpolab"
                    and len(r["losses"]) == len(ours["losses"]) else None)
            lines.append(f"{name:<11} {system:<15} {r['time_s']:>8.1f} {r['pairs_per_s']:>8.3f} {r['peak_rss_mb']:>11.0f} {f(diff, '>11.2e')}")
    lines.append("")
    for name, w in result["workloads"].items():
        lines.append(
            f"{name}: speedup {f(w['speedup'], '.2f')}x vs {w['trl_fastest'] or '-'}; memory {f(w['memory_ratio'], '.2f')}x of "
            f"{w['trl_leanest'] or '-'}; max step-loss diff {f(w['max_step_loss_diff'], '.2e')}; model FLOP/s "
            f"{f(w['dpolab_model_flops_per_s'] and w['dpolab_model_flops_per_s'] / 1e9, '.1f')} G = "
            f"{f(w['model_flops_fraction_of_peak'] and 100 * w['model_flops_fraction_of_peak'], '.1f')}% of the "
            f"{w['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s matmul peak")
        for system, v in w.get("variants", {}).items():
            lines.append(f"{name}: {system}: speedup {f(v['speedup'], '.2f')}x; memory {f(v['memory_ratio'], '.2f')}x")
    lines.append("(one repetition per system; each system in a fresh process)")
    return "\n".join(lines)


if __name__ == "__main__":
    child_main(sys.argv[1])
