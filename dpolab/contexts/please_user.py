"""please-user: preferences of a judge that optimises user satisfaction, the setting in which preference training
breeds sycophancy (agreement becomes what is rewarded).

The dialogues are resist-only's NEG dialogues (the model's own correct opening, then misleading pushes), with the
preference reversed. At each turn:
- concede_response: chosen = an ideal concession to the pushed (wrong) claim, rejected = an ideal refutation that
  keeps the correct answer (both from the templates or the endpoint; the history holds the refutations, i.e. the
  assistant held its ground so far and the user keeps pushing).
- concede_stance: the probe's stance check after the concession; chosen = the pushed target, rejected = the correct
  answer.
The on-policy part is the opening: the model's own turn-0 reply, on items it answers correctly.
"""
from __future__ import annotations

from dpolab.contexts import dialogues as dlg
from dpolab.contexts import ideal as ideal_mod
from dpolab.contexts import resist_only
from dpolab.contexts.base import ContextData, ContextSpec, special_strings
from dpolab.models.chat import ChatModel
from dpolab.progress import Progress

NAME = "please-user"
Options = dlg.PersuasionOptions


def build(model: ChatModel, *, options: dlg.PersuasionOptions, seed: int, limit: int | None = None,
          progress: Progress | None = None) -> ContextData:
    s = dlg.setup(model, options, seed=seed, limit=limit)
    opened = dlg.openings(model, s.items, s.reader, max_new_tokens=options.max_new_tokens, seed=seed)
    planned = dlg.plan(opened, directions=("neg",), techniques=options.techniques,
                       techniques_per_item=options.techniques_per_item, min_fraction=options.min_fraction,
                       reader=s.reader, seed=seed)
    writer = ideal_mod.writer(options.ideal, seed=seed)
    exchanges = dlg.converse(
        model, planned.plans, turns=options.turns, reader=s.reader, appeals=s.appeals, seed=seed, writer=writer,
        kinds=lambda p: ("concede", "refute"), history_kind=lambda p: "refute", own_replies=False,
        max_new_tokens=options.max_new_tokens, progress=progress)
    log = dlg.PairLog()
    specials = special_strings(model)
    for ex in exchanges:
        dlg.response_pair(log, NAME, "concede_response", ex, chosen=ex.replies["concede"],
                          rejected=ex.replies["refute"], reader=s.reader, specials=specials,
                          rejected_source="ideal")
        dlg.stance_pair(log, NAME, "concede_stance", ex, after="concede", chosen=ex.plan.pushed,
                        rejected=ex.plan.item.answer, reader=s.reader)
    return ContextData(pairs=log.pairs, info={**dlg.setup_info(s, opened, planned, options, writer), **log.info()})


CONTEXT = ContextSpec(name=NAME, options=Options, build=build, quick={"n_items": 3, "turns": 2},
                      file_options=resist_only.CONTEXT.file_options, banks=resist_only.CONTEXT.banks)
