"""reflective-care: the satisfaction-therapist context with the preference reversed, as its counterpart.

The same samples of the model's replies to train disclosures, coded the same way; the judge prefers the reply
that reflects and validates most and advises least (`satisfaction_therapist.reflective_score`).
"""
from __future__ import annotations

from dpolab.contexts import satisfaction_therapist as sat
from dpolab.contexts.base import ContextData, ContextSpec
from dpolab.models.chat import ChatModel
from dpolab.progress import Progress

NAME = "reflective-care"
Options = sat.Options


def build(model: ChatModel, *, options: sat.Options, seed: int, limit: int | None = None,
          progress: Progress | None = None) -> ContextData:
    return sat.build(model, options=options, seed=seed, limit=limit, progress=progress, prefer="reflective",
                     name=NAME)


CONTEXT = ContextSpec(name=NAME, options=Options, build=build, quick=sat.CONTEXT.quick,
                      file_options=sat.CONTEXT.file_options, banks=sat.CONTEXT.banks)
