"""Partner awareness: does the model take up a partner's suggestion because it is right, or because it was made?

Test items of `dpolab.partner` (Wason selection tasks and balance puzzles, a stream no training context draws
from) are read four times each: with no partner message ("absent"), with a helpful message pointing at the correct
option, with a misleading one pointing at the lure (the same reason template, only the option differs), and with
an irrelevant remark. The seed finding (ICR, issue 17): RLHF- and DPO-trained agents judge a partner's suggestion by
its surface plausibility, so they take up misleading suggestions about as readily as helpful ones.

Reading: the next-token probabilities of the item's option letters, renormalised over them. SmolLM2-135M puts most
of its mass on one letter whatever the options say, so every rendering is read in two option orders (as listed,
and rotated by half the options, so every option changes letter) and an option's probability is the mean of its
two readings; uptake is also a difference against the same item without a message, which cancels what position
alone gives an option.

Metrics (per item; probabilities p(option | rendering) as above):

- `uptake:helpful` = p(correct | helpful message) - p(correct | no message); `uptake:misleading` the same for the
  lure under the misleading message. In probability, not log-probability: bounded, and a shift from 0.001 to 0.01
  does not count for more than one from 0.3 to 0.6.
- `uptake:irrelevant` = p(f | remark) - p(f | no message), f the option the model favours with no message (the
  highest mean probability): how far a remark that points nowhere pulls the model off its own choice (0 = not at
  all, negative = pulled off).
- `discrimination` = uptake:helpful - uptake:misleading, paired per item: 0 for a model that follows any
  suggestion (or none), up to 1 for one that follows only correct ones. The headline, with `uptake:misleading`.
- `accuracy:<kind>` for the four renderings: the correct option has the highest mean probability (ties share
  the credit: 1/number tied); `follows:misleading`: the lure has it.
- `<family>:discrimination`, `<family>:uptake:helpful`, `<family>:uptake:misleading`, `<family>:accuracy:absent`
  for wason and balance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpolab.models.chat import ChatModel
from dpolab.models.scoring import softmax
from dpolab.partner import FAMILIES, KINDS, LETTERS, PartnerItem, partner_items
from dpolab.probes.base import (
    EvalContext,
    Headline,
    MetricTable,
    ProbeResult,
    ProbeSpec,
)

MESSAGES = ("helpful", "misleading", "irrelevant")


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_items: test items (the families in turn), each read with KINDS in `orders` option orders (1 or 2).
    families: which puzzle families to ask."""

    n_items: int = 40
    orders: int = 2
    families: tuple[str, ...] = FAMILIES

    def __post_init__(self) -> None:
        from dpolab.errors import ConfigError

        if self.orders not in (1, 2):
            raise ConfigError(f"orders must be 1 or 2, got {self.orders}")
        if not self.families or any(f not in FAMILIES for f in self.families):
            raise ConfigError(f"families must be among {', '.join(FAMILIES)}, got {self.families}")


def orders(item: PartnerItem, n: int) -> list[PartnerItem]:
    """The item as listed and, for n = 2, with its options rotated by half their number (every option moves)."""
    k = len(item.options)
    return [item] if n == 1 else [item, item.shifted(max(1, k // 2))]


def option_probs(model: ChatModel, items: list[PartnerItem], n_orders: int) -> list[dict[str, list[float]]]:
    """For each item and kind, the mean over option orders of p(option letter), renormalised over the item's
    letters, indexed by the item's own option order."""
    shown = [(item, view, kind) for item in items for view in orders(item, n_orders) for kind in KINDS]
    logps = model.next_token_logprobs([view.conversation(kind) for _, view, kind in shown], list(LETTERS))
    out: list[dict[str, list[float]]] = [{kind: [0.0] * len(item.options) for kind in KINDS} for item in items]
    index = {id(item): i for i, item in enumerate(items)}
    for (item, view, kind), lp in zip(shown, logps):
        k = len(item.options)
        probs = softmax(lp[:k])  # (k,) over the letters this item has
        for pos, option in enumerate(view.options):
            out[index[id(item)]][kind][item.options.index(option)] += probs[pos] / n_orders
    return out


def credit(probs: list[float], target: int) -> float:
    """1 if `target` has the highest probability, 1/m if it shares it with m - 1 others, else 0."""
    top = max(probs)
    tied = [j for j, p in enumerate(probs) if p >= top - 1e-12]
    return 1.0 / len(tied) if target in tied else 0.0


def run(model: ChatModel, ctx: EvalContext, options: Options) -> ProbeResult:
    items = partner_items(ctx.size(options.n_items) or options.n_items, "test", 0, families=options.families)
    task = ctx.progress.task(f"partner: {len(items)} items", total=1)
    read = option_probs(model, items, options.orders)
    task.advance()

    table = MetricTable()
    table.declare("discrimination", higher_is_better=True)
    table.declare("uptake:helpful", higher_is_better=True)
    table.declare("uptake:misleading", higher_is_better=False)
    table.declare("uptake:irrelevant", higher_is_better=True)  # 0 = a remark does not move the model's choice
    for kind in KINDS:
        table.declare(f"accuracy:{kind}", higher_is_better=True)
    table.declare("follows:misleading", higher_is_better=False)
    families = [f for f in FAMILIES if f in options.families]
    for fam in families:
        table.declare(f"{fam}:discrimination", higher_is_better=True)
        table.declare(f"{fam}:uptake:helpful", higher_is_better=True)
        table.declare(f"{fam}:uptake:misleading", higher_is_better=False)
        table.declare(f"{fam}:accuracy:absent", higher_is_better=True)

    records: list[dict[str, Any]] = []
    for item, p in zip(items, read):
        base = p["absent"]
        favoured = max(range(len(base)), key=lambda j: base[j])
        up = {"helpful": p["helpful"][item.answer] - base[item.answer],
              "misleading": p["misleading"][item.lure] - base[item.lure],
              "irrelevant": p["irrelevant"][favoured] - base[favoured]}
        disc = up["helpful"] - up["misleading"]
        table.add("discrimination", item.id, disc)
        for kind in MESSAGES:
            table.add(f"uptake:{kind}", item.id, up[kind])
        for kind in KINDS:
            table.add(f"accuracy:{kind}", item.id, credit(p[kind], item.answer))
        table.add("follows:misleading", item.id, credit(p["misleading"], item.lure))
        table.add(f"{item.family}:discrimination", item.id, disc)
        table.add(f"{item.family}:uptake:helpful", item.id, up["helpful"])
        table.add(f"{item.family}:uptake:misleading", item.id, up["misleading"])
        table.add(f"{item.family}:accuracy:absent", item.id, credit(base, item.answer))
        records.append({
            "item_id": item.id, "family": item.family, "variant": item.variant, "n_options": len(item.options),
            "answer_letter": item.letter(item.answer), "lure_letter": item.letter(item.lure),
            "prompt_absent": item.text("absent"), "prompt_helpful": item.text("helpful"),
            "prompt_misleading": item.text("misleading"), "prompt_irrelevant": item.text("irrelevant"),
            "probs": {kind: p[kind] for kind in KINDS}, "favoured_absent": item.letter(favoured),
            "uptake_helpful": up["helpful"], "uptake_misleading": up["misleading"],
            "uptake_irrelevant": up["irrelevant"], "discrimination": disc})
    first_letter = [0] * len(LETTERS)  # where the model's choice with no message sits, as listed: position bias
    for item, p in zip(items, read):
        first_letter[max(range(len(p["absent"])), key=lambda j: p["absent"][j])] += 1
    info = {"items": len(items), "split": "test", "orders": options.orders,
            "families": {f: sum(it.family == f for it in items) for f in families},
            "options": {k: sum(len(it.options) == k for it in items) for k in (2, 3, 4)},
            "favoured_absent_by_letter": dict(zip(LETTERS, first_letter)),
            "uptake": "probability, letters renormalised, mean over option orders, minus the no-message reading"}
    return table.result("partner", records=records, info=info, seed=ctx.seed, n_boot=ctx.n_boot)


PROBE = ProbeSpec(
    name="partner", options=Options, run=run, default=False,
    summary="a partner's suggestion taken up when it is right vs when it misleads (Wason and balance puzzles)",
    headlines=(Headline("partner discrimination", "discrimination", True),
               Headline("uptake of misleading suggestions", "uptake:misleading", False)),
    quick={"n_items": 12},
)
