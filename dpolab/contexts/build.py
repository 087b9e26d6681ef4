"""Building a context once: options checked, pairs built and validated, saved under a content hash and reused.

The cache key covers everything the pairs depend on: the context's name, its resolved options, the seed and limit,
the model's identity, the contents of every bank and user file it reads, where ideal replies come from, and
PAIRS_VERSION (bumped whenever pair construction changes). Same key, same file: a second build is a read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from dpolab.contexts import CONTEXTS
from dpolab.contexts import ideal as ideal_mod
from dpolab.contexts.base import ContextData, ContextSpec, run_build
from dpolab.data import check_pairs, write_pairs
from dpolab.data.schema import format_problems
from dpolab.errors import ConfigError, DataError
from dpolab.io import atomic_write, atomic_write_text
from dpolab.models.chat import ChatModel
from dpolab.progress import Progress
from dpolab.banks import asset

PAIRS_VERSION = 2  # 2: detox scores in toxicity points (100·(1 − toxicity))
HASH_CHARS = 16


def spec(name: str) -> ContextSpec:
    """The registered context, or a did-you-mean error listing every name."""
    return CONTEXTS.get(name)


def make_options(name: str, overrides: dict[str, Any] | None = None, *, quick: bool = False):
    """Typed options of a context: quick variant (if asked), then overrides; bad keys and values fail here."""
    return spec(name).make_options(overrides, quick=quick)


def build_pairs(name: str, model: ChatModel | None, *, options: dict[str, Any] | None = None, seed: int = 0,
                limit: int | None = None, quick: bool = False, progress: Progress | None = None) -> ContextData:
    """Build a context's pairs in memory (no cache)."""
    s = spec(name)
    opts = s.make_options(options, quick=quick)
    if limit is not None and limit < 1:
        raise ConfigError("limit must be at least 1")
    return run_build(s, model, options=opts, seed=seed, limit=limit, progress=progress)


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (a save_to_disk dataset) in name order."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    elif path.exists():
        h.update(path.read_bytes())
    else:
        raise DataError(f"{path} does not exist")
    return h.hexdigest()


def context_key(name: str, *, options, seed: int, limit: int | None, model_id: str | None) -> dict[str, Any]:
    """Everything the pairs depend on, as JSON-able data (its hash names the cache file)."""
    s = spec(name)
    values = dataclasses.asdict(options)
    files = {bank: file_digest(asset(bank)) for bank in s.banks}
    for module in s.generators:  # items generated in code, not read from a bank: the code's text is their content
        files[f"module:{module}"] = file_digest(importlib.util.find_spec(module).origin)
    for opt in s.file_options:
        if values.get(opt):
            files[f"option:{opt}"] = file_digest(values[opt])
    source = values.get("ideal", "templates")
    return {
        "context": name,
        "pairs_version": PAIRS_VERSION,
        "options": values,
        "seed": seed,
        "limit": limit,
        "model": model_id if s.needs_model else None,
        "files": files,
        "ideal": ideal_mod.identity(source) if s.uses_endpoint(options) else "templates",
    }


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:HASH_CHARS]


def build_context(name: str, model: ChatModel | None, *, options: dict[str, Any] | None = None, seed: int = 0,
                  cache_dir: str | Path, model_id: str | None = None, limit: int | None = None,
                  quick: bool = False, progress: Progress | None = None, rebuild: bool = False) -> Path:
    """Build (or reuse) a context's pairs; return the path of the TRL-format JSONL.

    The info dict (what the build saw, counts per kind, skips, build time, the cache key) is saved beside it as
    `<same name>.json` (see load_info). Files are written through a temporary file and renamed into place, under a
    lock, so concurrent builds of the same key build once and readers never see half a file.

    model_id: the model's identity in the cache key (e.g. a checkpoint hash); default the model's `name`. Two
        different weights under one name would share a cache entry, so pass a real fingerprint for trained models.
    quick: the context's small variant (its `quick` options), overridden by `options`.
    rebuild: ignore an existing cache entry.
    """
    from filelock import FileLock

    s = spec(name)
    opts = s.make_options(options, quick=quick)
    if limit is not None and limit < 1:
        raise ConfigError("limit must be at least 1")
    if s.needs_model and model is None:
        raise ConfigError(f"context {name!r} builds its pairs from the model's own outputs and needs a model")
    ident = model_id or (getattr(model, "name", None) if model is not None else None)
    key = context_key(name, options=opts, seed=seed, limit=limit, model_id=ident)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{key_hash(key)}"
    path, info_path = cache_dir / f"{stem}.jsonl", cache_dir / f"{stem}.json"
    with FileLock(str(cache_dir / f".{stem}.lock")):
        if path.exists() and info_path.exists() and not rebuild:
            return path
        start = time.perf_counter()
        data = run_build(s, model, options=opts, seed=seed, limit=limit, progress=progress)
        seconds = time.perf_counter() - start
        if not data.pairs:
            raise DataError(f"context {name!r} built no pairs ({json.dumps(data.info, default=str)[:500]}); "
                            "raise its sizes or check the model")
        save_built(path, data, f"context {name!r}", {"context": name, "model": ident, "seed": seed, "limit": limit,
                                                     "build_seconds": round(seconds, 2), "key": key})
    return path


def save_built(path: Path, data: ContextData, what: str, extra: dict[str, Any]) -> None:
    """Write built pairs to `path` and their info (data.info, then `extra`) beside it as .json, each atomically;
    pairs that fail validation are removed again and reported as a bug in dpolab."""
    atomic_write(path, lambda tmp: write_pairs(data.pairs, tmp), suffix=".jsonl")
    checked = check_pairs(path)
    if checked.problems:
        path.unlink()
        raise DataError(f"{what} built invalid pairs (a bug in dpolab):\n{format_problems(checked.problems)}")
    info = {**data.info, **extra, "pairs_file": path.name}
    atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=2, ensure_ascii=False, default=str) + "\n")


def load_info(path: str | Path) -> dict[str, Any]:
    """The info saved beside a built context's JSONL."""
    return json.loads(Path(path).with_suffix(".json").read_text(encoding="utf-8"))
