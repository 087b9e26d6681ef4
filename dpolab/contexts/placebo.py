"""Placebo controls for a context: the same amount of training on the same kind of data, without the preference.

Training on a context's pairs changes behaviour through two things at once: the preference signal (chosen over
rejected) and simply being trained on these prompts and the model's own samples. A placebo keeps the second and
removes the first, so the difference between a real cell and its placebo is the effect of the preference. Two are
built from a real context's pairs file (the one `build_context` wrote):

- `shuffled:<context>`: the same pairs, with chosen and rejected swapped by a fair coin per pair, trained with the
  same loss and the same number of steps. Prompts, texts, lengths, weights and row count are the real cell's; the
  direction of the preference is noise.
  The coin is drawn from (seed, pair id): a numpy Generator seeded by sha256(f"{seed}\\0{id}") gives one fair bit
  (`coin`). It does not depend on the pair's position or on the other pairs, so a pair keeps its coin when the
  file is reordered, cut by --limit or extended, and two runs of a context that share pairs share their swaps.
  Scores stay with their position: a swapped pair keeps score_chosen above score_rejected, so a loss that reads
  the score gap (ODPO) asks for the same offset as on the real pair, only now in a random direction: the
  magnitude of each preference is kept, its direction is noise. (Moving scores with their texts would make half
  the gaps negative, which ODPO refuses, or, with clamp=True, trains the swapped half as DPO and the rest as
  ODPO: an asymmetric control.) meta["swapped"] says which pairs were turned.
- `self-sft:<context>`: supervised fine-tuning (the `sft` loss) on one reply sampled from the base model for each
  source pair's prompt: the same prompts, in the same order, one row per source pair, so the same batches make the
  same number of steps. It measures the effect of training on the model's own outputs with no preference at all.
  Samples are drawn at temperature 1.0 with no top-k/top-p cut (the ChatModel protocol has no top-p; the hf
  backend samples from the full distribution), in one seeded `generate` call, with max_new_tokens defaulting to
  the token length of the longest source chosen. A sample that is blank or holds a special token is drawn again
  once (seed + 1); if still unusable its row is dropped and counted in info["unusable"] (ids in
  info["unusable_ids"]) for the caller to report. It is never replaced by the source's chosen, which would bring
  the preferred reply (the preference signal) back into the control.
  The rows are pairs only because the trainer reads pairs: `sft` uses the chosen alone. The rejected is a filler
  the schema requires (non-empty, different from the chosen): the source pair's rejected, or its chosen when the
  sample happens to equal the rejected (on-policy contexts' rejected replies are base-model samples too). meta
  says so ("rejected": "unused filler ...").

Both are cached like a context (dpolab.contexts.build): `<cache_dir>/<kind>-<source>-<hash>.jsonl` with the info
beside it as `.json`, the hash covering the kind, the seed, the source file's sha256, the model (self-sft only) and
PLACEBO_VERSION; written atomically under a file lock, reused when present.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpolab.contexts.base import ContextData, special_strings, usable
from dpolab.contexts.build import save_built
from dpolab.data import read_pairs
from dpolab.data.schema import PreferencePair
from dpolab.data.tokenization import EMPHASIS_KEY
from dpolab.errors import ConfigError, DataError

if TYPE_CHECKING:
    from dpolab.models.chat import ChatModel
    from dpolab.progress import Progress

PLACEBOS = ("shuffled", "self-sft")
PLACEBO_VERSION = 2  # bump whenever placebo construction changes (2: scores stay with the position)
HASH_CHARS = 16
SELF_SFT_MAX_TOKENS = 256  # the sample length cap when the model cannot count tokens
SELF_SFT_TEMPERATURE = 1.0


def check_kind(kind: str) -> None:
    if kind not in PLACEBOS:
        raise ConfigError(f"unknown placebo {kind!r}; choose from {', '.join(PLACEBOS)}")


def placebo_name(kind: str, source: str) -> str:
    """The placebo's context name: placebo_name("shuffled", "detox") == "shuffled:detox"."""
    check_kind(kind)
    if not source or ":" in source:
        raise ConfigError(f"a placebo is built from a real context, got {source!r}")
    return f"{kind}:{source}"


def parse_placebo(context: str) -> tuple[str, str] | None:
    """("shuffled", "detox") for "shuffled:detox"; None for a real context (no ":"); ConfigError otherwise."""
    kind, sep, source = context.partition(":")
    if not sep:
        return None
    if kind not in PLACEBOS or not source or ":" in source:
        raise ConfigError(f"{context!r} is not a placebo context: write <placebo>:<context> with <placebo> one of "
                          f"{', '.join(PLACEBOS)} and <context> a real context, e.g. shuffled:detox")
    return kind, source


def coin(seed: int, pair_id: str) -> bool:
    """The fair coin of one pair under `seed` (True: swap chosen and rejected), whatever else is in the file:
    one draw of a numpy Generator seeded by the first 8 bytes (little-endian) of sha256(f"{seed}\\0{pair_id}")."""
    digest = hashlib.sha256(f"{seed}\x00{pair_id}".encode()).digest()
    return bool(np.random.default_rng(int.from_bytes(digest[:8], "little")).integers(2))


def source_context(pairs: list[PreferencePair]) -> str:
    """The one real context the pairs come from (their meta["context"]); DataError if none, several or a placebo."""
    if not pairs:
        raise DataError("a placebo needs the source context's pairs; got none")
    names = sorted({str(p.meta.get("context") or "") for p in pairs})
    if names == [""]:
        raise DataError("the source pairs have no meta['context']; build them with build_context")
    if len(names) > 1:
        raise DataError(f"the source pairs mix contexts ({', '.join(repr(n) for n in names)}); "
                        "a placebo is built from one context's pairs")
    if ":" in names[0]:
        raise DataError(f"the source pairs are already a placebo ({names[0]!r}); build it from the real context")
    return names[0]


def shuffle_pairs(pairs: list[PreferencePair], *, seed: int) -> ContextData:
    """The pairs with chosen and rejected texts swapped where coin(seed, id) says so; scores stay with the position.

    Ids, prompts, weights, scores and order are kept; meta gains placebo, source_context and swapped, and its
    context becomes "shuffled:<source>". info: placebo, source_context, pairs, swapped.
    """
    source = source_context(pairs)
    name = placebo_name("shuffled", source)
    out = []
    for p in pairs:
        swap = coin(seed, p.id)
        meta = {**p.meta, "context": name, "placebo": "shuffled", "source_context": source, "swapped": swap}
        if swap:
            spans = meta.get(EMPHASIS_KEY)
            if spans:  # emphasis spans are character offsets into a text: they go where their text goes
                meta[EMPHASIS_KEY] = {{"chosen": "rejected", "rejected": "chosen"}.get(k, k): v for k, v in spans.items()}
            out.append(replace(p, chosen=p.rejected, rejected=p.chosen, meta=meta, source=""))
        else:
            out.append(replace(p, meta=meta, source=""))
    info = {"placebo": "shuffled", "source_context": source, "pairs": len(out),
            "swapped": sum(p.meta["swapped"] for p in out)}
    return ContextData(pairs=out, info=info)


def default_max_new_tokens(pairs: list[PreferencePair], model: ChatModel) -> int:
    """The token length of the longest source chosen (at least 1), or SELF_SFT_MAX_TOKENS if the model cannot
    count tokens."""
    count = getattr(model, "token_count", None)
    if not callable(count):
        return SELF_SFT_MAX_TOKENS
    return max([1] + [count(p.chosen) for p in pairs])


def self_sft_pairs(pairs: list[PreferencePair], model: ChatModel, *, seed: int, max_new_tokens: int | None = None,
                   progress: Progress | None = None) -> ContextData:
    """One reply of `model` sampled for each source pair's prompt, as the chosen of an SFT row, in source order.

    max_new_tokens: default the token length of the longest source chosen (default_max_new_tokens).
    Unusable samples (blank, or holding a special token) are drawn again once with seed + 1, then dropped and
    counted (see the module docstring). info: placebo, source_context, pairs, unusable, unusable_ids, resampled,
    hit_limit (kept samples stopped by max_new_tokens), max_new_tokens, temperature.
    """
    from dpolab.progress import NullProgress

    source = source_context(pairs)
    name = placebo_name("self-sft", source)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(pairs, model)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    specials = special_strings(model)
    task = (progress or NullProgress()).task(f"placebo self-sft: {len(pairs)} samples", total=1)
    convs = [[dict(m) for m in p.prompt] for p in pairs]
    gens = list(model.generate(convs, max_new_tokens=max_new_tokens, do_sample=True,
                               temperature=SELF_SFT_TEMPERATURE, seed=seed))
    retry = [i for i, g in enumerate(gens) if not usable(g.text, specials)]
    if retry:
        again = model.generate([convs[i] for i in retry], max_new_tokens=max_new_tokens, do_sample=True,
                               temperature=SELF_SFT_TEMPERATURE, seed=seed + 1)
        for i, g in zip(retry, again):
            gens[i] = g
    task.advance()
    out, dropped = [], []
    for p, g in zip(pairs, gens):
        if not usable(g.text, specials):
            dropped.append(p.id)
            continue
        filler = p.rejected if g.text != p.rejected else p.chosen
        out.append(PreferencePair(
            id=f"{p.id}/self-sft", prompt=[dict(m) for m in p.prompt], chosen=g.text, rejected=filler,
            weight=p.weight,
            meta={"context": name, "kind": "self-sft", "placebo": "self-sft", "source_context": source,
                  "source_id": p.id, "source_kind": p.meta.get("kind"),
                  "rejected": "unused filler (the sft loss trains on the chosen, the model's sample, alone): "
                              + ("the source pair's rejected" if filler is p.rejected else
                                 "the source pair's chosen, as the sample equals its rejected")}))
    info = {"placebo": "self-sft", "source_context": source, "pairs": len(out), "unusable": len(dropped),
            "unusable_ids": dropped, "resampled": len(retry),
            "hit_limit": sum(1 for g in gens if usable(g.text, specials) and g.hit_limit),
            "max_new_tokens": max_new_tokens, "temperature": SELF_SFT_TEMPERATURE}
    return ContextData(pairs=out, info=info)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def placebo_key(kind: str, *, seed: int, source_sha256: str, model_id: str | None) -> dict[str, Any]:
    """Everything a placebo depends on, as JSON-able data (its hash names the cache file)."""
    return {"placebo": kind, "placebo_version": PLACEBO_VERSION, "seed": seed, "source_sha256": source_sha256,
            "model": model_id if kind == "self-sft" else None}


def build_placebo(kind: str, source_path: str | Path, model: ChatModel | None, *, seed: int, cache_dir: str | Path,
                  model_id: str | None = None, progress: Progress | None = None) -> Path:
    """Build (or reuse) the `kind` placebo of the pairs at `source_path` (a file build_context returned); return the
    path of its JSONL. The info (what the build saw and decided, the cache key) is saved beside it as
    `<same name>.json`.

    model: the base model (self-sft samples from it); may be None for shuffled.
    model_id: the model's identity in the cache key (self-sft only); default the model's `name`. As for
        build_context, pass a real fingerprint when two sets of weights share a name.
    """
    from filelock import FileLock

    check_kind(kind)
    source_path = Path(source_path)
    if not source_path.is_file():
        raise DataError(f"{source_path} is not a pairs file: build the source context first (build_context)")
    if kind == "self-sft" and model is None:
        raise ConfigError("the self-sft placebo samples the base model's own replies and needs a model")
    ident = (model_id or getattr(model, "name", None)) if kind == "self-sft" else None
    pairs = read_pairs(source_path).pairs
    source = source_context(pairs)
    key = placebo_key(kind, seed=seed, source_sha256=_sha256(source_path), model_id=ident)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:HASH_CHARS]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', source)}-{digest}"
    path, info_path = cache_dir / f"{stem}.jsonl", cache_dir / f"{stem}.json"
    with FileLock(str(cache_dir / f".{stem}.lock")):
        if path.exists() and info_path.exists():
            return path
        start = time.perf_counter()
        if kind == "shuffled":
            data = shuffle_pairs(pairs, seed=seed)
        else:
            data = self_sft_pairs(pairs, model, seed=seed, progress=progress)
        if not data.pairs:
            raise DataError(f"the {kind} placebo of {source_path.name} has no rows "
                            f"({json.dumps(data.info, default=str)[:500]})")
        save_built(path, data, f"the {kind} placebo of {source_path.name}",
                   {"context": placebo_name(kind, source), "model": ident, "seed": seed, "source_file": str(source_path),
                    "build_seconds": round(time.perf_counter() - start, 2), "key": key})
    return path
