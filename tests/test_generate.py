"""HFChatModel on the tiny random model: batching, stopping, seeding, scoring and the prefix cache.

The model runs in true float64 (tests/exact.py): scores that claim the same mathematics agree to 1e-9 relative,
and greedy transcripts that must be identical can't be flipped by a near-tie in fp32 rounding.
"""
from __future__ import annotations

import pytest
import torch

from dpolab.models import scoring
from dpolab.models.generate import ChatModel, Generation, HFChatModel, PrefixCache, end_of_turn_id
from tests.exact import RTOL, load_float64

CONVS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is the capital of France? Answer briefly please."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c?"}],
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_float64(tiny_model_dir)


def test_end_of_turn_is_im_end(loaded):
    assert end_of_turn_id(loaded.tokenizer) == loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_satisfies_protocol(loaded):
    assert isinstance(HFChatModel(loaded), ChatModel)


def test_batched_greedy_equals_one_at_a_time(loaded):
    batched = HFChatModel(loaded, batch_size=3, prefix_cache_bytes=0).generate(CONVS, max_new_tokens=12)
    single = HFChatModel(loaded, batch_size=1, prefix_cache_bytes=0)
    assert batched == [single.generate([c], max_new_tokens=12)[0] for c in CONVS]
    assert all(isinstance(g, Generation) for g in batched)


def test_stops_at_end_of_turn_and_flags_the_limit(loaded):
    model = HFChatModel(loaded, prefix_cache_bytes=0)
    fmt = model.format
    eot = fmt.end_of_turn_id
    # A reply that hits the limit is flagged; one that ends at the end-of-turn token is not, and drops it.
    assert fmt.reply([5, 6, 7], 3) == Generation(text=fmt.tokenizer.decode([5, 6, 7]), n_tokens=3, hit_limit=True)
    done = fmt.reply([5, eot, eot], 3)
    assert done.n_tokens == 1 and not done.hit_limit and "<|im_end|>" not in done.text
    for g in model.generate(CONVS, max_new_tokens=6):
        assert g.n_tokens <= 6 and g.hit_limit == (g.n_tokens == 6)


def test_forcing_the_end_of_turn_token_stops_generation(loaded):
    model = HFChatModel(loaded, prefix_cache_bytes=0)
    with torch.no_grad():  # make the end-of-turn token the argmax everywhere
        bias = torch.zeros(loaded.model.config.vocab_size)
        bias[model.format.end_of_turn_id] = 1e4
        handle = loaded.model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        out = model.generate(CONVS, max_new_tokens=8)
    finally:
        handle.remove()
    assert [g.n_tokens for g in out] == [0, 0, 0] and not any(g.hit_limit for g in out)


def test_sampling_is_seeded_and_leaves_global_rng_alone(loaded):
    model = HFChatModel(loaded, prefix_cache_bytes=0)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = model.generate(CONVS, max_new_tokens=10, do_sample=True, seed=7)
    assert torch.equal(before, torch.random.get_rng_state())
    b = model.generate(CONVS, max_new_tokens=10, do_sample=True, seed=7)
    c = model.generate(CONVS, max_new_tokens=10, do_sample=True, seed=8)
    assert a == b
    assert a != c


def _manual_logprob(loaded, model: HFChatModel, conv, text) -> float:
    prompt = model.format.prompt_ids(conv)
    cont = model.format.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logps = loaded.model(input_ids=ids).logits[0, :-1].log_softmax(-1)  # (T-1, V)
    return float(sum(logps[len(prompt) - 1 + j, t] for j, t in enumerate(cont)))


def test_continuation_scores_match_an_unpadded_forward(loaded):
    model = HFChatModel(loaded, prefix_cache_bytes=0, score_batch_size=4)
    # the second and third share a head that runs once with the prompt; "yes" and "yes!" share all but one token
    conts = [["The answer is Paris.", "No"], ["The answer is Rome.", "The answer is Berlin, surely."],
             ["yes", "yes!", "The answer is x."]]
    got = model.score_continuations(CONVS, conts)
    for conv, texts, row in zip(CONVS, conts, got):
        for text, value in zip(texts, row):
            assert value == pytest.approx(_manual_logprob(loaded, model, conv, text), rel=RTOL)


@pytest.mark.parametrize("block", [True, False])
def test_grouped_and_flat_scoring_agree(loaded, block):
    """Both ways of running the tails (side by side under a block mask, or on cache copies) equal running every
    prompt + continuation in full; tails of different lengths, one of a single token, a different count per prompt."""
    assert loaded.model.config._attn_implementation == "sdpa"  # the default path is the block mask
    model = HFChatModel(loaded, prefix_cache_bytes=0)
    prompts = [model.format.prompt_ids(c) for c in CONVS]
    texts = [["The answer is A.", "The answer is B, surely."], ["The answer is A.", "The answer is C", "The answer is Q!"],
             ["no", "yes, it is", "x"]]
    conts = [[model.format.ids(t) for t in row] for row in texts]
    grouped = scoring.grouped_continuation_logprobs(loaded.model, prompts, conts, pad_id=model.format.pad_id, batch_size=2,
                                                    block=block)
    flat = scoring.continuation_logprobs(loaded.model, [p for p, cs in zip(prompts, conts) for _ in cs],
                                         [c for cs in conts for c in cs], pad_id=model.format.pad_id, batch_size=3)
    assert [x for row in grouped for x in row] == pytest.approx(flat, rel=RTOL)


def test_next_token_logprobs_match_a_full_softmax(loaded):
    model = HFChatModel(loaded, prefix_cache_bytes=0)
    got = model.next_token_logprobs(CONVS, ["A", "B", "C"])
    ids = model.format.candidate_ids(["A", "B", "C"])
    for conv, row in zip(CONVS, got):
        with torch.no_grad():
            logps = loaded.model(input_ids=torch.tensor([model.format.prompt_ids(conv)])).logits[0, -1].log_softmax(-1)
        assert row == pytest.approx([float(logps[i]) for i in ids], rel=RTOL)


def test_candidates_must_be_single_distinct_tokens(loaded):
    model = HFChatModel(loaded)
    with pytest.raises(ValueError, match="not one"):
        model.format.candidate_ids(["AB"])  # two bytes, two tokens in the byte-level tokenizer


def test_prefix_cache_gives_the_same_dialogue(loaded):
    """A multi-turn dialogue with the prefix cache on matches one recomputed from scratch every turn."""
    cached = HFChatModel(loaded, batch_size=2)
    plain = HFChatModel(loaded, batch_size=1, prefix_cache_bytes=0)
    assert cached.cache is not None
    ha = [list(c) for c in CONVS]
    hb = [list(c) for c in CONVS]
    for turn in range(3):
        ga = cached.generate(ha, max_new_tokens=8)
        gb = [plain.generate([h], max_new_tokens=8)[0] for h in hb]
        assert [g.text for g in ga] == [g.text for g in gb]
        check_a = [h + [{"role": "assistant", "content": g.text}, {"role": "user", "content": "sure?"}]
                   for h, g in zip(ha, ga)]
        check_b = [h + [{"role": "assistant", "content": g.text}, {"role": "user", "content": "sure?"}]
                   for h, g in zip(hb, gb)]
        sa = cached.score_continuations(check_a, [["yes", "no"]] * 3)
        sb = plain.score_continuations(check_b, [["yes", "no"]] * 3)
        assert [x for r in sa for x in r] == pytest.approx([x for r in sb for x in r], rel=RTOL)
        la = cached.next_token_logprobs(check_a, ["A", "B"])
        lb = plain.next_token_logprobs(check_b, ["A", "B"])
        assert [x for r in la for x in r] == pytest.approx([x for r in lb for x in r], rel=RTOL)
        ha, hb = check_a, check_b
    assert cached.cache.hits > cached.cache.misses  # later turns ran mostly from the cache


def test_prefix_cache_longest_prefix_eviction_and_budget():
    kv = lambda n: [(torch.zeros(1, n, 2), torch.zeros(1, n, 2))]  # noqa: E731  # 16 bytes per token
    cache = PrefixCache(max_bytes=16 * 10)
    cache.add([1, 2, 3], kv(3))
    cache.add([1, 2, 3, 4, 5], kv(5))  # extends the first: the first is dropped
    assert len(cache) == 1
    hit = cache.lookup([1, 2, 3, 4, 9, 9])
    assert hit is not None and hit.length == 4
    assert cache.lookup([1, 2, 3, 4, 5]).length == 4  # always leaves one token to run
    assert cache.lookup([7, 8]) is None
    cache.add([7, 8, 9, 10, 11], kv(5))  # 10 tokens fit
    cache.add([20, 21], kv(2))  # over budget: the least recently used ([1..5]) goes
    assert cache.lookup([1, 2, 3, 4, 5, 6]) is None
    assert cache.lookup([7, 8, 9, 0]).length == 3


def test_growing_cache_matches_dynamic_cache(loaded):
    """The in-place cache holds exactly what DynamicCache's concatenation holds, through updates that outgrow its
    spare room, a crop and a batch selection."""
    from transformers import DynamicCache

    config = loaded.model.config
    grow, plain = scoring.growing_cache(config), DynamicCache(config=config)
    torch.manual_seed(0)
    H, D = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    B = 2
    for step, n in enumerate([5, 1, 1, 70, 1, 3]):
        kv = [(torch.randn(B, H, n, D), torch.randn(B, H, n, D)) for _ in grow.layers]
        for i, (k, v) in enumerate(kv):
            a, b = grow.layers[i].update(k, v), plain.layers[i].update(k, v)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        if step == 2:
            grow.crop(-2), plain.crop(-2)
        if step == 4:
            idx = torch.tensor([1])
            grow.batch_select_indices(idx), plain.batch_select_indices(idx)
            B = 1
    assert grow.get_seq_length() == plain.get_seq_length() == 5 + 1 + 1 - 2 + 70 + 1 + 3
    for g, p in zip(grow.layers, plain.layers):
        assert torch.equal(g.keys, p.keys) and torch.equal(g.values, p.values)


def test_generation_with_the_growing_cache_is_unchanged(loaded):
    fast = HFChatModel(loaded, batch_size=3)
    slow = HFChatModel(loaded, batch_size=3)
    slow.grow_in_place, slow.cache = False, None
    assert fast.grow_in_place
    history_a = [list(c) for c in CONVS]
    history_b = [list(c) for c in CONVS]
    for _ in range(2):  # the second turn starts from the prefix cache
        ga = fast.generate(history_a, max_new_tokens=10)
        gb = slow.generate(history_b, max_new_tokens=10)
        assert ga == gb
        history_a = [h + [{"role": "assistant", "content": g.text}, {"role": "user", "content": "and?"}]
                     for h, g in zip(history_a, ga)]
        history_b = [h + [{"role": "assistant", "content": g.text}, {"role": "user", "content": "and?"}]
                     for h, g in zip(history_b, gb)]


def test_shared_prefixes_are_the_longest_and_leave_each_prompt_a_token():
    from dpolab.models.generate import shared_prefixes

    a, b = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7]
    c, d = [9, 9, 9, 1], [9, 9, 9, 2]
    assert shared_prefixes([a, c, b, d, [5]], 3) == [[1, 2, 3, 4], [9, 9, 9]]
    assert shared_prefixes([a, c, b, d], 4) == [[1, 2, 3, 4]]  # [9, 9, 9] is shorter than asked
    assert shared_prefixes([a, a], 2) == [a[:-1]]  # identical prompts keep their last token to run
    # a prefix that is the start of a longer shared one is left out: the cache serves it from the longer one
    assert shared_prefixes([[1, 2, 3, 8], [1, 2, 3, 9], [1, 2, 7]], 2) == [[1, 2, 3]]


def test_shared_prompt_prefixes_run_once_and_score_the_same(loaded):
    """Prompts sharing a long start (one vignette, several questions): the start runs once into the cache and
    every score equals the one computed without any cache, in float64."""
    from dpolab.models import generate

    story = "Sam has felt low for weeks, sleeps badly and has stopped seeing friends. " * 2
    convs = [[{"role": "user", "content": story + q}] for q in ("Would you work with Sam?", "Is Sam dangerous?",
                                                                  "Would you rent Sam a room?")]
    convs.append([{"role": "user", "content": "Something else entirely, with no long start in common."}])
    cached = HFChatModel(loaded, score_batch_size=2)
    plain = HFChatModel(loaded, prefix_cache_bytes=0)
    texts = [["yes", "no, never"]] * len(convs)
    got, want = cached.score_continuations(convs, texts), plain.score_continuations(convs, texts)
    assert [x for r in got for x in r] == pytest.approx([x for r in want for x in r], rel=RTOL)
    shared = len(cached.format.prompt_ids([{"role": "user", "content": story}])) - 2  # up to the story's end
    assert len(cached.cache) == 1 and cached.cache.hits >= 3 * shared >= 3 * generate.SHARED_MIN_TOKENS
    got = cached.next_token_logprobs(convs, ["A", "B"])  # served by the same entry
    want = plain.next_token_logprobs(convs, ["A", "B"])
    assert [x for r in got for x in r] == pytest.approx([x for r in want for x in r], rel=RTOL)
