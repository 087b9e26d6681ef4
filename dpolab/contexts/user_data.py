"""user-data: any preference file in TRL's format (or any format dpolab.data reads), used as it is.

Pairs keep their ids, scores, weights and meta; meta gains "context" and, if absent, "kind" = "user". No model runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from dpolab.contexts.base import ContextData, ContextSpec, cap, check_min
from dpolab.data.read import read_pairs
from dpolab.errors import ConfigError
from dpolab.models.chat import ChatModel
from dpolab.progress import Progress
from dpolab.banks import spread

NAME = "user-data"


@dataclass(frozen=True, kw_only=True)
class Options:
    """path: the preference file (.jsonl, .json, .parquet, .csv or a save_to_disk folder). Required.
    n_pairs: keep at most this many pairs (a seeded sample); None keeps all.
    skip_invalid: drop invalid rows (counted in info) instead of refusing the file.
    """

    path: str = ""
    n_pairs: int | None = None
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("context 'user-data' needs the option path (a preference file)")
        check_min("n_pairs", self.n_pairs, 1)


def build(model: ChatModel | None, *, options: Options, seed: int, limit: int | None = None,
          progress: Progress | None = None) -> ContextData:
    data = read_pairs(options.path, skip_invalid=options.skip_invalid)
    n = cap(options.n_pairs, limit)
    pairs = data.pairs
    if n is not None and n < len(pairs):
        pairs = spread(pairs, n, seed=seed, key=lambda p: ("", ""))
    for p in pairs:
        p.meta = {"kind": "user", **p.meta, "context": NAME}
        p.source = ""
    info = {"path": options.path, "rows": data.n_rows, "skipped_invalid": data.n_skipped, "pairs": len(pairs),
            "pairs_by_kind": {"user": len(pairs)}}
    return ContextData(pairs=pairs, info=info)


CONTEXT = ContextSpec(name=NAME, options=Options, build=build, needs_model=False, file_options=("path",))
