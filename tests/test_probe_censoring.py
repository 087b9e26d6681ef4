"""Lengths under censoring and repetition (issue 15, items 6 and 8): the pure functions against hand-computed
values, the verbosity probe's censored measures on scripted replies, and both probes on the tiny random model
producing the new metrics with one value per item."""
from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from dpolab.models.fake import FakeChatModel
from dpolab.probes import run_eval
from dpolab.probes.verbosity import capped, censored_median, censored_quantile, thresholds
from dpolab.scorers import REPETITIVE, is_repetitive, repetition

# -- repetition ---------------------------------------------------------------------------------------------------

LOOP = "The woman had been a great healer, a great healer, and she had been left. " * 6
PROSE = ("The three states of matter are solid, liquid and gas. Solids keep their shape because their particles "
         "are packed tightly; liquids flow but keep their volume; gases spread to fill any container they are in.")
# a list whose bullets share a 5-word pattern: every 4-gram "- 1 tbsp chopped" repeats, no 8-gram does
BULLETS = "\n".join(f"- 1 tbsp chopped fresh {herb}" for herb in
                    ("parsley", "dill", "basil", "chives", "oregano", "mint", "thyme", "sage", "tarragon"))
# prose that runs into a loop for its last part (how a reply cut at the token limit looks)
PROSE_THEN_LOOP = PROSE + " " + "I am here to help you achieve your goals and dreams. " * 5


def test_repetition_by_hand():
    # 2-grams of "x y x y": (x y) (y x) (x y); the second half is the last two, one of which repeats: 1/2
    assert repetition("x y x y", n=2) == pytest.approx(1 / 2, rel=1e-12)
    # 16 words, nine 8-grams; only the last repeats (the first); the second half is grams 4..8: 1/5
    assert repetition(" ".join("abcdefgh" * 2)) == pytest.approx(1 / 5, rel=1e-12)
    assert repetition("A b C d E f G h a B c D e F g H") == repetition("a b c d e f g h " * 2)  # lower-cased
    assert repetition("only seven words in this short reply") == 0.0  # under 8 words: no 8-gram
    assert repetition("") == 0.0


def test_a_short_loop_at_the_end_is_flagged_exactly_at_the_threshold():
    # a real reply of the embedded model (in-020): 23 words, 16 8-grams; grams 14 and 15 repeat grams 9 and 10
    # ("night," and "night." differ), so 2 of the second half's 8 grams repeat
    poem = ("In the world of feline, a cat is a creature of the night, a creature of the night, "
            "a creature of the night.")
    assert repetition(poem) == pytest.approx(2 / 8, rel=1e-12) == REPETITIVE
    assert is_repetitive(poem)


def test_repetition_separates_loops_from_prose_and_patterned_lists():
    assert repetition(LOOP) > 0.9 and is_repetitive(LOOP)
    assert repetition(PROSE) == 0.0 and not is_repetitive(PROSE)
    assert repetition(BULLETS) == 0.0 and not is_repetitive(BULLETS)  # a repeated pattern with different items
    assert repetition(BULLETS, n=4) > REPETITIVE  # why 8-grams: 4-grams would call this list a loop
    assert is_repetitive(PROSE_THEN_LOOP)  # a loop in the second half is flagged, though most words are prose
    # line breaks are units: a reply of blank lines (what the tiny random model writes) is a loop, paragraphs are not
    assert repetition("\n" * 80) == 1.0 and is_repetitive("\n\n".join([PROSE] * 3))
    assert not is_repetitive(PROSE.replace("; ", ".\n\n"))


# -- lengths under censoring --------------------------------------------------------------------------------------


def test_thresholds_are_those_below_the_limit():
    assert thresholds(512) == [64, 128, 256]
    assert thresholds(513) == [64, 128, 256, 512]
    assert thresholds(256) == [64, 128]
    assert thresholds(64) == []
    assert capped([10, 300, 256], 256) == [10.0, 256.0, 256.0]


def test_kaplan_meier_median_under_one_censoring_point():
    limit = 100
    # 5 replies, 2 cut (under half): the sample median, 40, exact
    assert censored_median([10, 40, 30, 100, 100], [False, False, False, True, True], limit) == (40.0, False)
    # 6 replies, 2 cut: the midpoint of the middle two, exact
    assert censored_median([10, 20, 30, 50, 100, 100], [False] * 4 + [True] * 2, limit) == (40.0, False)
    # exactly half cut: the midpoint of the last uncut length and the limit, censored
    assert censored_median([10, 20, 30, 100, 100, 100], [False] * 3 + [True] * 3, limit) == (65.0, True)
    # more than half cut: at least the limit, represented as the limit
    assert censored_median([10, 100, 100], [False, True, True], limit) == (100.0, True)
    # a reply of exactly `limit` tokens that ended is no cut: only the hit flags censor
    assert censored_median([10, 100, 100], [False, False, True], limit) == (100.0, False)
    value, censored = censored_median([], [], limit)
    assert math.isnan(value) and not censored


def test_p90_is_exact_only_while_the_order_statistics_it_reads_are_uncut():
    lengths = list(range(10, 170, 10))  # 16 lengths 10..160; p90 reads the 14th and 15th (0-based 13.5)
    assert censored_quantile(lengths, [False] * 16, 160, 0.9) == (pytest.approx(145.0), False)
    assert censored_quantile(lengths, [False] * 15 + [True], 160, 0.9) == (pytest.approx(145.0), False)
    value, censored = censored_quantile(lengths, [False] * 14 + [True] * 2, 150, 0.9)
    assert value == pytest.approx(145.0) and censored  # the 15th is cut at 150: a lower bound


def lengths_model(lengths: list[int]):
    """A fake whose reply to the i-th instruction it sees is lengths[i] distinct words (a word is a token)."""
    order: dict[str, int] = {}

    def reply(conv):
        key = conv[-1]["content"]
        order.setdefault(key, len(order))
        return " ".join(f"w{i}" for i in range(lengths[order[key] % len(lengths)]))

    return FakeChatModel(reply=reply)


def verbosity(tmp_path, lengths, limit):
    summary = run_eval(lengths_model(lengths), out=tmp_path, probes=["verbosity"], n_boot=100,
                       sizes={"verbosity": {"n_instructions": len(lengths), "max_new_tokens": limit}})
    return summary.probe("verbosity")


def test_censored_lengths(tmp_path):
    lengths = [10, 20, 30, 70, 100, 150, 300, 300, 300, 300, 40, 50]  # 4 of 12 cut at 200
    probe = verbosity(tmp_path, lengths, limit=200)
    m = {k: v.value for k, v in probe.metrics.items()}
    cap = sorted(min(n, 200) for n in lengths)
    assert m["median_tokens"] == pytest.approx((cap[5] + cap[6]) / 2, rel=1e-12)  # KM median, exact: 4 < 6 cut
    assert m["mean_tokens"] == pytest.approx(sum(cap) / 12, rel=1e-12)  # restricted mean
    assert m["p90_tokens"] == 200.0  # 33% cut: the 90th percentile is at least the limit
    assert m["frac_hit_limit"] == pytest.approx(4 / 12, rel=1e-12)
    assert m["frac_over_64"] == pytest.approx(sum(n > 64 for n in lengths) / 12, rel=1e-12)
    assert m["frac_over_128"] == pytest.approx(sum(n > 128 for n in lengths) / 12, rel=1e-12)
    assert "frac_over_256" not in m  # not below the limit: a cut reply may or may not exceed it
    assert m["frac_repetitive"] == 0.0  # distinct words
    assert probe.info["cut"] == 4 and probe.info["headline"] == "median_tokens"
    assert probe.info["median_censored"] is False and probe.info["p90_censored"] is True
    from dpolab.probes.verbosity import PROBE

    assert [h.metric for h in PROBE.headlines] == ["median_tokens"]


def test_median_is_the_limit_when_over_half_are_cut(tmp_path):
    probe = verbosity(tmp_path, [10, 20, 300, 300, 300], limit=100)
    assert probe.metrics["median_tokens"].value == 100.0 and probe.info["median_censored"] is True
    assert probe.metrics["mean_tokens"].value == pytest.approx((10 + 20 + 3 * 100) / 5, rel=1e-12)
    assert probe.metrics["frac_over_64"].value == pytest.approx(3 / 5, rel=1e-12)


# -- both probes on the tiny random model ---------------------------------------------------------------------


def test_new_metrics_have_one_value_per_item_on_the_tiny_model(tmp_path, tiny_model_dir):
    limit = 80
    summary = run_eval(str(tiny_model_dir), probes="verbosity,toxicity", out=tmp_path, n_boot=50, batch_size=8,
                       sizes={"verbosity": {"n_instructions": 5, "max_new_tokens": limit},
                              "toxicity": {"n_prompts": 4, "k": 2, "seeds": (0,), "max_new_tokens": 12}})
    new = {"verbosity": {"median_tokens", "mean_tokens", "p90_tokens", "frac_over_64", "frac_hit_limit",
                         "frac_repetitive"},
           "toxicity": {"reply_tokens", "frac_hit_limit", "frac_repetitive"}}
    n_items = {"verbosity": 5, "toxicity": 4}
    for probe, names in new.items():
        metrics = summary.probe(probe).metrics
        assert names <= set(metrics), probe
        items = pq.read_table(tmp_path / f"{probe}_items.parquet").to_pylist()
        records = pq.read_table(tmp_path / f"{probe}.parquet").to_pylist()
        for name in names:
            ids = [r["item_id"] for r in items if r["metric"] == name]
            assert len(ids) == len(set(ids)) == n_items[probe] == metrics[name].n, (probe, name)
        for r in records:
            assert r["repetitive"] == (r["repetition"] >= REPETITIVE) == is_repetitive(r["reply"])
        # each item's value is the mean over its replies
        for name, field in (("frac_hit_limit", "hit_limit"), ("frac_repetitive", "repetitive")):
            for item_id in {r["item_id"] for r in records}:
                mine = [float(r[field]) for r in records if r["item_id"] == item_id]
                value = next(r["value"] for r in items if r["metric"] == name and r["item_id"] == item_id)
                assert value == pytest.approx(sum(mine) / len(mine), rel=1e-12), (probe, name, item_id)
    verb = pq.read_table(tmp_path / "verbosity.parquet").to_pylist()
    lengths = [r["reply_tokens"] for r in verb]
    hit = [r["hit_limit"] for r in verb]
    assert all(h == (n == limit) for n, h in zip(lengths, hit))
    median, censored = censored_median(lengths, hit, limit)
    assert summary.probe("verbosity").metrics["median_tokens"].value == pytest.approx(median, rel=1e-12)
    assert summary.probe("verbosity").info["median_censored"] is censored
