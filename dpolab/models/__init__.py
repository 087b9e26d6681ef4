"""Models: loading (built-in and Hugging Face), training modes (full, LoRA, frozen layers), generation and scoring."""
from dpolab.models.load import BUILTIN_MODELS, DEFAULT_MODEL, LoadedModel, dpolab_home, load_model, load_tokenizer, resolve_model

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "LoadedModel", "dpolab_home", "load_model", "load_tokenizer", "resolve_model"]
