"""Float64 models for the exactness tests: two computations that claim the same mathematics must agree to
float64 rounding, on any CPU.

transformers' Llama computes RMSNorm, and eager attention's softmax, in float32 whatever the model's dtype. In a
float64 model that leaves fp32 rounding (about 1e-8 relative) in the gradients, enough to hide a real error of that
size and to make two exact paths disagree. dpolab's float64 computes the norms in float64
(dpolab.models.precision); `float64_eager_attention` does the same for eager attention's softmax, for the tests
that run it. RoPE's angles are also computed in float32, but they are constants of the positions, identical on both
sides of every comparison.
"""
from __future__ import annotations

import contextlib

import torch

# Relative agreement two exact float64 paths reach here is ~1e-14; 1e-9 leaves room for any summation order.
RTOL = 1e-9


def assert_same(a: torch.Tensor, b: torch.Tensor, *, rtol: float = RTOL) -> None:
    """Equal up to float64 rounding: within rtol of each value and of the largest magnitude compared (a gradient
    entry that cancels to ~0 is judged against the scale of its tensor)."""
    assert a.dtype == b.dtype == torch.float64, (a.dtype, b.dtype)
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), float(a.abs().max())) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


def load_float64(path: str):
    """dpolab's LoadedModel of `path` in float64; dpolab computes its norms in float64 too (dpolab.models.precision)."""
    from dpolab.models import load_model

    return load_model(str(path), dtype="float64")


def _eager_attention_in_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import repeat_kv

    keys = repeat_kv(key, module.num_key_value_groups)
    values = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, keys.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(-1)  # in the query's dtype, not float32
    out = torch.matmul(weights, values).transpose(1, 2).contiguous()  # (B, T, H, D)
    return out, weights


@contextlib.contextmanager
def float64_eager_attention():
    """Within the block, Llama's eager attention keeps float64 in its softmax."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.eager_attention_forward
    modeling_llama.eager_attention_forward = _eager_attention_in_dtype
    try:
        yield
    finally:
        modeling_llama.eager_attention_forward = original
