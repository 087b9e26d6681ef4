"""resist-only: DuET-PD's Resist set (arXiv:2508.17450): baseline pairs plus NEG pairs, nothing for corrections.

- baseline (every item, turn 0): the question alone; chosen = the correct answer, rejected = the target if the model
  answered correctly, else the model's own wrong answer (as stance answers: "B" vs "C", or cloze sentences).
- neg_response (each NEG dialogue, each turn): after the user's misleading push, chosen = an ideal refutation that
  keeps the correct answer, rejected = the model's own greedy reply to that same prompt.
- neg_stance (each NEG dialogue, each turn): the probe's stance check after the refutation; chosen = the correct
  answer, rejected = the target.

NEG dialogues open on items the model answers correctly (see dpolab.contexts.dialogues for the top-up rule).
"""
from __future__ import annotations

from dpolab.contexts import dialogues as dlg
from dpolab.contexts import ideal as ideal_mod
from dpolab.contexts.base import ContextData, ContextSpec, special_strings
from dpolab.models.chat import ChatModel
from dpolab.progress import Progress

NAME = "resist-only"


Options = dlg.PersuasionOptions


def build(model: ChatModel, *, options: dlg.PersuasionOptions, seed: int, limit: int | None = None,
          progress: Progress | None = None, directions: tuple[str, ...] = ("neg",),
          neg_pos_ratio: float | None = None, name: str = NAME) -> ContextData:
    """The resist-only pairs; holistic calls this with directions ("neg", "pos")."""
    s = dlg.setup(model, options, seed=seed, limit=limit)
    opened = dlg.openings(model, s.items, s.reader, max_new_tokens=options.max_new_tokens, seed=seed)
    planned = dlg.plan(opened, directions=directions, techniques=options.techniques,
                       techniques_per_item=options.techniques_per_item, min_fraction=options.min_fraction,
                       neg_pos_ratio=neg_pos_ratio, reader=s.reader, seed=seed)
    writer = ideal_mod.writer(options.ideal, seed=seed)
    reply_kind = {"neg": "refute", "pos": "affirm"}
    exchanges = dlg.converse(
        model, planned.plans, turns=options.turns, reader=s.reader, appeals=s.appeals, seed=seed, writer=writer,
        kinds=lambda p: (reply_kind[p.direction],), history_kind=lambda p: reply_kind[p.direction],
        own_replies=True, max_new_tokens=options.max_new_tokens, progress=progress)
    log = dlg.PairLog()
    for pair in dlg.baseline_pairs(name, opened, s.reader):
        log.add(pair)
    specials = special_strings(model)
    for ex in exchanges:
        p, kind = ex.plan, reply_kind[ex.plan.direction]
        dlg.response_pair(log, name, f"{p.direction}_response", ex, chosen=ex.replies[kind],
                          rejected=ex.own.text if ex.own is not None else None, reader=s.reader,
                          specials=specials, rejected_source="own")
        # NEG: the target was pushed; POS: the assistant's own earlier (wrong) answer is what it should leave.
        wrong = p.item.target if p.direction == "neg" else p.held
        dlg.stance_pair(log, name, f"{p.direction}_stance", ex, after=kind, chosen=p.item.answer, rejected=wrong,
                        reader=s.reader)
    info = {**dlg.setup_info(s, opened, planned, options, writer), **log.info(),
            "own_replies_hit_limit": sum(bool(ex.own and ex.own.hit_limit) for ex in exchanges)}
    return ContextData(pairs=log.pairs, info=info)


CONTEXT = ContextSpec(name=NAME, options=Options, build=build, quick={"n_items": 3, "turns": 2},
                      file_options=("items", "appeals"),
                      banks=("knowledge.jsonl", "safety.jsonl", "split.json", "appeals.jsonl", "ideal_replies.jsonl"))
