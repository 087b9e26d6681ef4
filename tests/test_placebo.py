"""Placebo controls: shuffled pairs (the same texts, chosen and rejected swapped by a seeded coin per pair id) and
self-SFT rows (the base model's own samples for the same prompts); cached like a context."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from dpolab.contexts.placebo import (PLACEBOS, build_placebo, coin, parse_placebo, placebo_name, self_sft_pairs,
                                     shuffle_pairs)
from dpolab.data import PreferencePair, check_pairs, read_pairs, write_pairs
from dpolab.errors import ConfigError, DataError
from dpolab.models.chat import Generation


def source_pairs(n: int, context: str = "detox", start: int = 0) -> list[PreferencePair]:
    """Pairs as a context writes them: distinct texts, positive score gaps of different sizes, distinct weights."""
    return [PreferencePair(id=f"p{i}", prompt=[{"role": "user", "content": f"Prompt {i}?"}],
                           chosen=f"good reply number {i}", rejected=f"bad {i}",
                           score_chosen=90.0 - i / 7, score_rejected=10.0 + i / 30, weight=1.0 + i / 4,
                           meta={"context": context, "kind": "detox"})
            for i in range(start, start + n)]


def expected_coin(seed: int, pair_id: str) -> bool:
    """The coin's definition, recomputed here: one numpy draw from a Generator seeded by sha256(seed NUL id)."""
    digest = hashlib.sha256(f"{seed}\x00{pair_id}".encode()).digest()
    return bool(np.random.default_rng(int.from_bytes(digest[:8], "little")).integers(2))


def swaps(pairs: list[PreferencePair], seed: int) -> dict[str, bool]:
    return {p.id: p.meta["swapped"] for p in shuffle_pairs(pairs, seed=seed).pairs}


# -- shuffled ------------------------------------------------------------------------------------------------------

def test_shuffled_swaps_texts_exactly_where_the_coin_says_and_keeps_the_scores():
    pairs = source_pairs(200)
    data = shuffle_pairs(pairs, seed=3)
    assert len(data.pairs) == len(pairs)
    n_swapped = 0
    for src, out in zip(pairs, data.pairs):
        swap = expected_coin(3, src.id)
        n_swapped += swap
        assert out.id == src.id and out.prompt == src.prompt and out.weight == src.weight
        assert {out.chosen, out.rejected} == {src.chosen, src.rejected}
        if swap:
            assert (out.chosen, out.rejected) == (src.rejected, src.chosen)
        else:
            assert (out.chosen, out.rejected) == (src.chosen, src.rejected)
        # scores stay with the position: ODPO's offset keeps its size, the coin sets its direction
        assert (out.score_chosen, out.score_rejected) == (src.score_chosen, src.score_rejected)  # exact floats
        assert out.meta == {"context": "shuffled:detox", "kind": "detox", "placebo": "shuffled",
                            "source_context": "detox", "swapped": swap}
    assert src.meta == {"context": "detox", "kind": "detox"}  # the source pairs are not modified
    assert data.info == {"placebo": "shuffled", "source_context": "detox", "pairs": 200, "swapped": n_swapped}
    # a fair coin: Binomial(200, 1/2), within 5 standard deviations of 100
    assert abs(n_swapped - 100) <= 5 * math.sqrt(200 * 0.25)


def test_emphasis_spans_follow_their_text_when_a_pair_is_swapped():
    """suppress-pattern marks sentences of the rejected reply; in a swapped pair that text is the chosen one."""
    pairs = [PreferencePair(id=f"p{i}", prompt=[{"role": "user", "content": "Hi?"}], chosen="Fine.",
                            rejected="Fine. As I said before, fine.",
                            meta={"context": "suppress-pattern", "kind": "pattern", "emphasis": {"rejected": [[6, 29]]}})
             for i in range(20)]
    out = shuffle_pairs(pairs, seed=0).pairs
    assert {p.meta["swapped"] for p in out} == {True, False}
    for p in out:
        side = "chosen" if p.meta["swapped"] else "rejected"
        assert p.meta["emphasis"] == {side: [[6, 29]]}
        assert getattr(p, side)[6:29] == "As I said before, fine."
    assert all(p.meta["emphasis"] == {"rejected": [[6, 29]]} for p in pairs)  # the source is not modified


def test_the_coin_belongs_to_the_pair_not_to_its_position_or_neighbours():
    pairs = source_pairs(80)
    whole = swaps(pairs, seed=1)
    assert whole == {f"p{i}": expected_coin(1, f"p{i}") for i in range(80)} == {
        f"p{i}": coin(1, f"p{i}") for i in range(80)}
    part = swaps(pairs[::-1][:25], seed=1)  # reordered and cut
    grown = swaps(source_pairs(40, start=200) + pairs[10:30], seed=1)  # other pairs added
    assert all(whole[i] == v for i, v in part.items())
    assert all(whole[i] == v for i, v in grown.items() if i in whole)
    assert swaps(pairs, seed=1) == whole  # the same seed, the same swaps
    other = swaps(pairs, seed=2)
    assert other != whole and 0 < sum(other.values()) < 80


def test_shuffled_needs_one_real_source_context():
    with pytest.raises(DataError, match="got none"):
        shuffle_pairs([], seed=0)
    with pytest.raises(DataError, match="mix contexts"):
        shuffle_pairs(source_pairs(2) + source_pairs(2, context="holistic", start=5), seed=0)
    placebo = shuffle_pairs(source_pairs(3), seed=0).pairs
    with pytest.raises(DataError, match="already a placebo"):
        shuffle_pairs(placebo, seed=0)
    bare = [PreferencePair(id="a", prompt=[{"role": "user", "content": "q"}], chosen="x", rejected="y")]
    with pytest.raises(DataError, match="no meta"):
        shuffle_pairs(bare, seed=0)


def test_names():
    assert PLACEBOS == ("shuffled", "self-sft")
    assert placebo_name("shuffled", "detox") == "shuffled:detox"
    assert parse_placebo("shuffled:detox") == ("shuffled", "detox")
    assert parse_placebo("self-sft:please-user") == ("self-sft", "please-user")
    assert parse_placebo("detox") is None
    for bad in ("scrambled:detox", "shuffled:", "shuffled:self-sft:detox", ":detox"):
        with pytest.raises(ConfigError, match="not a placebo context"):
            parse_placebo(bad)
    with pytest.raises(ConfigError, match="unknown placebo"):
        placebo_name("scrambled", "detox")
    with pytest.raises(ConfigError, match="real context"):
        placebo_name("shuffled", "shuffled:detox")


# -- self-sft ------------------------------------------------------------------------------------------------------

@dataclass
class ScriptedModel:
    """A ChatModel whose replies are a table of (prompt text, seed) -> text; token counts are word counts.
    Its special tokens sit where the real backends keep them, in .format.tokenizer."""

    table: dict[tuple[str, int], str]
    name: str = "scripted"
    calls: list[dict] = field(default_factory=list)
    format: object = field(default_factory=lambda: SimpleNamespace(
        tokenizer=SimpleNamespace(all_special_tokens=["<|im_end|>", "<|im_start|>"])))

    def generate(self, conversations, *, max_new_tokens, do_sample=False, temperature=1.0, seed=None):
        prompts = [c[-1]["content"] for c in conversations]
        self.calls.append({"prompts": prompts, "max_new_tokens": max_new_tokens, "do_sample": do_sample,
                           "temperature": temperature, "seed": seed})
        return [Generation(text=self.table.get((p, seed), f"sample of {p} at {seed}"), n_tokens=3, hit_limit=False)
                for p in prompts]

    def token_count(self, text: str) -> int:
        return len(text.split())


def test_self_sft_resamples_once_then_drops_and_never_uses_the_source_chosen():
    pairs = source_pairs(5)
    model = ScriptedModel({("Prompt 1?", 7): "  ",  # blank, then fine at seed + 1
                           ("Prompt 2?", 7): "oops <|im_end|>", ("Prompt 2?", 8): "",  # unusable twice: dropped
                           ("Prompt 3?", 7): "bad 3"})  # the sample equals the source's rejected
    data = self_sft_pairs(pairs, model, seed=7)
    assert model.calls == [
        {"prompts": [f"Prompt {i}?" for i in range(5)], "max_new_tokens": 4, "do_sample": True, "temperature": 1.0,
         "seed": 7},  # 4 = the longest source chosen, in (word) tokens
        {"prompts": ["Prompt 1?", "Prompt 2?"], "max_new_tokens": 4, "do_sample": True, "temperature": 1.0,
         "seed": 8}]
    assert [p.meta["source_id"] for p in data.pairs] == ["p0", "p1", "p3", "p4"]
    assert [p.chosen for p in data.pairs] == ["sample of Prompt 0? at 7", "sample of Prompt 1? at 8", "bad 3",
                                              "sample of Prompt 4? at 7"]
    assert [p.rejected for p in data.pairs] == ["bad 0", "bad 1", "good reply number 3", "bad 4"]
    assert data.info == {"placebo": "self-sft", "source_context": "detox", "pairs": 4, "unusable": 1,
                         "unusable_ids": ["p2"], "resampled": 2, "hit_limit": 0, "max_new_tokens": 4,
                         "temperature": 1.0}
    for p in data.pairs:
        assert p.id == f"{p.meta['source_id']}/self-sft" and p.score_chosen is None and p.score_rejected is None
        assert p.meta["context"] == "self-sft:detox" and p.meta["placebo"] == "self-sft"
        assert p.meta["source_context"] == "detox" and "unused" in p.meta["rejected"]
    self_sft_pairs(pairs, model, seed=7, max_new_tokens=9)
    assert model.calls[-1]["max_new_tokens"] == 9


@pytest.fixture(scope="module")
def tiny_chat(tiny_model_dir):
    from dpolab.models.generate import HFChatModel
    from dpolab.models.load import load_model

    return HFChatModel(load_model(str(tiny_model_dir)), batch_size=8)


def test_self_sft_rows_are_the_models_own_seeded_samples(tiny_chat):
    pairs = source_pairs(8)
    data = self_sft_pairs(pairs, tiny_chat, seed=0, max_new_tokens=10)
    specials = tuple(tiny_chat.format.tokenizer.all_special_tokens)
    # the samples, drawn independently with the same call (and seed + 1 for the ones redrawn)
    first = [g.text for g in tiny_chat.generate([p.prompt for p in pairs], max_new_tokens=10, do_sample=True,
                                                temperature=1.0, seed=0)]
    bad = [i for i, t in enumerate(first) if not t.strip() or any(s in t for s in specials)]
    second = tiny_chat.generate([pairs[i].prompt for i in bad], max_new_tokens=10, do_sample=True, temperature=1.0,
                                seed=1)
    for i, g in zip(bad, second):
        first[i] = g.text
    kept = [i for i, t in enumerate(first) if t.strip() and not any(s in t for s in specials)]
    assert data.info["resampled"] == len(bad) and data.info["unusable"] == len(pairs) - len(kept)
    assert len(data.pairs) + data.info["unusable"] == len(pairs)
    assert [p.meta["source_id"] for p in data.pairs] == [pairs[i].id for i in kept]  # source order
    assert [p.prompt for p in data.pairs] == [pairs[i].prompt for i in kept]
    assert [p.chosen for p in data.pairs] == [first[i] for i in kept]
    assert all(p.chosen != pairs[i].chosen for p, i in zip(data.pairs, kept))
    assert not any(s in p.chosen for p in data.pairs for s in specials)
    again = self_sft_pairs(pairs, tiny_chat, seed=0, max_new_tokens=10)
    other = self_sft_pairs(pairs, tiny_chat, seed=5, max_new_tokens=10)
    assert [p.chosen for p in again.pairs] == [p.chosen for p in data.pairs]
    assert [p.chosen for p in other.pairs] != [p.chosen for p in data.pairs]
    # default length: the longest source chosen in the model's tokens
    default = self_sft_pairs(pairs[:2], tiny_chat, seed=0)
    assert default.info["max_new_tokens"] == max(tiny_chat.token_count(p.chosen) for p in pairs[:2])


# -- build_placebo -------------------------------------------------------------------------------------------------

def test_build_placebo_is_cached_keyed_and_valid(tmp_path, tiny_chat):
    src = tmp_path / "detox-abc.jsonl"
    write_pairs(source_pairs(20), src)
    cache = tmp_path / "cache"
    path = build_placebo("shuffled", src, None, seed=0, cache_dir=cache)
    assert path.parent == cache and path.name.startswith("shuffled-detox-") and path.suffix == ".jsonl"
    checked = check_pairs(path)
    assert not checked.problems and len(checked.pairs) == 20
    assert [p.meta["swapped"] for p in checked.pairs] == [expected_coin(0, f"p{i}") for i in range(20)]
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["pairs"] == 20 and info["context"] == "shuffled:detox" and info["key"]["seed"] == 0
    assert info["model"] is None and info["key"]["model"] is None

    stamp = path.stat().st_mtime_ns
    assert build_placebo("shuffled", src, None, seed=0, cache_dir=cache) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    elsewhere = build_placebo("shuffled", src, None, seed=0, cache_dir=tmp_path / "other")
    assert elsewhere.read_bytes() == path.read_bytes()  # the same seed: the same file
    reseeded = build_placebo("shuffled", src, None, seed=1, cache_dir=cache)
    assert reseeded != path and reseeded.read_bytes() != path.read_bytes()

    sft = build_placebo("self-sft", src, tiny_chat, seed=0, cache_dir=cache, model_id="tiny-a")
    rows = check_pairs(sft)
    assert not rows.problems and all(p.meta["placebo"] == "self-sft" for p in rows.pairs)
    assert json.loads(sft.with_suffix(".json").read_text())["key"]["model"] == "tiny-a"
    assert build_placebo("self-sft", src, tiny_chat, seed=0, cache_dir=cache, model_id="tiny-b") != sft

    write_pairs(source_pairs(21), src)  # the source changed: a new file
    changed = build_placebo("shuffled", src, None, seed=0, cache_dir=cache)
    assert changed != path and len(read_pairs(changed).pairs) == 21
    assert path.stat().st_mtime_ns == stamp  # the old entry is left as it was


def test_build_placebo_errors(tmp_path):
    src = tmp_path / "detox-abc.jsonl"
    write_pairs(source_pairs(3), src)
    with pytest.raises(ConfigError, match="unknown placebo"):
        build_placebo("scrambled", src, None, seed=0, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs a model"):
        build_placebo("self-sft", src, None, seed=0, cache_dir=tmp_path)
    with pytest.raises(DataError, match="build the source context first"):
        build_placebo("shuffled", tmp_path / "missing.jsonl", None, seed=0, cache_dir=tmp_path)
    placebo = build_placebo("shuffled", src, None, seed=0, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="already a placebo"):
        build_placebo("shuffled", placebo, None, seed=0, cache_dir=tmp_path / "cache")


def test_special_tokens_are_found_on_every_backend(tiny_model_dir):
    """Contexts drop replies holding a special token; the backends keep their tokenizer in `format`."""
    from dpolab.contexts.base import special_strings, usable
    from dpolab.models.generate import HFChatModel
    from dpolab.models.load import load_model

    specials = special_strings(HFChatModel(load_model(str(tiny_model_dir))))
    assert "<|im_end|>" in specials
    assert not usable("fine <|im_end|> then more", specials) and usable("fine", specials)
