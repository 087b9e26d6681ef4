"""Float64 that is float64 throughout: the norms transformers computes in float32 whatever the model's dtype.

Llama-family RMSNorm casts its input to float32 before normalising, a choice made for half precision. In a float64
model it is a downcast: gradients then carry fp32 rounding (about 1e-8 relative), so two computations of the same
mathematics no longer agree to float64 precision, and an error of that size can hide. Asking dpolab for float64
gives the same norm computed in the input's dtype.
"""
from __future__ import annotations

import types

import torch


def _rms_norm_in_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _is_llama_rms_norm(module: torch.nn.Module) -> bool:
    """The Llama norm or a copy of it (Mistral, Qwen2, ... share its code); norms with other maths (Gemma's
    1 + weight) are left alone."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    return code is not None and code.co_code == LlamaRMSNorm.forward.__code__.co_code and hasattr(module, "variance_epsilon")


def norms_in_model_dtype(model: torch.nn.Module) -> int:
    """Make every Llama-style RMSNorm of a float64 model compute in float64; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if _is_llama_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_in_dtype, module)
            changed += 1
    return changed
