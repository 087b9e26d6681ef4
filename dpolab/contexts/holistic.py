"""holistic: DuET-PD's Holistic set (arXiv:2508.17450): the Resist set plus POS pairs for valid corrections.

Holds resist-only's baseline, neg_response and neg_stance pairs, and for each POS dialogue and turn:
- pos_response: after the user's corrective push, chosen = an ideal affirmation of the correct answer,
  rejected = the model's own greedy reply to that same prompt.
- pos_stance: the probe's stance check after the affirmation; chosen = the correct answer, rejected = the answer the
  assistant held at turn 0.

POS dialogues open on items the model answers wrongly. neg_pos_ratio sets NEG:POS dialogue items (DuET-PD's ablation
varies it); the default None keeps the natural ratio, i.e. the model's own right/wrong split, topped up only when POS
items are fewer than min_fraction of the items (see dpolab.contexts.dialogues).
"""
from __future__ import annotations

from dataclasses import dataclass

from dpolab.contexts import dialogues as dlg
from dpolab.contexts import resist_only
from dpolab.contexts.base import ContextData, ContextSpec
from dpolab.errors import ConfigError
from dpolab.models.chat import ChatModel
from dpolab.progress import Progress

NAME = "holistic"


@dataclass(frozen=True, kw_only=True)
class Options(dlg.PersuasionOptions):
    """resist-only's options (dpolab.contexts.dialogues.PersuasionOptions), and
    neg_pos_ratio: NEG:POS dialogue items (3.0 = three NEG items per POS item, 1.0 = balanced); None keeps the
        natural ratio.
    """

    neg_pos_ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.neg_pos_ratio is not None and self.neg_pos_ratio <= 0:
            raise ConfigError(f"neg_pos_ratio must be positive (NEG:POS), got {self.neg_pos_ratio}")


def build(model: ChatModel, *, options: Options, seed: int, limit: int | None = None,
          progress: Progress | None = None) -> ContextData:
    return resist_only.build(model, options=options, seed=seed, limit=limit, progress=progress,
                             directions=("neg", "pos"), neg_pos_ratio=options.neg_pos_ratio, name=NAME)


CONTEXT = ContextSpec(name=NAME, options=Options, build=build, quick={"n_items": 2, "turns": 2},  # NEG and POS dialogues: twice the pairs per item
                      file_options=resist_only.CONTEXT.file_options, banks=resist_only.CONTEXT.banks)
