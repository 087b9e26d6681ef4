"""Ideal assistant replies for training pairs: the project's templates, or an OpenAI-compatible endpoint.

Templates (dpolab/assets/ideal_replies.jsonl) are the default: `refute` keeps the correct answer, `affirm` accepts a
valid correction, `initial` states an answer, `concede` gives in to the user, `calm_reply` answers a provocation
politely. A template is picked per (seed, item, technique, kind), and successive turns of one dialogue take
successive templates, as `persuasion_message` does for appeals.

The endpoint (`ideal: endpoint`) writes each reply instead, given the dialogue so far and what the reply must do.
It is configured from the environment, never from option files, so keys stay out of configs and caches:

    DPOLAB_IDEAL_BASE_URL  e.g. http://127.0.0.1:8000/v1 (".../v1" or the bare host; /chat/completions is added)
    DPOLAB_IDEAL_MODEL     the model name sent in the request
    DPOLAB_IDEAL_API_KEY   optional bearer token (falls back to OPENAI_API_KEY)

Requests are greedy (temperature 0). A reply that does not name the answer it must name (or is empty) is replaced by
the template, and the build's info counts these fallbacks.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from dpolab.errors import ConfigError, DpolabError
from dpolab.models.chat import Conversation
from dpolab.banks import asset, read_jsonl, stable_hash

KINDS = ("refute", "affirm", "initial", "concede", "calm_reply")
SOURCES = ("templates", "endpoint")
ENV_BASE_URL, ENV_MODEL, ENV_KEY = "DPOLAB_IDEAL_BASE_URL", "DPOLAB_IDEAL_MODEL", "DPOLAB_IDEAL_API_KEY"
_SLOT = re.compile(r"(\{\w+\})")

# What each kind of reply must do, told to the endpoint. Slots as in the templates.
GOALS = {
    "refute": "The user is pushing a wrong answer ({claim}). Politely but firmly keep the correct answer, {answer}, "
              "and say that {claim} is not correct.",
    "affirm": "The user is correcting you, and they are right. Admit that your earlier answer ({previous}) was "
              "wrong and state that the correct answer is {answer}.",
    "initial": "State that the answer is {answer}.",
    "concede": "Give in to the user: agree with them that the answer is {claim}.",
    "calm_reply": "Reply calmly and politely, without insults, profanity or sarcasm, and offer to help.",
}
# The slot a reply of each kind must name; the endpoint's reply is checked for it.
MUST_NAME = {"refute": "answer", "affirm": "answer", "initial": "answer", "concede": "claim"}


class Template(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    kind: str
    template: str


@lru_cache(maxsize=1)
def templates() -> dict[str, list[Template]]:
    """The shipped templates by kind, each list sorted by id."""
    out: dict[str, list[Template]] = {k: [] for k in KINDS}
    for t in read_jsonl(asset("ideal_replies.jsonl"), Template):
        out.setdefault(t.kind, []).append(t)
    missing = [k for k in KINDS if not out[k]]
    if missing:
        raise DpolabError(f"ideal_replies.jsonl has no template of kind {', '.join(missing)}; reinstall dpolab")
    return {k: sorted(v, key=lambda t: t.id) for k, v in out.items()}


def fill(template: str, **slots: str) -> str:
    """Put slot values in a template, capitalising a value that starts a sentence ("to never mix them" -> "To ...")."""
    out = ""
    for part in _SLOT.split(template):
        m = _SLOT.fullmatch(part)
        if m is None:
            out += part
            continue
        value = slots[part[1:-1]]
        before = out.rstrip()
        if value and (not before or before.endswith((".", "!", "?"))):
            value = value[0].upper() + value[1:]
        out += value
    return out


@dataclass(frozen=True)
class Request:
    """One ideal reply to write: its kind, the dialogue it continues (ending with the user's turn), its slot values,
    and what picks its template (key) and which template in turn (turn, 1-based)."""

    kind: str
    history: Conversation
    slots: dict[str, str]
    key: tuple[Any, ...]
    turn: int = 1


def template_reply(req: Request, *, seed: int) -> str:
    pool = templates()[req.kind]
    t = pool[(stable_hash(seed, req.kind, *req.key) + req.turn - 1) % len(pool)]
    return fill(t.template, **req.slots)


class IdealWriter(Protocol):
    """Writes ideal replies; `stats` counts what happened (e.g. endpoint fallbacks) for the build's info."""

    stats: dict[str, int]

    def write(self, requests: Sequence[Request]) -> list[str]: ...


@dataclass
class TemplateWriter:
    seed: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    def write(self, requests: Sequence[Request]) -> list[str]:
        return [template_reply(r, seed=self.seed) for r in requests]


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str | None = None

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"

    def identity(self) -> dict[str, str]:
        """What enters the cache key (never the key)."""
        return {"base_url": self.base_url, "model": self.model}


def endpoint_from_env() -> Endpoint:
    base, model = os.environ.get(ENV_BASE_URL), os.environ.get(ENV_MODEL)
    if not base or not model:
        raise ConfigError(f"ideal replies from an endpoint need ${ENV_BASE_URL} and ${ENV_MODEL} "
                          "(an OpenAI-compatible server); or use ideal: templates")
    return Endpoint(base, model, os.environ.get(ENV_KEY) or os.environ.get("OPENAI_API_KEY"))


@dataclass
class EndpointWriter:
    """Asks an OpenAI-compatible /v1/chat/completions for each reply, a few requests at a time."""

    endpoint: Endpoint
    seed: int = 0
    workers: int = 4
    timeout: float = 60.0
    retries: int = 2
    max_tokens: int = 120
    stats: dict[str, int] = field(default_factory=lambda: {"endpoint_replies": 0, "endpoint_fallbacks": 0})

    def write(self, requests: Sequence[Request]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._one, requests))

    def _one(self, req: Request) -> str:
        fallback = template_reply(req, seed=self.seed)
        goal = fill(GOALS[req.kind], **req.slots)
        system = ("You write the assistant's next reply in the conversation below. " + goal +
                  " Answer in one or two short sentences, in plain text, as the assistant.")
        text = self._post([{"role": "system", "content": system}, *req.history])
        must = MUST_NAME.get(req.kind)
        if not text.strip() or (must and req.slots.get(must, "").lower() not in text.lower()):
            self.stats["endpoint_fallbacks"] += 1
            return fallback
        self.stats["endpoint_replies"] += 1
        return text.strip()

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.endpoint.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.endpoint.api_key:
            headers["Authorization"] = f"Bearer {self.endpoint.api_key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.endpoint.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return str(data["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == self.retries:
                    detail = exc.read().decode("utf-8", "replace")[:300]
                    raise DpolabError(f"ideal-reply endpoint {self.endpoint.url} answered {exc.code}: "
                                      f"{detail}") from None
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                if attempt == self.retries:
                    raise DpolabError(f"ideal-reply endpoint {self.endpoint.url} is unreachable: {exc}") from None
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                raise DpolabError(f"ideal-reply endpoint {self.endpoint.url} did not answer in the "
                                  "chat-completions format (choices[0].message.content)") from None
            time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")


def writer(source: str, *, seed: int) -> IdealWriter:
    """The writer for an `ideal` option value."""
    if source == "templates":
        return TemplateWriter(seed=seed)
    if source == "endpoint":
        return EndpointWriter(endpoint_from_env(), seed=seed)
    raise ConfigError(f"unknown ideal {source!r}; choose from {', '.join(SOURCES)}")


def identity(source: str) -> dict[str, str] | str:
    """What the ideal source contributes to a cache key."""
    return endpoint_from_env().identity() if source == "endpoint" else source
