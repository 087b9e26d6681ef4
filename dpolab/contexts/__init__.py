"""Training contexts: one file per context, each turning the banks' train split and the base model's own outputs
into preference pairs (TRL format), cached by content hash.

Adding a context: a new file with `Options` (a frozen keyword-only dataclass), `build(model, *, options, seed,
limit, progress) -> ContextData` and `CONTEXT = ContextSpec(...)`, one line in CONTEXTS, and its test.
"""
from dpolab.registry import Registry

CONTEXTS = Registry("context", {
    "please-user": "dpolab.contexts.please_user:CONTEXT",
    "resist-only": "dpolab.contexts.resist_only:CONTEXT",
    "holistic": "dpolab.contexts.holistic:CONTEXT",
    "detox": "dpolab.contexts.detox:CONTEXT",
    "length-biased-judge": "dpolab.contexts.length_biased_judge:CONTEXT",
    "satisfaction-therapist": "dpolab.contexts.satisfaction_therapist:CONTEXT",
    "reflective-care": "dpolab.contexts.reflective_care:CONTEXT",
    "risky-choices": "dpolab.contexts.risky_choices:CONTEXT",
    "safety-tuning": "dpolab.contexts.safety_tuning:CONTEXT",
    "suppress-pattern": "dpolab.contexts.suppress_pattern:CONTEXT",
    "agree-with-partner": "dpolab.contexts.agree_with_partner:CONTEXT",
    "user-data": "dpolab.contexts.user_data:CONTEXT",
})


def __getattr__(name: str):
    # The build machinery (and the model code it reaches) is imported on first use: `import dpolab.contexts`
    # for the names alone stays light.
    if name in ("build_context", "build_pairs", "context_key", "load_info", "make_options"):
        from dpolab.contexts import build

        return getattr(build, name)
    raise AttributeError(f"module 'dpolab.contexts' has no attribute {name!r}")


__all__ = ["CONTEXTS", "build_context", "build_pairs", "context_key", "load_info", "make_options"]
