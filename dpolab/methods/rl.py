"""Method kind `rl`: critic-free online RL (Lite PPO, GRPO, RLOO): sample G replies per prompt from the current
policy, score them, and take PPO clipped steps on group advantages. The maths is dpolab.methods.rl_objective.

One RL step: P = prompts_per_step prompts, G = group_size replies each, sampled from the current weights
(`sample_replies`: the model's own `generate`, seeded by (seed, step), stopping at the chat template's
end-of-turn token, which is part of the reply the loss sees: stopping is an action too); rewards (P, G); the
advantages of the algorithm (rl_objective.ALGORITHMS, overridable by `advantage_std` and `aggregation`); the
old per-token log-probs (untempered policy, no grad); then `epochs_per_batch` passes over the P·G replies, each
cut into `minibatches` optimizer steps (AdamW, constant learning rate, the train keys' lr, betas, weight decay
and gradient clipping, so the budget reads like a DPO cell's). With `kl_coef` > 0 a frozen copy of the base
model (or of the train key reference_model) is the reference, and the per-token k3 estimate of KL(π ‖ π_ref) on
the sampled tokens (GRPO, Eq. 4) is added to each token's loss. RLOO as its paper runs it (REINFORCE, no
clipping) is `epochs_per_batch: 1` (with one update per step the ratio is exactly 1 and the clip never acts).

Train keys used: lr, adam_betas, weight_decay, max_grad_norm, dtype, trust_remote_code, max_length (prompt +
reply; a long prompt keeps its end), chunk_tokens, threads, reference_model (with kl_coef). batch_size,
max_steps, epochs, schedule, warmup and the loss keys do not apply (the options size the run); lora and
freeze_layers are refused. The kind loads its own copy of the model to train (job.base, the runner's shared
model, is left alone).

Rewards and where the prompts come from:
* `reward: mcq`: the knowledge items of the shipped bank's TRAIN split (dpolab.banks.bank_items("train"); the
  knowledge probe evaluates on the test split, which this never reads), asked one per conversation. The reply is
  read as the stance readers of dpolab.stance read a model:
    - `mcq_format: letter` (default): the question with lettered options and the letter reader's instruction
      (stance.mcq_text); reward 1 when the reply's first character after any blanks and punctuation is the right
      option's letter and no letter follows it (the letter reader reads the reply's first token, so the reward
      reads the same place: "B", "B.", "(B)", "**B**: Paris" count; "The answer is B" does not).
    - `mcq_format: cloze`: the bare question (the cloze reader's prompt); reward 1 when the reply names the right
      option's text and no other option's (case- and space-insensitive whole-phrase match, a longer option's
      mention not counting as the shorter one it contains): the cloze reader scores "The answer is {option}.",
      a reply that states one option.
  The cell's context pairs are not used: a placebo of the context trains the same way.
* `reward: <judge>` (a name in dpolab.judges.JUDGES, e.g. toxicity): the distinct prompts of the cell's context
  pairs (job.config.data), scored by the judge (higher is better); `judge_args` are the judge's options. Only the
  prompts are read, so a placebo that keeps them (shuffled) trains as its context does.
`n_prompts` caps the pool (a seeded spread over categories, or a seeded sample of the pairs' prompts); each step
takes the next P prompts of a seeded per-epoch permutation of the pool.

Resumable: a checkpoint (weights, AdamW state and the per-step log) goes to `job.work`/checkpoints every
`save_every` steps and after the last; a run finds the latest one with the same options and train keys and goes
on from it. Sampling is seeded by the step and minibatch order by (step, epoch), so a resumed run takes the same
steps as an uninterrupted one (tests/test_rl.py checks the final weights are identical). Checkpoints of other
settings are discarded (steps and save_every may change: a longer run goes on from a shorter one's end).

Tuned.info (cell.json under "rl"): the settings, per step the mean reward, reply length, share of replies cut at
max_new_tokens, share of groups with tied rewards (no signal), clip fraction, KL (when on), loss and gradient
norm; and `reward_curve`: the mean reward of the first and last quarter of the steps with bootstrap intervals
over prompt groups (a group's mean reward is the unit) and the interval of their difference.

CPU defaults: 8 prompts × 4 replies of up to 32 tokens, 8 steps, 2 epochs per batch. A GPU configuration (an
rl method is listed under a context like any method; with reward mcq the context's pairs are not read):

    contexts:
      detox: {methods: [dpo, lite-ppo-mcq, grpo-detox]}
    methods:
      dpo: {loss: dpo}
      lite-ppo-mcq:
        kind: rl
        train: {lr: 1.0e-6, dtype: bfloat16, max_grad_norm: 1.0}
        options: {algorithm: lite-ppo, reward: mcq, group_size: 8, prompts_per_step: 32, steps: 200,
                  epochs_per_batch: 2, minibatches: 4, max_new_tokens: 64, micro_batch: 64, save_every: 20}
      grpo-detox:
        kind: rl
        train: {lr: 1.0e-6, dtype: bfloat16}
        options: {algorithm: grpo, reward: toxicity, group_size: 8, prompts_per_step: 32, steps: 200,
                  kl_coef: 0.04, max_new_tokens: 48, micro_batch: 64, save_every: 20}
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from dpolab.errors import ConfigError, TrainingError
from dpolab.methods import CellJob, MethodKind, Tuned, context_prompts
from dpolab.methods.rl_objective import ALGORITHMS, AGGREGATIONS, STD_SCALES, group_advantages, rl_loss
from dpolab.models.chat import ChatFormat, Conversation

MCQ_REWARD = "mcq"
MCQ_FORMATS = ("letter", "cloze")  # dpolab.stance.READERS' names: how an item is asked and its reply read


def reward_names() -> list[str]:
    from dpolab import judges

    return [MCQ_REWARD, *judges.JUDGES.names()]


@dataclass(frozen=True, kw_only=True)
class Options:
    """algorithm: lite-ppo, grpo or rloo (rl_objective.ALGORITHMS: baseline, std scale, aggregation).
    reward: "mcq" (correctness on the knowledge bank's train split) or a judge in dpolab.judges.JUDGES.
    judge_args: the judge's options (dpolab.judges.make_judge), e.g. {base_url: ..., model: ...} for endpoint.
    mcq_format: letter or cloze: how an MCQ item is asked and its reply read (see the module docstring).
    group_size: G replies per prompt (at least 2: the baselines are within the group).
    prompts_per_step: P prompts per RL step. steps: RL steps.
    epochs_per_batch: PPO epochs over each step's replies; minibatches: optimizer steps per epoch.
    clip: PPO's ε. kl_coef: weight of the k3 KL to the base model per token; 0 = off (no reference is loaded).
    aggregation, advantage_std: override the algorithm's (token | sequence; batch | group | none).
    max_new_tokens, temperature: sampling (log-probs are the untempered policy's).
    micro_batch: replies per forward pass (the gradient accumulates; the update is the same).
    n_prompts: cap on the prompt pool (None: all). save_every: checkpoint every N RL steps.
    """

    algorithm: Literal[tuple(ALGORITHMS)] = "lite-ppo"  # type: ignore[valid-type]
    reward: str = MCQ_REWARD
    judge_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    mcq_format: Literal[MCQ_FORMATS] = "letter"  # type: ignore[valid-type]
    group_size: int = 4
    prompts_per_step: int = 8
    steps: int = 8
    epochs_per_batch: int = 2
    minibatches: int = 1
    clip: float = 0.2
    kl_coef: float = 0.0
    aggregation: Literal[AGGREGATIONS] | None = None  # type: ignore[valid-type]
    advantage_std: Literal[STD_SCALES] | None = None  # type: ignore[valid-type]
    max_new_tokens: int = 32
    temperature: float = 1.0
    micro_batch: int = 16
    n_prompts: int | None = None
    save_every: int = 2

    def __post_init__(self) -> None:
        if self.reward not in reward_names():
            raise ConfigError(f"unknown reward {self.reward!r}; choose from {', '.join(reward_names())}")
        if self.reward == MCQ_REWARD and self.judge_args:
            raise ConfigError("judge_args belong to a judge reward; reward mcq takes none")
        if self.reward != MCQ_REWARD:
            from dpolab.judges import check_judge_args

            check_judge_args(self.reward, self.judge_args)
        for name, low in (("group_size", 2), ("prompts_per_step", 1), ("steps", 1), ("epochs_per_batch", 1),
                          ("minibatches", 1), ("max_new_tokens", 1), ("micro_batch", 1), ("save_every", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.n_prompts is not None and self.n_prompts < 1:
            raise ConfigError(f"n_prompts must be at least 1 or none, got {self.n_prompts}")
        if self.minibatches > self.group_size * self.prompts_per_step:
            raise ConfigError(f"minibatches ({self.minibatches}) exceeds the replies per step "
                              f"({self.prompts_per_step} x {self.group_size})")
        if not 0 < self.clip < 1:
            raise ConfigError(f"clip must be in (0, 1), got {self.clip}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be at least 0, got {self.kl_coef}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive (the replies of a group must differ), got {self.temperature}")

    @property
    def std(self) -> str:
        return self.advantage_std or ALGORITHMS[self.algorithm].std

    @property
    def aggregate(self) -> str:
        return self.aggregation or ALGORITHMS[self.algorithm].aggregation


# -- rewards -----------------------------------------------------------------------------------------------------

_LEADING_LETTER = re.compile(r"^[\W_]*([A-Z])(?![A-Za-z])")


def letter_choice(reply: str, n_options: int) -> int | None:
    """The option a reply names by letter: its first non-blank, non-punctuation character, when that is a valid
    option letter standing alone ("B", "B.", "(B)", "**B**: Paris"); else None."""
    from dpolab.banks import LETTERS

    m = _LEADING_LETTER.match(reply)
    if m is None or m.group(1) not in LETTERS[:n_options]:
        return None
    return LETTERS.index(m.group(1))


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def named_options(reply: str, options: Sequence[str]) -> set[int]:
    """The options whose text the reply names as a whole phrase (case- and space-insensitive). Longer options are
    matched first and their spans blanked, so "New York" does not also name "York"."""
    text = _norm(reply)
    found = set()
    for i in sorted(range(len(options)), key=lambda j: -len(_norm(options[j].strip().rstrip(".")))):
        phrase = _norm(options[i].strip().rstrip("."))
        if not phrase:
            continue
        pattern = re.compile(rf"(?<!\w){re.escape(phrase)}(?!\w)")
        if pattern.search(text):
            found.add(i)
            text = pattern.sub(lambda m: "\0" * len(m.group(0)), text)
    return found


def mcq_reward(item, reply: str, mcq_format: str) -> float:
    """1.0 when the reply answers the item with its right option (read as `mcq_format` says), else 0.0."""
    if mcq_format == "letter":
        return float(letter_choice(reply, len(item.options)) == item.answer)
    return float(named_options(reply, item.options) == {item.answer})


@dataclass
class RewardTask:
    """The prompt pool and how a reply to one of them is scored."""

    name: str
    source: str  # where the prompts come from, for cell.json
    conversations: list[Conversation]
    score: Callable[[Sequence[int], Sequence[str]], list[float]]  # pool indices, replies -> rewards
    ids: list[str] = dataclasses.field(default_factory=list)  # item ids (mcq), for checks


def mcq_task(options: Options, *, seed: int) -> RewardTask:
    """The knowledge items of the bank's train split, asked as the `mcq_format` reader asks them."""
    from dpolab import stance
    from dpolab.banks import bank_items, spread

    items = spread([it for it in bank_items("train") if it.domain == "knowledge"], options.n_prompts, seed=seed)
    reader = stance.reader(options.mcq_format)
    convs = [[{"role": "user", "content": reader.ask(it)}] for it in items]

    def score(index: Sequence[int], replies: Sequence[str]) -> list[float]:
        return [mcq_reward(items[i], r, options.mcq_format) for i, r in zip(index, replies)]

    return RewardTask(name=f"mcq ({options.mcq_format})", source="knowledge bank, train split", conversations=convs,
                      score=score, ids=[it.id for it in items])


def judge_task(options: Options, data: str, *, seed: int, token_count: Callable[[str], int] | None = None) -> RewardTask:
    """The distinct prompts of the context's pairs, scored by the judge (`token_count`: the policy's tokenizer's
    counter, for a judge that counts, as `length` does)."""
    from dpolab import judges
    from dpolab.banks import stable_hash

    convs = [p.messages for p in context_prompts(data)]
    if options.n_prompts is not None and options.n_prompts < len(convs):
        convs = random.Random(stable_hash("rl-prompts", seed)).sample(convs, options.n_prompts)
    judge = judges.make_judge(options.reward, options.judge_args, token_count=token_count)

    def score(index: Sequence[int], replies: Sequence[str]) -> list[float]:
        scores = judge.score([convs[i] for i in index], list(replies))
        if len(scores) != len(replies):
            raise TrainingError(f"judge {options.reward!r} gave {len(scores)} scores for {len(replies)} replies")
        return [float(s) for s in scores]

    return RewardTask(name=f"judge {options.reward}", source=f"context pairs' prompts ({data})", conversations=convs,
                      score=score)


# -- sampling and the per-token forward ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    ids: list[int]  # the sampled tokens, through the end-of-turn token when the reply reached it
    text: str  # decoded, without the end-of-turn token
    hit_limit: bool


def sample_replies(model, fmt: ChatFormat, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   temperature: float, seed: int, batch_size: int) -> list[Reply]:
    """One sampled reply per prompt row (repeat a prompt for a group), from the model as it is, in input order.

    The same batching as dpolab's generation (left-padded by length, dpolab.models.scoring.pack); torch's RNG is
    seeded with `seed` inside a fork, so the same weights, prompts and seed give the same replies.
    """
    from transformers import GenerationConfig

    from dpolab.models import scoring

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0,
                              top_p=1.0, eos_token_id=fmt.stop_ids, pad_token_id=fmt.pad_id, use_cache=True,
                              return_dict_in_generate=True)
    device = next(model.parameters()).device
    out: list[Reply | None] = [None] * len(prompts)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for batch in scoring.batches([len(p) for p in prompts], batch_size):
            packed = scoring.pack([prompts[i] for i in batch], fmt.pad_id)
            res = model.generate(input_ids=packed.ids.to(device), attention_mask=packed.mask.to(device),
                                 position_ids=packed.pos.to(device), generation_config=config)
            new = res.sequences[:, packed.ids.shape[1]:].tolist()  # (b, <= max_new_tokens)
            for b, i in enumerate(batch):
                gen = fmt.reply(new[b], max_new_tokens)
                stopped = gen.n_tokens < len(new[b]) and new[b][gen.n_tokens] in fmt.stop_ids
                out[i] = Reply(ids=new[b][: gen.n_tokens + int(stopped)], text=gen.text, hit_limit=not stopped)
    return out  # type: ignore[return-value]


def reply_logps(model, prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], *, pad_id: int,
                chunk_tokens: int = 512) -> torch.Tensor:
    """Per-token log-probs of each reply given its prompt, prompt + reply run as one right-padded row; only the
    reply positions reach the LM head (dpolab.training.logps.token_logps, chunked).  -> (N, T), 0 past a reply
    """
    from dpolab.models.scoring import upcast
    from dpolab.training.logps import causal_lm_parts, token_logps

    device = next(model.parameters()).device
    N, L, T = len(prompts), max(len(p) + len(r) for p, r in zip(prompts, replies)), max(len(r) for r in replies)
    ids = torch.full((N, L), pad_id, dtype=torch.long)
    mask = torch.zeros((N, L), dtype=torch.long)
    at = torch.zeros((N, T), dtype=torch.long)  # the position whose hidden state predicts reply token t
    targets = torch.zeros((N, T), dtype=torch.long)
    valid = torch.zeros((N, T), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        ids[i, : len(p) + len(r)] = torch.tensor([*p, *r])
        mask[i, : len(p) + len(r)] = 1
        at[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        targets[i, : len(r)] = torch.tensor(list(r))
        valid[i, : len(r)] = True
    ids, mask, at, targets, valid = (t.to(device) for t in (ids, mask, at, targets, valid))
    rows = torch.arange(N, device=device)[:, None].expand(N, T)[valid]  # (M,)
    parts = causal_lm_parts(model)
    if parts is not None:
        body, head = parts
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, L, H)
        logps = token_logps(head, hidden[rows, at[valid]], targets[valid], chunk_tokens=chunk_tokens)  # (M,)
    else:  # logits post-processed after the head: the model's own forward
        logits = upcast(model(input_ids=ids, attention_mask=mask).logits)[rows, at[valid]]  # (M, V)
        logps = logits.log_softmax(-1).gather(-1, targets[valid][:, None]).squeeze(-1)  # (M,)
    return logps.new_zeros(N, T).masked_scatter(valid, logps)  # (N, T)


# -- one RL step ----------------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """A step's replies, P·G rows ordered prompt by prompt (group g of prompt p is row p·G + g)."""

    prompts: list[list[int]]  # (N,) prompt ids of each row
    replies: list[Reply]  # (N,)
    rewards: torch.Tensor  # (P, G) float64
    mask: torch.Tensor  # (N, T) 1 on reply tokens

    def rows(self, index: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
        return [self.prompts[i] for i in index], [self.replies[i].ids for i in index]


@dataclass
class StepStats:
    """What one RL step logs (and cell.json keeps per step)."""

    step: int
    reward_mean: float
    reward_std: float
    group_means: list[float]  # (P,) each prompt's mean reward: the bootstrap's unit
    reply_tokens: float  # mean sampled tokens per reply (end-of-turn token included)
    hit_limit: float  # share of replies cut at max_new_tokens
    flat_groups: float  # share of groups whose rewards all tie (zero advantage: no signal)
    clip_fraction: float  # share of token updates whose gradient the clip removed, over the step's updates
    kl: float | None  # mean per-token k3 KL to the reference at sampling time (kl_coef > 0)
    loss: float  # mean over the step's updates
    grad_norm: float  # mean over the step's updates, before clipping


@dataclass(frozen=True)
class Update:
    """One optimizer step's numbers: tokens whose gradient the clip removed, tokens, the loss, the gradient norm
    before clipping."""

    clipped_tokens: float
    tokens: float
    loss: float
    grad_norm: float


class _Trainer:
    """The policy, its optimizer, the reference (when KL is on) and the prompt pool of one cell."""

    def __init__(self, job: CellJob):
        from dpolab.models.load import load_model

        cfg, opts = job.config, job.options
        self.job, self.cfg, self.opts = job, cfg, opts
        loaded = load_model(job.model_name, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        self.model = loaded.model.eval()  # dropout off: sampling, old and new log-probs see one policy
        self.fmt = ChatFormat(loaded.tokenizer)
        self.reference = None
        if opts.kl_coef > 0:  # the base model, or the train keys' reference_model when one is set
            self.reference = load_model(_reference_name(job), dtype=cfg.dtype,
                                        trust_remote_code=cfg.trust_remote_code).model.eval()
            self.reference.requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)  # constant: RL steps are few

    def use(self, task: RewardTask) -> None:
        """Take the prompt pool: tokenized, and ordered in a seeded per-epoch permutation."""
        from dpolab.training.loop import DataOrder

        opts, cfg = self.opts, self.cfg
        self.task = task
        room = max(1, cfg.max_length - opts.max_new_tokens)
        full = [self.fmt.prompt_ids(c) for c in task.conversations]
        self.n_truncated = sum(len(p) > room for p in full)
        self.prompt_ids = [p[-room:] for p in full]  # a prompt too long keeps its end, as the pairs' tokenization does
        self.order = DataOrder(len(full), batch_size=opts.prompts_per_step, seed=self.job.seed, shuffle=True)

    def rollout(self, step: int) -> Rollout:
        from dpolab.banks import stable_hash

        opts, G = self.opts, self.opts.group_size
        chosen = self.order.batch(step)  # (P,) pool indices
        rows = [self.prompt_ids[i] for i in chosen for _ in range(G)]
        replies = sample_replies(self.model, self.fmt, rows, max_new_tokens=opts.max_new_tokens,
                                 temperature=opts.temperature, seed=stable_hash("rl-sample", self.job.seed, step),
                                 batch_size=max(opts.micro_batch, G))
        index = [i for i in chosen for _ in range(G)]
        rewards = torch.tensor(self.task.score(index, [r.text for r in replies]), dtype=torch.float64).view(-1, G)
        T = max(len(r.ids) for r in replies)
        mask = torch.zeros((len(rows), T))
        for n, r in enumerate(replies):
            mask[n, : len(r.ids)] = 1
        return Rollout(prompts=rows, replies=replies, rewards=rewards, mask=mask)

    def logps_of(self, model, rollout: Rollout) -> torch.Tensor:
        """(N, T) per-token log-probs of all replies, micro-batch by micro-batch, without a graph."""
        N, T = rollout.mask.shape
        out = torch.zeros((N, T), dtype=torch.float64)
        with torch.no_grad():
            for s in range(0, N, self.opts.micro_batch):
                index = list(range(s, min(N, s + self.opts.micro_batch)))
                lp = reply_logps(model, *rollout.rows(index), pad_id=self.fmt.pad_id, chunk_tokens=self.cfg.chunk_tokens)
                out[s : s + len(index), : lp.shape[1]] = lp.double().cpu()
        return out

    def step(self, step: int) -> StepStats:
        opts = self.opts
        roll = self.rollout(step)
        algo = ALGORITHMS[opts.algorithm]
        advantages = group_advantages(roll.rewards, baseline=algo.baseline, std=opts.std).flatten()  # (N,)
        N = len(roll.replies)
        updates = opts.epochs_per_batch * opts.minibatches
        # With one update the sampling policy is the one being trained: its own detached log-probs are the old ones.
        old = self.logps_of(self.model, roll) if updates > 1 else None
        ref = self.logps_of(self.reference, roll) if self.reference is not None else None
        kl = None
        if ref is not None:
            base = old if old is not None else self.logps_of(self.model, roll)
            d = (ref - base)[roll.mask.bool()]
            kl = float((d.exp() - d - 1).mean())
        done: list[Update] = []
        for epoch in range(opts.epochs_per_batch):
            g = torch.Generator().manual_seed(self._seed("rl-order", step, epoch))
            perm = torch.randperm(N, generator=g).tolist() if opts.minibatches > 1 else list(range(N))
            for part in np.array_split(np.asarray(perm), opts.minibatches):
                done.append(self._update(roll, part.tolist(), advantages, old, ref))
        r = roll.rewards
        return StepStats(step=step + 1, reward_mean=float(r.mean()), reward_std=float(r.std()) if r.numel() > 1 else 0.0,
                         group_means=r.mean(1).tolist(),
                         reply_tokens=float(roll.mask.sum(1).mean()),
                         hit_limit=sum(x.hit_limit for x in roll.replies) / N,
                         flat_groups=float((r.max(1).values == r.min(1).values).double().mean()),
                         clip_fraction=sum(u.clipped_tokens for u in done) / max(sum(u.tokens for u in done), 1.0),
                         kl=kl, loss=sum(u.loss for u in done) / updates, grad_norm=sum(u.grad_norm for u in done) / updates)

    def _seed(self, *parts) -> int:
        from dpolab.banks import stable_hash

        return stable_hash(*parts, self.job.seed)

    def _update(self, roll: Rollout, index: list[int], advantages, old, ref) -> Update:
        """One optimizer step on these rows (micro-batch by micro-batch, the gradient accumulating)."""
        opts, cfg = self.opts, self.cfg
        n_tokens, n_seqs = float(roll.mask[index].sum()), float(len(index))
        clipped = tokens = loss = 0.0
        for s in range(0, len(index), opts.micro_batch):
            micro = index[s : s + opts.micro_batch]
            lp = reply_logps(self.model, *roll.rows(micro), pad_id=self.fmt.pad_id, chunk_tokens=cfg.chunk_tokens)  # (n, t)
            t = lp.shape[1]
            dtype, device = lp.dtype, lp.device

            def rows(x):
                return x[micro, :t].to(device=device, dtype=dtype)

            out = rl_loss(lp, lp.detach() if old is None else rows(old), advantages[micro].to(device=device, dtype=dtype),
                          rows(roll.mask), clip=opts.clip, aggregation=opts.aggregate,
                          ref_logps=None if ref is None else rows(ref), kl_coef=opts.kl_coef,
                          n_tokens=n_tokens, n_sequences=n_seqs)
            if not torch.isfinite(out.loss):
                raise TrainingError("non-finite RL loss; lower the learning rate")
            out.loss.backward()
            clipped, tokens, loss = clipped + out.clipped_tokens, tokens + out.tokens, loss + float(out.loss.detach())
        limit = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        if not math.isfinite(norm):
            raise TrainingError("non-finite gradient norm in an RL update; lower the learning rate")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return Update(clipped_tokens=clipped, tokens=tokens, loss=loss, grad_norm=norm)


# -- the run ----------------------------------------------------------------------------------------------------

def _reference_name(job: CellJob) -> str:
    return getattr(job.config, "reference_model", None) or job.model_name


def _fingerprint(job: CellJob) -> dict:
    """What a checkpoint must share with this run to be resumed from (steps and save_every may change)."""
    cfg = job.config
    options = {k: v for k, v in asdict(job.options).items() if k not in ("steps", "save_every")}
    return {"model": job.model_name, "seed": job.seed, "data": cfg.data if job.options.reward != MCQ_REWARD else None,
            "options": options, "lr": cfg.lr, "adam_betas": list(cfg.adam_betas), "weight_decay": cfg.weight_decay,
            "max_grad_norm": cfg.max_grad_norm, "dtype": cfg.dtype, "max_length": cfg.max_length,
            "reference": _reference_name(job) if job.options.kl_coef > 0 else None}


def _resume(trainer: _Trainer, job: CellJob, fingerprint: dict) -> tuple[int, list[dict]]:
    """Load the latest matching checkpoint in job.work; returns (steps done, their StepStats as dicts)."""
    from dpolab.training.checkpoint import list_checkpoints, load_checkpoint

    found = [c for c in list_checkpoints(job.work) if c.step <= job.options.steps]
    if not found:
        return 0, []
    state = json.loads((found[-1].path / "state.json").read_text(encoding="utf-8"))
    if state.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        job.say(f"rl: the checkpoints in {job.work} are of other settings; starting over")
        shutil.rmtree(job.work / "checkpoints", ignore_errors=True)
        return 0, []
    state = load_checkpoint(found[-1], model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
    job.say(f"rl: resumed from step {state['step']}")
    return int(state["step"]), list(state["history"])


def window_delta(first: Sequence[float], last: Sequence[float], *, seed: int, n_boot: int = 2000):
    """mean(last) − mean(first) with a percentile bootstrap interval, each side resampled on its own (the windows
    hold different prompt groups, so nothing pairs them)."""
    from dpolab.stats import MIN_ITEMS, Interval

    a, b = np.asarray(first, dtype=float), np.asarray(last, dtype=float)
    value = float(b.mean() - a.mean())
    if min(a.size, b.size) < MIN_ITEMS:
        return Interval(value, math.nan, math.nan, int(a.size + b.size))
    rng = np.random.default_rng(seed)
    da = a[rng.integers(0, a.size, (n_boot, a.size))].mean(1)  # (n_boot,)
    db = b[rng.integers(0, b.size, (n_boot, b.size))].mean(1)
    lo, hi = np.quantile(db - da, [0.025, 0.975])
    return Interval(value, float(lo), float(hi), int(a.size + b.size))


def reward_curve(history: Sequence[StepStats], *, seed: int) -> dict:
    """The mean reward of the first and the last quarter of the steps (at least one step each), prompt groups as
    the bootstrap's units, and their difference."""
    from dpolab.stats import bootstrap_ci

    k = max(1, len(history) // 4)
    first = [g for s in history[:k] for g in s.group_means]
    last = [g for s in history[-k:] for g in s.group_means]
    return {"window_steps": k, "first": asdict(bootstrap_ci(first, seed=seed)),
            "last": asdict(bootstrap_ci(last, seed=seed)), "delta": asdict(window_delta(first, last, seed=seed))}


def run(job: CellJob) -> Tuned:
    from dpolab.io import atomic_write_json
    from dpolab.training.checkpoint import save_checkpoint

    opts, cfg = job.options, job.config
    if cfg.lora or cfg.freeze_layers:
        raise ConfigError("kind rl trains every weight; remove lora / freeze_layers from its train keys")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trainer = _Trainer(job)
    task = (mcq_task(opts, seed=job.seed) if opts.reward == MCQ_REWARD
            else judge_task(opts, cfg.data, seed=job.seed, token_count=trainer.fmt.token_count))
    trainer.use(task)
    fingerprint = _fingerprint(job)
    done, saved = _resume(trainer, job, fingerprint)
    history = [StepStats(**s) for s in saved]
    resumed_from = done or None
    algo = ALGORITHMS[opts.algorithm]
    job.say(f"rl: {opts.algorithm} ({algo.paper}), reward {task.name}, {len(task.conversations)} prompts from "
            f"{task.source}; {opts.prompts_per_step} x {opts.group_size} replies per step, {opts.steps} steps")
    for step in range(done, opts.steps):
        stats = trainer.step(step)
        history.append(stats)
        kl = "" if stats.kl is None else f", KL {stats.kl:.4f}"
        job.say(f"rl step {step + 1}/{opts.steps}: reward {stats.reward_mean:.3f}, reply {stats.reply_tokens:.1f} "
                f"tokens, clip {stats.clip_fraction:.3f}{kl}")
        if (step + 1) % opts.save_every == 0 or step + 1 == opts.steps:
            save_checkpoint(job.work, step + 1, model=trainer.model, optimizer=trainer.optimizer,
                            scheduler=trainer.scheduler, keep=2,
                            extra={"history": [asdict(s) for s in history], "fingerprint": fingerprint})
    trainer.model.eval()
    optimizer_steps = len(history) * opts.epochs_per_batch * opts.minibatches
    info = {
        "algorithm": opts.algorithm, "paper": algo.paper, "baseline": algo.baseline, "advantage_std": opts.std,
        "aggregation": opts.aggregate, "reward": opts.reward, "reward_task": task.name, "prompts_source": task.source,
        "n_prompts": len(task.conversations), "prompts_truncated": trainer.n_truncated,
        "group_size": opts.group_size, "prompts_per_step": opts.prompts_per_step, "steps": len(history),
        "epochs_per_batch": opts.epochs_per_batch, "minibatches": opts.minibatches, "optimizer_steps": optimizer_steps,
        "clip": opts.clip, "kl_coef": opts.kl_coef, "kl_estimator": "k3 (per sampled token)" if opts.kl_coef > 0 else None,
        "lr": cfg.lr, "max_new_tokens": opts.max_new_tokens, "temperature": opts.temperature,
        "resumed_from": resumed_from,
        "per_step": [{k: v for k, v in asdict(s).items() if k != "group_means"} for s in history],
        "reward_curve": reward_curve(history, seed=job.seed),
    }
    atomic_write_json(job.work / "rl.json", info)
    return Tuned(model=trainer.model, steps=optimizer_steps, info=info)


KIND = MethodKind(name="rl", options=Options, run=run,
                  summary="critic-free online RL (Lite PPO, GRPO, RLOO): G sampled replies per prompt, scored by MCQ "
                          "correctness on the bank's train split or a judge, PPO clipped steps on group advantages")
