"""`dpolab bench batching`: the persuasion probe with all dialogues batched, against one dialogue at a time.

Both runs use the same loaded model and greedy decoding; the sequential run advances each (item, technique)
dialogue alone (turn 0 included) with batch size 1. Reported: wall time, dialogues per second, the speedup,
and whether every transcript and stance is identical.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from dpolab.models.generate import HFChatModel
from dpolab import stance as stance_mod
from dpolab.progress import Progress
from dpolab.banks import TECHNIQUES, Item, bank_items, read_appeals, read_items, spread
from dpolab.probes.persuasion import Dialogue, run_dialogues


@dataclass(frozen=True)
class EvalBench:
    dialogues: int
    turns: int
    reader: str
    batch_size: int
    batched_s: float
    sequential_s: float
    identical_transcripts: int  # dialogues whose full history matches
    identical_stances: int  # dialogues whose stance at every turn matches
    first_mismatch: str | None  # item/technique of the first differing transcript, if any

    @property
    def speedup(self) -> float:
        return self.sequential_s / self.batched_s

    def to_json(self) -> dict:
        return {**self.__dict__, "speedup": self.speedup,
                "batched_dialogues_per_s": self.dialogues / self.batched_s,
                "sequential_dialogues_per_s": self.dialogues / self.sequential_s}


def bench_batching(
    model: str,
    *,
    n_items: int = 4,
    techniques: Sequence[str] = TECHNIQUES,
    turns: int = 3,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    reader: str = "cloze",
    items: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> EvalBench:
    """Time the persuasion protocol batched vs one dialogue at a time on the same model and items."""
    from dpolab.models.load import load_model

    loaded = load_model(model, dtype=dtype)
    batched = HFChatModel(loaded, batch_size=batch_size)
    single = HFChatModel(loaded, batch_size=1)
    pool: list[Item] = read_items(items) if items else bank_items("test")
    chosen = stance_mod.with_targets(batched, spread(pool, n_items, seed=seed), reader).items
    appeals = read_appeals()
    kw = dict(reader=reader, turns=turns, max_new_tokens=max_new_tokens, appeals=appeals, seed=seed)

    t0 = time.perf_counter()
    fast = run_dialogues(batched, chosen, techniques=techniques, progress=progress, **kw)
    batched_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    slow: list[Dialogue] = []
    for it in chosen:
        for tech in techniques:
            slow.extend(run_dialogues(single, [it], techniques=[tech], **kw))
    sequential_s = time.perf_counter() - t0

    same_text = [a.history == b.history for a, b in zip(fast, slow)]
    same_stance = [[s.choice for s in a.stances] == [s.choice for s in b.stances] for a, b in zip(fast, slow)]
    first = next((f"{a.item.id}/{a.technique}" for a, ok in zip(fast, same_text) if not ok), None)
    return EvalBench(dialogues=len(fast), turns=turns, reader=reader, batch_size=batch_size, batched_s=batched_s,
                     sequential_s=sequential_s, identical_transcripts=sum(same_text),
                     identical_stances=sum(same_stance), first_mismatch=first)
