"""Shared fixtures: a tiny random-weight chat model (no network), and the embedded model for `real_model` tests."""
from __future__ import annotations


import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder of a 2-layer random Llama with a byte-level ChatML tokenizer (pad id = end-of-turn id, as SmolLM2)."""
    from dpolab.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from dpolab.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def real_model_dir():
    """The embedded SmolLM2-135M-Instruct, converted once into $DPOLAB_HOME."""
    from dpolab.models.load import builtin_model_dir

    return builtin_model_dir("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach a model hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Every test starts from, and leaves, the same global torch state: several code paths set the thread count
    (`dpolab eval --threads 1`, a trainer with `threads`), and results must not depend on which test ran first."""
    import torch

    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    grad = torch.is_grad_enabled()
    precision = torch.get_float32_matmul_precision()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.set_float32_matmul_precision(precision)
    torch.use_deterministic_algorithms(deterministic)
