"""Training modes: full fine-tuning, LoRA adapters (peft), or full fine-tuning with the lowest k layers frozen."""
from __future__ import annotations

import torch

from dpolab.errors import ConfigError


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a causal LM (Llama, Qwen, Mistral, GPT-2, ...)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, getattr(inner, "base_model_prefix", "model"), inner)
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ConfigError(f"cannot find the decoder layers of {type(inner).__name__} to freeze")


def freeze_lowest_layers(model: torch.nn.Module, k: int) -> None:
    """Freeze the input embeddings and the lowest k decoder layers; everything above keeps training.

    With tied input/output embeddings (SmolLM2) the LM head is the embedding matrix, so it freezes too.
    """
    layers = decoder_layers(model)
    if k > len(layers):
        raise ConfigError(f"freeze_layers={k} but the model has only {len(layers)} layers")
    model.get_input_embeddings().requires_grad_(False)
    for layer in layers[:k]:
        layer.requires_grad_(False)


def add_lora(model: torch.nn.Module, *, r: int, alpha: float, dropout: float, targets: list[str] | str):
    """Wrap the model with LoRA adapters; base weights freeze. targets: module names or "all-linear"."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"cannot add LoRA adapters: {exc}") from None


def prepare_for_training(model: torch.nn.Module, *, lora: bool = False, lora_r: int = 16, lora_alpha: float = 32.0,
                         lora_dropout: float = 0.0, lora_targets: list[str] | str = "all-linear",
                         freeze_layers: int = 0) -> torch.nn.Module:
    """Apply the training mode; returns the model to optimise (a PeftModel under LoRA)."""
    if lora and freeze_layers:
        raise ConfigError("choose either lora or freeze_layers, not both")
    if lora:
        return add_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
    model.requires_grad_(True)
    if freeze_layers:
        freeze_lowest_layers(model, freeze_layers)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
