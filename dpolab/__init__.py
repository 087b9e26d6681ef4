"""dpolab: does preference optimization improve or harm a model's behaviour? Train DPO-family methods, measure what moved."""
from __future__ import annotations

__version__ = "0.1.0"
DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded model (dpolab.models.load.BUILTIN_MODELS); the one place it is named


def train(config=None, /, **overrides):
    """Train a DPO-family method; the Python twin of `dpolab train`. See dpolab.training.loop.train."""
    from dpolab.training.loop import train as _train

    return _train(config, **overrides)


__all__ = ["DEFAULT_MODEL", "train", "__version__"]
