"""Checkpoints: trainable weights (safetensors), optimizer, scheduler, RNG and data position, written atomically."""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dpolab.io import atomic_dir

PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    step: int


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes: under LoRA the adapters, under freezing the unfrozen part."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))])
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(out: Path, step: int, *, model, optimizer, scheduler, extra: dict, keep: int) -> Path:
    """Write OUT/checkpoints/step-N atomically (temporary folder, then rename) and prune old ones."""
    final = Path(out) / "checkpoints" / f"{PREFIX}{step:07d}"
    with atomic_dir(final) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_meta, **extra}
        (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(out: Path) -> list[Checkpoint]:
    root = Path(out) / "checkpoints"
    found = []
    for p in root.glob(f"{PREFIX}*") if root.exists() else []:
        if (p / "state.json").exists():
            found.append(Checkpoint(p, int(p.name[len(PREFIX):])))
    return sorted(found, key=lambda c: c.step)


def load_checkpoint(ckpt: Checkpoint, *, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns the saved state (step, data position, ...)."""
    weights = load_file(ckpt.path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise RuntimeError(f"checkpoint {ckpt.path} does not match the model's trainable parameters: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    # weights_only: the optimizer file holds tensors and plain containers only; never unpickle arbitrary objects
    optimizer.load_state_dict(torch.load(ckpt.path / "optimizer.pt", weights_only=True, map_location="cpu"))
    state = json.loads((ckpt.path / "state.json").read_text(encoding="utf-8"))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(load_file(ckpt.path / "rng.safetensors"), state["rng"])
    return state
