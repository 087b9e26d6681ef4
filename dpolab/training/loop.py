"""The training loop, the only one: preference pairs in; a trained model, metrics.jsonl and checkpoints out."""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from dpolab.config import TrainConfig, dump_config, load_config
from dpolab.errors import ConfigError, TrainingError
from dpolab.io import atomic_dir, atomic_write_text
from dpolab.progress import quiet_library_bars
from dpolab.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dpolab.training.logps import PairBatch, PairForward, collate_pairs, stack_batches
from dpolab.models.load import weights_fingerprint
from dpolab.training.reference import Reference, ReferenceCache, cache_key, compute_dataset_logps

if TYPE_CHECKING:
    from dpolab.tracking import CellTracking

METRIC_KEYS = ("step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_s", "pairs_per_s")


@dataclass
class TrainResult:
    out: Path
    steps: int
    metrics: list[dict] = field(default_factory=list)  # one per optimizer step run in this call
    model: torch.nn.Module | None = None  # the trained policy (merged under LoRA)
    resumed_from: int | None = None
    reference_reused: bool | None = None
    n_pairs: int = 0
    n_prompt_truncated: int = 0
    n_skipped: int = 0


def resolve_config(config: TrainConfig | dict | str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from an object, a dict or a YAML path, with keyword overrides on top."""
    if isinstance(config, TrainConfig):
        # only what was set: a default filled in for one loss (its β) must not carry over to another
        return load_config(TrainConfig, None, {**config.model_dump(exclude_unset=True), **overrides})
    if isinstance(config, dict):
        return load_config(TrainConfig, None, {**config, **overrides})
    return load_config(TrainConfig, config, overrides)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at scheduler step s: linear warmup, then linear/cosine/constant."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


class DataOrder:
    """Which pair goes where: an endless stream of per-epoch permutations, cut into global batches.

    Batch s is stream positions [s*B, (s+1)*B), so a resumed run sees exactly the pairs it would have
    seen, and no pair is dropped at an epoch boundary.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int, shuffle: bool):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [self._perm(k // self.n)[k % self.n] for k in range(start, start + self.batch_size)]


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def _progress(enabled: bool):
    """The trainer's bars (reference log-probs, training steps): rich on a terminal; in a log, plain lines, one when
    the phase ends and at most one every 30 s while it runs, not a redrawn bar or a line per step."""
    from dpolab.progress import PlainProgress, interactive

    if enabled and not interactive():
        return PlainProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not enabled, transient=False)


def _save_final(out: Path, policy, tokenizer, *, lora: bool) -> torch.nn.Module:
    """OUT/model loads with AutoModelForCausalLM.from_pretrained; under LoRA it holds merged weights, OUT/adapter the adapter."""
    with quiet_library_bars():
        if lora:
            with atomic_dir(out / "adapter") as tmp:
                policy.save_pretrained(tmp)
            policy = policy.merge_and_unload()
        with atomic_dir(out / "model") as tmp:
            policy.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return policy


def _rewrite_metrics(path: Path, upto: int) -> None:
    """Keep only the metric lines of steps a resumed run will not redo."""
    if path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= upto]
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def micro_batches(pairs, indices: list[int], *, max_pairs: int, max_tokens: int | None) -> list[list[int]]:
    """Split one process's share of a batch into forwards: sorted by length (less padding), at most max_pairs
    pairs and max_tokens padded tokens (B x longest prompt + 2B x longest completion) each, one pair at least.
    The gradient is the same however the batch is split; only memory and padding change."""
    chunks: list[list[int]] = []
    prompt_max = completion_max = 0
    for i in sorted(indices, key=lambda i: (len(pairs[i].prompt_ids), i)):
        p = len(pairs[i].prompt_ids)
        c = max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids))
        if chunks and len(chunks[-1]) < max_pairs:
            grown = (len(chunks[-1]) + 1) * (max(prompt_max, p) + 2 * max(completion_max, c))
            if max_tokens is None or grown <= max_tokens:
                chunks[-1].append(i)
                prompt_max, completion_max = max(prompt_max, p), max(completion_max, c)
                continue
        chunks.append([i])
        prompt_max, completion_max = p, c
    return chunks


def batch_loss(forward, reference: Reference, batch: PairBatch, *, policy, loss: str | list[str], sft_weight: float = 0.0,
               loss_kwargs: dict | None = None, consistency_weight: float = 0.0):
    """Policy log-probs (b, 2) [chosen, rejected] and the per-pair LossOutput of one micro-batch.

    loss: a loss name, or a list of them; loss_kwargs as loss_arguments(cfg) builds them (for a list, the weights
    and one mapping of options per loss name).

    consistency_weight: λ of the counterfactual-consistency term (dpolab.losses.consistency), added to the loss of
    each pair that has a nullified prompt; its log-probs come from the same forward pass as the real ones."""
    from dpolab.losses import SequenceLogps, compute_loss
    from dpolab.losses.consistency import counterfactual_consistency

    counter = consistency_weight > 0 and batch.nullified is not None
    both = forward(stack_batches(batch, batch.nullified) if counter else batch)  # (2b,) or (2b + 2b',)
    logps = both[: 2 * len(batch)].view(-1, 2)  # (b, 2)
    ref = reference(batch, policy=policy)
    ref = None if ref is None else ref.view(-1, 2)  # (b, 2)
    lens = batch.completion_lens.view(-1, 2).to(logps.dtype)  # (b, 2)
    lp = SequenceLogps(chosen=logps[:, 0], rejected=logps[:, 1], chosen_tokens=lens[:, 0], rejected_tokens=lens[:, 1],
                       ref_chosen=None if ref is None else ref[:, 0], ref_rejected=None if ref is None else ref[:, 1],
                       score_chosen=batch.score_chosen, score_rejected=batch.score_rejected)
    out = compute_loss(loss, lp, sft_weight=sft_weight, **(loss_kwargs or {}))
    if counter:
        rows = batch.nullified_rows.to(logps.device)
        kl = counterfactual_consistency(logps[rows], both[2 * len(batch):].view(-1, 2))  # (b',)
        out.losses = out.losses.index_add(0, rows, consistency_weight * kl.to(out.losses.dtype))
    return logps, out


def loss_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """The options passed to the loss: only those it declares (beta lives at the top of the config because most
    losses take it; a loss without one is never handed one). For a list of losses: {"weights": [...], name:
    {beta if it declares one, **loss_args[name]}, ...}, as dpolab.losses.compute_loss takes them."""
    from dpolab.losses import loss_options

    if isinstance(cfg.loss, list):
        per_loss = {}
        for name in cfg.loss:
            top = {"beta": cfg.beta} if "beta" in loss_options(name) and cfg.beta is not None else {}
            per_loss[name] = {**top, **cfg.loss_args.get(name, {})}
        return {"weights": cfg.loss_weights, **per_loss}
    declared = loss_options(cfg.loss)
    top = {"beta": cfg.beta} if "beta" in declared and cfg.beta is not None else {}
    return {**top, **cfg.loss_args}


_FUSED_ADAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class StepRecord:
    """Per-pair values of one optimizer step (this process's pairs, or all processes' after `gathered`), detached."""

    losses: torch.Tensor  # (b,)
    chosen_rewards: torch.Tensor  # (b,)
    rejected_rewards: torch.Tensor  # (b,)
    chosen_logps: torch.Tensor  # (b,)
    rejected_logps: torch.Tensor  # (b,)
    weights: torch.Tensor  # (b,)
    index: torch.Tensor  # (b,) positions of the pairs in the dataset

    @classmethod
    def of(cls, logps: torch.Tensor, out, batch: PairBatch) -> StepRecord:
        """One micro-batch's values: logps (b, 2) [chosen, rejected] and its LossOutput. float64 keeps a float64
        run's precision in the metrics."""
        f = lambda t: t.detach().double()  # noqa: E731
        return cls(f(out.losses), f(out.chosen_rewards), f(out.rejected_rewards), f(logps[:, 0]), f(logps[:, 1]),
                   f(batch.weights), batch.index)

    @classmethod
    def cat(cls, parts: list[StepRecord]) -> StepRecord:
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def gathered(self, accelerator) -> StepRecord:
        """Every process's pairs, on the CPU."""
        return StepRecord(*(accelerator.gather(getattr(self, f.name).to(accelerator.device)).cpu() for f in fields(self)))

    def metrics(self) -> dict[str, float]:
        """The step's means, named as in metrics.jsonl."""
        return {
            "loss": float((self.losses * self.weights).mean()),
            "rewards/chosen": float(self.chosen_rewards.mean()),
            "rewards/rejected": float(self.rejected_rewards.mean()),
            "rewards/margins": float((self.chosen_rewards - self.rejected_rewards).mean()),
            "rewards/accuracies": float((self.chosen_rewards > self.rejected_rewards).float().mean()),
            "logps/chosen": float(self.chosen_logps.mean()),
            "logps/rejected": float(self.rejected_logps.mean()),
        }


@dataclass
class Run:
    """What one training run set up: its config, processes, data, model and where it writes."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    console: Any
    pairset: Any  # dpolab.data.PairSet: the rows as read, for their meta
    data: Any  # dpolab.data.TokenizedData
    settings: Any  # dpolab.data.TokenizationSettings
    tokenizer: Any
    model: torch.nn.Module
    loss_kwargs: dict[str, Any]
    order: DataOrder
    reference_kind: str

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def per_rank(self) -> int:
        return self.cfg.batch_size // self.accelerator.num_processes

    def my_pairs(self, step: int) -> list[int]:
        """This process's share of the global batch of `step`."""
        rank = self.accelerator.process_index
        return self.order.batch(step)[rank * self.per_rank : (rank + 1) * self.per_rank]

    def batches(self, indices: list[int]) -> list[PairBatch]:
        """The pairs at `indices` cut into forwards (see micro_batches), collated and on the device."""
        micro = self.per_rank // self.cfg.grad_accum
        return [collate_pairs([self.data.pairs[i] for i in chunk], pad_id=self.tokenizer.pad_token_id, index=chunk)
                .to(self.accelerator.device)
                for chunk in micro_batches(self.data.pairs, indices, max_pairs=micro, max_tokens=self.cfg.forward_tokens)]


def _resolve_run_config(config, resume, overrides: dict[str, Any]) -> TrainConfig:
    """The config of a new run, or the saved one of a run to resume; refuses to overwrite a finished folder."""
    if resume is not None:
        saved = Path(resume) / "config.yaml"
        if not saved.exists():
            raise ConfigError(f"cannot resume: {saved} does not exist (was {resume} written by dpolab train?)")
        cfg = resolve_config(saved, **{**overrides, "out": str(resume)})
    else:
        cfg = resolve_config(config, **overrides)
    if not cfg.data:
        raise ConfigError("no training data: give --data FILE (or data: in the config)")
    if not cfg.out:
        raise ConfigError("no output folder: give --out DIR (or out: in the config)")
    out = Path(cfg.out)
    if resume is None and (list_checkpoints(out) or (out / "metrics.jsonl").exists()):
        raise ConfigError(f"{out} already holds a run; continue it with --resume {out}, or choose another --out")
    return cfg


def _set_up(cfg: TrainConfig) -> Run:
    """Processes, seed, OUT/config.yaml, the data (read, checked, tokenized) and the model."""
    from accelerate.utils import set_seed
    from rich.console import Console

    from dpolab.data import TokenizationSettings, read_pairs, tokenize_pairs
    from dpolab.losses import needs_reference
    from dpolab.models import load_model, load_tokenizer

    accelerator = _accelerator()
    world, is_main = accelerator.num_processes, accelerator.is_main_process
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum = {world * cfg.grad_accum}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    console = Console(stderr=True, quiet=not is_main)
    out = Path(cfg.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))

    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    pairset = read_pairs(cfg.data, tokenizer=tokenizer, max_length=cfg.max_length, skip_invalid=cfg.skip_invalid,
                         emphasis=cfg.emphasis, counterfactual=cfg.consistency_weight > 0)
    if pairset.n_skipped:
        console.print(f"[yellow]skipped {pairset.n_skipped} invalid row(s) of {pairset.n_rows} in {cfg.data}")
    settings = TokenizationSettings(max_length=cfg.max_length, emphasis=cfg.emphasis,
                                    counterfactual=cfg.consistency_weight > 0)
    data = pairset.tokenized_data() or tokenize_pairs(pairset.pairs, tokenizer, settings)  # tokenized while checked
    if data.n_prompt_truncated:
        console.print(f"truncated the start of {data.n_prompt_truncated} prompt(s) of {len(data.pairs)} to fit max_length {cfg.max_length}")

    loaded = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, device=accelerator.device)
    kind = cfg.reference if needs_reference(cfg.loss) else "none"
    return Run(cfg=cfg, out=out, accelerator=accelerator, console=console, pairset=pairset, data=data, settings=settings,
               tokenizer=tokenizer,
               model=loaded.model.eval(),  # dropout off in policy and reference alike, as the reference log-probs assume
               loss_kwargs=loss_arguments(cfg),
               order=DataOrder(len(data.pairs), batch_size=cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle),
               reference_kind="cached" if kind == "auto" else kind)


def _reference(run: Run) -> tuple[Reference, bool | None]:
    """The reference log-probs: cached on disk (computed once with the starting weights, or cfg.reference_model's),
    a frozen copy (of either), the adapter-disabled policy, or none. Returns it and whether the cache was reused."""
    from dpolab.models import dpolab_home

    cfg, n = run.cfg, len(run.data.pairs)
    ref_model = run.model if cfg.reference_model is None or run.reference_kind not in ("cached", "frozen") \
        else _reference_model(run)
    if run.reference_kind == "cached":
        # keyed by the weights that compute it: a reference_model's, else the starting model's
        key = cache_key(model_fp=weights_fingerprint(ref_model), data_fp=run.data.fingerprint, settings=run.settings.key())
        cache = ReferenceCache(dpolab_home() / "reference-logps")
        with _progress(cfg.progress and run.is_main) as bar:
            task = bar.add_task("reference log-probs", total=n, info="")
            table, reused = cache.get_or_compute(
                key,
                lambda: compute_dataset_logps(ref_model, run.batches(list(range(n))), mode=cfg.forward,
                                              chunk_tokens=cfg.chunk_tokens, n=n, on_batch=lambda k: bar.advance(task, k)),
                meta={"model": cfg.reference_model or cfg.model, "data": cfg.data, "pairs": n},
            )
        if reused:
            run.console.print("reference log-probs: reused from the cache")
        return Reference("cached", table=table), reused
    if run.reference_kind == "frozen":
        if ref_model is not run.model:  # already a copy of its own
            return Reference("frozen", model=ref_model, mode=cfg.forward, chunk_tokens=cfg.chunk_tokens), None
        return Reference.frozen_copy(run.model, mode=cfg.forward, chunk_tokens=cfg.chunk_tokens), None
    return Reference(run.reference_kind, mode=cfg.forward, chunk_tokens=cfg.chunk_tokens), None


def _reference_model(run: Run) -> torch.nn.Module:
    """cfg.reference_model loaded frozen beside the policy (same dtype and device); its vocabulary must be the
    policy's, since the pairs are tokenized once with the policy's tokenizer."""
    from dpolab.models import load_model

    cfg = run.cfg
    ref = load_model(cfg.reference_model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                     device=run.accelerator.device).model.eval()
    ref.requires_grad_(False)
    if ref.get_input_embeddings().num_embeddings != run.model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"reference_model {cfg.reference_model!r} has another vocabulary than {cfg.model!r}")
    return ref


def optimizer_steps(cfg: TrainConfig, n_pairs: int) -> int:
    """The optimizer steps a training of n_pairs takes: max_steps, else epochs x pairs / batch_size (at least one)."""
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * n_pairs / cfg.batch_size))


def _optimizer(run: Run, model: torch.nn.Module):
    """AdamW over the trainable parameters and the learning-rate schedule; returns (params, optimizer, scheduler,
    total_steps)."""
    cfg = run.cfg
    params = [p for p in model.parameters() if p.requires_grad]
    # On CPU the fused kernel makes one pass over weights and states instead of one per operation: 0.08 s instead
    # of 0.22 s per step for SmolLM2-135M here, same update. Elsewhere torch's own default stands.
    cpu = run.accelerator.device.type == "cpu"
    fused = True if cpu and all(p.dtype in _FUSED_ADAM_DTYPES for p in params) else None
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, fused=fused)
    total_steps = optimizer_steps(cfg, len(run.data.pairs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, total_steps))
    return params, optimizer, scheduler, total_steps


def _step(run: Run, step: int, forward, reference: Reference, model, params, optimizer, scheduler) -> tuple[StepRecord, float, int]:
    """One optimizer step over this process's share of the batch: forwards and backwards per micro-batch (the
    gradient synchronised on the last), clipping, the update. Returns the step's record, the gradient norm and the
    tokens this process ran."""
    accelerator, cfg = run.accelerator, run.cfg
    parts: list[StepRecord] = []
    n_tokens = 0
    batches = run.batches(run.my_pairs(step))
    for m, batch in enumerate(batches):
        sync = contextlib.nullcontext() if m == len(batches) - 1 else accelerator.no_sync(forward)
        with sync:
            logps, res = batch_loss(forward, reference, batch, policy=model, loss=cfg.loss, sft_weight=cfg.sft_weight,
                                    loss_kwargs=run.loss_kwargs, consistency_weight=cfg.consistency_weight)
            bad = ~torch.isfinite(res.losses)
            if bad.any():
                ids = [batch.ids[i] for i in bad.nonzero().flatten().tolist()]
                raise TrainingError(f"non-finite loss at step {step + 1} for pair(s) {', '.join(ids)}; "
                                    f"lower the learning rate or check these pairs")
            accelerator.backward((res.losses * batch.weights).sum() / run.per_rank)
        n_tokens += batch.n_tokens
        parts.append(StepRecord.of(logps, res, batch))
    if cfg.max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    if not torch.isfinite(torch.as_tensor(grad_norm)):
        ids = [run.data.pairs[i].id for i in run.order.batch(step)]
        raise TrainingError(f"non-finite gradient norm at step {step + 1}; pairs in the batch: {', '.join(ids)}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepRecord.cat(parts), float(grad_norm), n_tokens


def _log_step(run: Run, files, step: int, record: StepRecord, metrics: dict[str, Any]) -> None:
    """One line in metrics.jsonl, and one per pair in pairs.jsonl (main process only)."""
    metrics_file, pairs_file = files
    metrics_file.write(json.dumps(metrics) + "\n")
    metrics_file.flush()
    for j, i in enumerate(record.index.tolist()):
        p, src = run.data.pairs[i], run.pairset.pairs[i]
        pairs_file.write(json.dumps({"step": step, "id": p.id, "loss": float(record.losses[j]),
                                     "reward_chosen": float(record.chosen_rewards[j]),
                                     "reward_rejected": float(record.rejected_rewards[j]), "weight": p.weight,
                                     "score_chosen": p.score_chosen, "score_rejected": p.score_rejected,
                                     "meta": src.meta}) + "\n")
    pairs_file.flush()


def train(config: TrainConfig | dict | str | Path | None = None, /, *, resume: str | Path | None = None,
          on_step: Callable[[int, dict], None] | None = None, tracking: CellTracking | None = None,
          **overrides: Any) -> TrainResult:
    """Train a DPO-family method. Python twin of `dpolab train`.

    config: a TrainConfig, a dict, or a YAML path; overrides are config keys (model=..., data=..., loss=...).
    resume: an OUT folder of an earlier run; continues from its newest checkpoint with its saved config.
    on_step: called as on_step(step, metrics) after every optimizer step, on every process.
    tracking: a run of dpolab.tracking (an experiment's cell) that takes each step's metrics, as metrics.jsonl has
        them; the caller ends it. Unset, a config with report_to opens a run of its own (main process only), ended
        with the training: FINISHED, or FAILED / KILLED when it stops.
    """
    cfg = _resolve_run_config(config, resume, overrides)
    with _tracking(cfg, resume=resume is not None, given=tracking) as tracking:
        result = _train(cfg, resume=resume, on_step=on_step, tracking=tracking)
        if tracking is not None and cfg.save_model and _is_main_process():
            tracking.set_tags({"dpolab.model": str(Path(cfg.out).resolve() / "model")})
    return result


def _is_main_process() -> bool:
    """Before accelerate is set up: the launcher's RANK (accelerate launch, torchrun), 0 when run alone."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _tracking(cfg: TrainConfig, *, resume: bool, given: CellTracking | None):
    """The run that takes the metrics: the one given (not ended here), the training's own when report_to asks for
    one (a context manager that ends it), or none."""
    if given is not None or not cfg.report_to or not _is_main_process():
        return contextlib.nullcontext(given)
    from dpolab.tracking import open_training

    return open_training(cfg.report_to, cfg.out, params=cfg.model_dump(mode="json"), tracking_uri=cfg.tracking_uri,
                         resume=resume)


def _train(cfg: TrainConfig, *, resume: str | Path | None, on_step: Callable[[int, dict], None] | None,
           tracking: CellTracking | None) -> TrainResult:
    """train() once its config is resolved and its tracking open."""
    from dpolab.losses import describe_loss
    from dpolab.models.adapt import count_parameters, prepare_for_training
    from dpolab.runtime import tune_allocator

    tune_allocator()
    run = _set_up(cfg)
    out, accelerator, n = run.out, run.accelerator, len(run.data.pairs)
    reference, reference_reused = _reference(run)

    model = prepare_for_training(run.model, lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets, freeze_layers=cfg.freeze_layers)
    trainable, total_params = count_parameters(model)
    run.console.print(f"{cfg.model}: training {trainable:,} of {total_params:,} parameters; loss {describe_loss(cfg.loss, cfg.loss_weights)}; "
                      f"reference {run.reference_kind}; {n} pairs; {accelerator.num_processes} process(es) on {accelerator.device}")
    params, optimizer, scheduler, total_steps = _optimizer(run, model)

    start = resumed_from = 0
    checkpoints = list_checkpoints(out) if resume is not None else []
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], model=model, optimizer=optimizer, scheduler=scheduler)
        start = resumed_from = state["step"]
        run.console.print(f"resuming {out} from step {start} of {total_steps}")
    if run.is_main:
        _rewrite_metrics(out / "metrics.jsonl", start)
        _rewrite_metrics(out / "pairs.jsonl", start)

    forward, optimizer = accelerator.prepare(PairForward(model, mode=cfg.forward, chunk_tokens=cfg.chunk_tokens), optimizer)
    result = TrainResult(out=out, steps=start, resumed_from=resumed_from if checkpoints else None,
                         reference_reused=reference_reused, n_pairs=n, n_prompt_truncated=run.data.n_prompt_truncated,
                         n_skipped=run.pairset.n_skipped)
    saved_step = start

    def checkpoint(step: int) -> None:
        nonlocal saved_step
        if run.is_main:
            save_checkpoint(out, step, model=model, optimizer=optimizer, scheduler=scheduler,
                            extra={"data_position": step * cfg.batch_size, "total_steps": total_steps}, keep=cfg.keep_checkpoints)
        accelerator.wait_for_everyone()
        saved_step = step

    files = (open(out / "metrics.jsonl", "a", encoding="utf-8"), open(out / "pairs.jsonl", "a", encoding="utf-8")) if run.is_main else None
    try:
        with _progress(cfg.progress and run.is_main) as bar:
            task = bar.add_task("training", total=total_steps, completed=start, info="")
            for step in range(start, total_steps):
                t0 = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                mine, grad_norm, n_tokens = _step(run, step, forward, reference, model, params, optimizer, scheduler)
                record = mine.gathered(accelerator)
                tokens = int(accelerator.reduce(torch.tensor(n_tokens, device=accelerator.device), "sum"))
                dt = time.perf_counter() - t0
                metrics = {"step": step + 1, **record.metrics(), "grad_norm": grad_norm, "lr": lr,
                           "tokens_per_s": tokens / dt, "pairs_per_s": cfg.batch_size / dt,
                           "epoch": (step + 1) * cfg.batch_size / n}
                if run.is_main:
                    _log_step(run, files, step + 1, record, metrics)
                result.metrics.append(metrics)
                result.steps = step + 1
                bar.update(task, advance=1, info=f"loss {metrics['loss']:.4f} margin {metrics['rewards/margins']:+.3f}")
                if tracking is not None and run.is_main:
                    tracking.log_step(step + 1, metrics)
                if on_step is not None:
                    on_step(step + 1, metrics)
                if (step + 1) % cfg.save_every == 0 or (step + 1 == total_steps and cfg.final_checkpoint):
                    checkpoint(step + 1)
    except KeyboardInterrupt:
        if result.steps > saved_step:
            checkpoint(result.steps)
        run.console.print(f"[yellow]interrupted after step {result.steps}; continue with: dpolab train --resume {out}")
        raise
    finally:
        for f in files or ():
            f.close()

    _finish(run, result, accelerator.unwrap_model(forward).model)
    return result


def _finish(run: Run, result: TrainResult, policy: torch.nn.Module) -> None:
    """OUT/model (merged under LoRA) and OUT/train_summary.json; the trained policy into the result."""
    if run.cfg.save_model and run.is_main:
        policy = _save_final(run.out, policy, run.tokenizer, lora=run.cfg.lora)
    run.accelerator.wait_for_everyone()
    result.model = policy
    if run.is_main:
        summary = {"steps": result.steps, "pairs": result.n_pairs, "prompts_truncated": result.n_prompt_truncated,
                   "rows_skipped": result.n_skipped, "reference": run.reference_kind,
                   "reference_reused": result.reference_reused, "final": result.metrics[-1] if result.metrics else None}
        atomic_write_text(run.out / "train_summary.json", json.dumps(summary, indent=2))
