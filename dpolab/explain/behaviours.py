"""The behaviours `dpolab explain` can take apart: which probe measures each, the per-item metric whose change an
intervention is a fraction of, and how its records become replies with a reading (the probe's labels)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dpolab.explain.activations import Sample
from dpolab.registry import Registry

BEHAVIOURS = Registry("behaviour to explain", {
    "toxicity": "dpolab.explain.behaviours:TOXICITY",
    "persuasion": "dpolab.explain.behaviours:PERSUASION",
})


@dataclass(frozen=True)
class Behaviour:
    """probe: the registered probe that measures it; its records give the replies.
    metric: the probe's per-item metric an intervention's effect is read on.
    positive: what a label of 1 (the probe direction's positive side) means.
    samples: the probe's records -> replies with their reading.
    sizes: the probe's options in explain's runs (each intervention reruns the probe once).
    """

    probe: str
    metric: str
    positive: str
    samples: Callable[[Sequence[dict[str, Any]]], list[Sample]]
    sizes: dict[str, Any] = field(default_factory=dict)


def toxicity_samples(records: Sequence[dict[str, Any]]) -> list[Sample]:
    """Every sampled reply with its toxicity score (split at the median into more and less toxic)."""
    return [Sample(item_id=str(r["item_id"]), conversation=({"role": "user", "content": r["prompt"]},),
                   reply=r["reply"], outcome=float(r["score"])) for r in records]


def persuasion_samples(records: Sequence[dict[str, Any]]) -> list[Sample]:
    """Each reply of a misleading dialogue after a persuasion turn, 1 if the model's stance after it is wrong (it has
    yielded by then), 0 if it still holds the right answer.

    Only "neg" dialogues (the model started right and is pushed to a wrong option) enter: in a corrective dialogue
    giving way is the right move, and one direction mixing both would be no behaviour at all. Every turn's reply
    enters, not only the last, because a small eval has few misleading dialogues; the item is still the unit the
    probe's folds and CIs resample.
    """
    out = []
    for r in records:
        if r["direction"] != "neg":
            continue
        transcript = [dict(m) for m in r["transcript"]]
        replies = [j for j, m in enumerate(transcript) if m["role"] == "assistant"]
        for turn, j in enumerate(replies[1:], start=1):  # reply 0 answers the question, before any persuasion
            out.append(Sample(item_id=str(r["item_id"]), conversation=tuple(transcript[:j]),
                              reply=transcript[j]["content"], outcome=float(not r["correct"][turn])))
    return out


TOXICITY = Behaviour(probe="toxicity", metric="mean_score", positive="toxic", samples=toxicity_samples,
                     sizes={"n_prompts": 100, "k": 2, "seeds": (0,)})
# neg_acc@3, not neg_flip@3: a flip is defined only on items the model starts right on, which differ between the
# base, the tuned model and each intervention, so three-way comparisons kept 7-9 of 24 items on the embedded model
PERSUASION = Behaviour(probe="persuasion", metric="neg_acc@3", positive="yielded", samples=persuasion_samples,
                       sizes={"n_items": 40, "techniques": ("evidence",)})
