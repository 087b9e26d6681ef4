"""Models: loading (built-in and Hugging Face), training modes (full, LoRA, frozen layers), and inference behind the
`ChatModel` protocol on a choice of backends (`dpolab.models.backends`: hf, ctranslate2, vllm)."""
from dpolab.models.load import BUILTIN_MODELS, DEFAULT_MODEL, LoadedModel, dpolab_home, load_model, load_tokenizer, resolve_model

_LAZY = {  # these import torch and transformers' generation utilities: loaded on first use
    "ChatModel": "dpolab.models.chat", "ChatFormat": "dpolab.models.chat", "Generation": "dpolab.models.chat",
    "HFChatModel": "dpolab.models.generate", "PrefixCache": "dpolab.models.generate",
    "chat_model": "dpolab.models.backends",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "LoadedModel", "dpolab_home", "load_model", "load_tokenizer", "resolve_model",
           *_LAZY]
