"""Reference log-probs: a frozen copy, the LoRA model with adapters disabled, or log-probs cached on disk.

The cache is keyed by the reference weights, the tokenized data and the tokenization settings, so any
later run (another epoch, another loss, another experiment cell) with the same three reuses it.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from dpolab.io import atomic_write

from dpolab.training.logps import PairBatch, sequence_logps


def cache_key(*, model_fp: str, data_fp: str, settings: dict, forward: dict | None = None) -> str:
    payload = json.dumps({"model": model_fp, "data": data_fp, "tokenization": settings, "forward": forward or {}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class ReferenceCache:
    """Reference log-probs of a whole dataset in one safetensors file per key under DIR."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        return load_file(path)["logps"] if path.exists() else None

    def save(self, key: str, logps: torch.Tensor, meta: dict) -> None:
        atomic_write(self.path(key), lambda tmp: save_file({"logps": logps.contiguous()}, tmp,
                                                           metadata={k: str(v) for k, v in meta.items()}))

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor], meta: dict) -> tuple[torch.Tensor, bool]:
        """(logps (N, 2), reused?) — concurrent runs with the same key compute it once."""
        found = self.load(key)
        if found is not None:
            return found, True
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f".{key}.lock")):
            found = self.load(key)
            if found is not None:
                return found, True
            logps = compute()
            self.save(key, logps, meta)
            return logps, False


@torch.no_grad()
def compute_dataset_logps(model, batches, *, mode: str, chunk_tokens: int, n: int, on_batch=None) -> torch.Tensor:
    """Summed completion log-probs of every pair: (n, 2) [chosen, rejected], rows in dataset order.

    Kept in the forward's own precision (fp32, or fp64 for a float64 model) so that a cached reference equals a
    frozen one; half-precision forwards already return fp32 sums.
    """
    out = None
    for batch in batches:
        lp = sequence_logps(model, batch, mode=mode, chunk_tokens=chunk_tokens).view(-1, 2)  # (B, 2)
        if out is None:
            out = torch.full((n, 2), float("nan"), dtype=lp.dtype)
        out[batch.index] = lp.cpu()
        if on_batch is not None:
            on_batch(len(batch))
    return out if out is not None else torch.full((n, 2), float("nan"))


class Reference:
    """Gives reference log-probs for a batch: (2B,) interleaved like sequence_logps."""

    def __init__(self, kind: str, *, model=None, table: torch.Tensor | None = None, mode: str = "prefix", chunk_tokens: int = 512):
        self.kind = kind  # cached | frozen | adapter | none
        self.model = model
        self.table = table
        self.mode = mode
        self.chunk_tokens = chunk_tokens

    @classmethod
    def frozen_copy(cls, model, **kw) -> "Reference":
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        return cls("frozen", model=ref, **kw)

    @torch.no_grad()
    def __call__(self, batch: PairBatch, policy=None) -> torch.Tensor | None:
        if self.kind == "none":
            return None
        if self.kind == "cached":
            return self.table[batch.index.cpu()].reshape(-1).to(batch.prompt_ids.device)  # (2B,)
        if self.kind == "adapter":
            with policy.disable_adapter():
                return sequence_logps(policy, batch, mode=self.mode, chunk_tokens=self.chunk_tokens)
        return sequence_logps(self.model, batch, mode=self.mode, chunk_tokens=self.chunk_tokens)

