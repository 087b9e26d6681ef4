"""Models: loading (built-in and Hugging Face), training modes (full, LoRA, frozen layers), generation and scoring."""
from dpolab.models.load import BUILTIN_MODELS, DEFAULT_MODEL, LoadedModel, dpolab_home, load_model, load_tokenizer, resolve_model

_GENERATE = ("ChatModel", "Generation", "HFChatModel", "PrefixCache")


def __getattr__(name: str):
    # The generation backend imports torch and transformers' generation utilities: loaded on first use.
    if name in _GENERATE:
        from dpolab.models import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "LoadedModel", "dpolab_home", "load_model", "load_tokenizer", "resolve_model",
           *_GENERATE]
