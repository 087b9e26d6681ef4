"""Typed configs: YAML files plus overrides; unknown keys fail at load and list the valid ones."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from dpolab import DEFAULT_MODEL
from dpolab.errors import ConfigError
from dpolab.tracking import TrackerNames


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(StrictModel):
    """Everything one training run needs. Field descriptions double as CLI and README help."""

    # what
    model: str = Field(DEFAULT_MODEL, description="built-in name, local Hugging Face folder, or hub id")
    data: str | None = Field(None, description="preference data: .jsonl/.json/.parquet/.csv or a save_to_disk folder")
    out: str | None = Field(None, description="output folder: metrics.jsonl, checkpoints/, model/")
    # the objective
    loss: str | list[str] = Field("dpo", description="loss name from dpolab.losses.LOSSES, or a list of them whose "
                                  "weighted sum is trained (loss: [dpo, sft] with loss_weights: [1.0, 0.2])")
    beta: float | None = Field(None, gt=0, description="strength of the pull towards the reference; larger stays closer "
                               "(unset: the loss's own default, e.g. 0.1 for dpo, 2.0 for simpo)")
    loss_args: dict[str, Any] = Field(default_factory=dict, description="extra options of the chosen loss; for a list "
                                      "of losses, one mapping per loss name ({simpo: {gamma: 0.5}})")
    loss_weights: list[float] | None = Field(None, description="for a list of losses: one weight >= 0 each, in order "
                                             "(unset: 1 each); only the first loss's rewards are reported")
    sft_weight: float = Field(0.0, ge=0, description="weight of an extra NLL term on the chosen response (RPO)")
    emphasis: float = Field(1.0, gt=0, description="token-weighted DPO: weight of the completion tokens inside each "
                            "pair's meta.emphasis spans ({chosen: [[start, end], ...], rejected: [...]}, character "
                            "offsets) in the policy's and the reference's log-probs; 1: plain sums, spans ignored")
    consistency_weight: float = Field(0.0, ge=0, description="λ of the counterfactual-consistency term: KL between the "
                                      "policy's choice between a pair's two replies given its prompt and given "
                                      "meta.nullified_prompt (the partner's message made uninformative); 0: off")
    reference: Literal["auto", "cached", "frozen", "adapter", "none"] = Field(
        "auto", description="auto = cached log-probs (computed once with the starting weights, reused by later runs)"
    )
    reference_model: str | None = Field(
        None, description="the reference's weights when they are not the starting model's (built-in name, folder or "
        "hub id, same tokenizer), e.g. the original base while `model` is a later stage's; cached or frozen only. "
        "null: the model at the start of training")
    # optimisation
    lr: float = Field(5e-6, gt=0, description="peak learning rate (AdamW)")
    batch_size: int = Field(8, ge=1, description="pairs per optimizer step, summed over processes and accumulation")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (at least; see forward_tokens)")
    forward_tokens: int | None = Field(
        1024, ge=1, description="cap on padded tokens per forward (prompts once + both completions); a micro-batch over it "
        "is split further. Bounds activation memory; the gradient is the same. null: no cap")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; default: epochs x pairs / batch_size")
    epochs: float = Field(1.0, gt=0, description="passes over the data when max_steps is not set")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, description="clip the global gradient norm; null disables")
    seed: int = 0
    # data handling
    max_length: int = Field(1024, ge=8, description="cap on prompt + completion tokens; prompts keep their end")
    skip_invalid: bool = Field(False, description="drop invalid rows (and report how many) instead of refusing")
    shuffle: bool = True
    # model handling
    dtype: Literal["float32", "bfloat16", "float64"] = Field("float32", description="float64 is for exactness checks")
    trust_remote_code: bool = False
    lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = 32.0
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] | str = Field("all-linear", description="module names, or all-linear")
    freeze_layers: int = Field(0, ge=0, description="full fine-tuning with the lowest k decoder layers (and embeddings) frozen")
    # the forward pass
    forward: Literal["prefix", "concat"] = Field("prefix", description="prefix: run each prompt once for both responses")
    chunk_tokens: int = Field(512, ge=1, description="completion positions sent through the LM head at once")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice")
    # bookkeeping
    save_every: int = Field(50, ge=1, description="checkpoint every N optimizer steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    final_checkpoint: bool = Field(True, description="also checkpoint after the last step (optimizer state included)")
    save_model: bool = Field(True, description="write OUT/model (merged weights) at the end")
    progress: bool = True
    # tracking (dpolab.tracking)
    report_to: TrackerNames = Field(default_factory=list, description="trackers that also record the run: "
                                 "mlflow, tensorboard (dpolab.tracking.TRACKERS); empty: none")
    tracking_uri: str | None = Field(None, description="MLflow's store; default: $MLFLOW_TRACKING_URI, else a file "
                                     "store in OUT/mlruns")


    @field_validator("loss")
    @classmethod
    def _known_loss(cls, name: str | list[str]) -> str | list[str]:
        from dpolab.losses import LOSSES

        try:
            return LOSSES.check(name) if isinstance(name, str) else [LOSSES.check(n) for n in name]
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _loss_args_fit(self) -> "TrainConfig":
        from dpolab.losses import loss_options

        if isinstance(self.loss, list):
            self._loss_list_fits()
        elif self.loss_weights is not None:
            raise ValueError(f"loss_weights needs a list of losses (loss: [{self.loss}, sft]); loss {self.loss!r} is "
                             "one, so remove loss_weights")
        else:
            options = loss_options(self.loss)
            valid = {k: v for k, v in options.items() if k != "beta"}
            unknown = sorted(set(self.loss_args) - set(valid))
            if unknown:
                raise ValueError(
                    f"loss {self.loss!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}"
                )
            if "beta" in options and self.beta is None:
                # The loss's own default, written into the resolved config so OUT/config.yaml says what was used
                # (SimPO's β is 2.0, not DPO's 0.1). Assignment re-validates; beta is then set, so this runs once.
                self.beta = options["beta"][1]
                self.model_fields_set.discard("beta")  # still "not set by the user": another loss gets its own default
            elif "beta" not in options and self.beta is not None:
                raise ValueError(f"loss {self.loss!r} takes no beta; remove beta (got {self.beta!r})")
        if self.reference == "adapter" and not self.lora:
            raise ValueError("reference 'adapter' needs lora: true")
        if self.reference_model is not None and self.reference in ("adapter", "none"):
            raise ValueError(f"reference_model needs reference auto, cached or frozen (got {self.reference!r})")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        return self

    def _loss_list_fits(self) -> None:
        """A weighted list of losses (dpolab.losses.compute_loss): names known and distinct, one weight >= 0 each,
        loss_args one mapping per loss name. beta is shared by the losses that declare one; unset, it is their
        common default (an error if their defaults differ). Unset weights become 1 each. Both resolved values are
        written into the config, as a single loss's beta is."""
        from dpolab.losses import check_combination, loss_options

        try:
            weights = check_combination(self.loss, self.loss_weights, self.loss_args)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.loss_weights != weights:
            self.loss_weights = weights  # re-validates once; equal then
            self.model_fields_set.discard("loss_weights")  # as beta: another list gets its own
        defaults = {n: loss_options(n)["beta"][1] for n in self.loss if "beta" in loss_options(n)}
        if defaults and self.beta is None:
            if len(set(defaults.values())) > 1:
                listed = ", ".join(f"{n} {b}" for n, b in defaults.items())
                raise ValueError(f"beta is shared by the listed losses that take one, and their own defaults differ "
                                 f"({listed}); set beta")
            self.beta = next(iter(defaults.values()))
            self.model_fields_set.discard("beta")
        elif not defaults and self.beta is not None:
            raise ValueError(f"none of the losses {', '.join(self.loss)} takes beta; remove beta (got {self.beta!r})")

    @model_serializer(mode="wrap")
    def _loss_weights_only_for_a_list(self, handler) -> dict[str, Any]:
        """No loss_weights key for a single loss, so its resolved config (OUT/config.yaml) is as before lists."""
        data = handler(self)
        if self.loss_weights is None:
            data.pop("loss_weights", None)
        return data


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The (nested) config class that owns the key at `loc`, for listing its valid keys."""
    import typing

    current = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue  # a dict key or list index: stay with the value type found below
        annotation = field.annotation
        args = typing.get_args(annotation)
        candidates = [annotation, *args, *(a for arg in args for a in typing.get_args(arg))]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if nested:
            current = nested[0]
    return current


def _format_errors(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, err["loc"])
            lines.append(f"unknown key {where!r}; valid keys: {', '.join(owner.model_fields)}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "value_error" and "input" in err and not isinstance(err["input"], dict) else ""))
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def parse_value(text: str) -> Any:
    """A CLI override value, read as YAML: 3 -> int, 1e-5 -> float, true -> bool, [a, b] -> list."""
    return yaml.safe_load(text) if text != "" else ""


def load_config(model: type[BaseModel], path: str | Path | None = None, overrides: dict[str, Any] | None = None, *, source: str | None = None):
    """Build a config from a YAML file (optional) and overrides (dotted keys allowed: loss_args.alpha=1)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        data.update(loaded or {})
    for key, value in (overrides or {}).items():
        target = data
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, model, source or (str(path) if path else "(arguments)"))) from None


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
