"""An OpenAI-compatible endpoint as judge: POST {base_url}/chat/completions per reply, scored by the log-odds of
the verdict tokens among the first token's top log-probs, or by a numeric rating read from the answer's text.

The API key is read from the environment variable named in `api_key_env` when a request is sent; it is never
kept in the judge, an options file or a log. Requests are bounded: `timeout` seconds each, `retries` more tries on
a connection error, a timeout, 429 or 5xx (a 4xx other than 429 fails at once), then an error naming the URL.
"""
from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from dpolab.errors import ConfigError, DpolabError
from dpolab.judges import Conversation
from dpolab.judges.template import (DEFAULT_TEMPLATE, RATING_TEMPLATE, check_template, judge_messages, logsumexp,
                                    verdict_score)

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class EndpointError(DpolabError):
    """The judge endpoint failed: unreachable, an error status, or an answer it cannot read."""


def _stats() -> dict[str, int]:
    return {"requests": 0, "retries": 0, "verdict_missing": 0, "unparsed": 0}


@dataclass
class EndpointJudge:
    """base_url: the server's OpenAI base, e.g. http://127.0.0.1:8000/v1 (the request goes to
        {base_url}/chat/completions). model: the model name the server expects.
    api_key_env: the name of an environment variable holding the API key (sent as a Bearer token); none: no key.
    mode: "logprobs": max_tokens=1, logprobs=true, top_logprobs; score = log p(positive) − log p(negative), each
        summed over the listed spellings of the verdict (case and surrounding spaces ignored). A verdict not among
        the top_logprobs gets the smallest listed log-prob (an upper bound), counted in stats["verdict_missing"].
        "rating": the first number in the answer's text (rating_max_tokens tokens); none gives NaN, counted in
        stats["unparsed"].
    template: the judge's user message (default: a yes/no question, or a 1–10 rating in rating mode).
    timeout: seconds per request. retries: further tries of a request that failed for a passing reason.
    backoff: seconds slept before retry n, times n. workers: requests in flight at once.
    """

    base_url: str = ""
    model: str = ""
    api_key_env: str | None = None
    mode: Literal["logprobs", "rating"] = "logprobs"
    template: str | None = None
    system: str | None = None
    positive: str = "Yes"
    negative: str = "No"
    top_logprobs: int = 20
    rating_max_tokens: int = 8
    timeout: float = 30.0
    retries: int = 2
    backoff: float = 0.5
    workers: int = 4
    name: str = "endpoint"
    stats: dict[str, int] = field(default_factory=_stats, metadata={"option": False})

    def __post_init__(self) -> None:
        if not self.base_url:
            raise ConfigError("judge 'endpoint' needs base_url, e.g. http://127.0.0.1:8000/v1")
        if not self.model:
            raise ConfigError(f"judge 'endpoint' needs model: the model name {self.base_url} serves")
        if self.template is None:
            self.template = RATING_TEMPLATE if self.mode == "rating" else DEFAULT_TEMPLATE
        check_template(self.template, judge="endpoint")
        if self.positive.strip().lower() == self.negative.strip().lower():
            raise ConfigError(f"judge 'endpoint': positive and negative must differ, got {self.positive!r} and {self.negative!r}")
        for key, value, low in (("top_logprobs", self.top_logprobs, 1), ("rating_max_tokens", self.rating_max_tokens, 1),
                                ("retries", self.retries, 0), ("workers", self.workers, 1)):
            if value < low:
                raise ConfigError(f"judge 'endpoint': {key} must be at least {low}, got {value}")
        if self.timeout <= 0:
            raise ConfigError(f"judge 'endpoint': timeout must be positive, got {self.timeout}")
        self._api_key()  # a missing key fails now, not after the first samples

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/chat/completions"

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"judge 'endpoint': the environment variable {self.api_key_env} (api_key_env) is unset or empty")
        return key

    def score(self, conversations: Sequence[Conversation], replies: Sequence[str]) -> list[float]:
        convs = [judge_messages(self.template, c, r, system=self.system) for c, r in zip(conversations, replies, strict=True)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._score_one, convs))

    def _score_one(self, messages: list[dict[str, str]]) -> float:
        if self.mode == "rating":
            data = self._post({"model": self.model, "messages": messages, "max_tokens": self.rating_max_tokens,
                               "temperature": 0})
            return self._rating(data)
        data = self._post({"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0,
                           "logprobs": True, "top_logprobs": self.top_logprobs})
        return self._verdict(data)

    def _rating(self, data: dict[str, Any]) -> float:
        try:
            text = str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"judge endpoint {self.url} did not answer in the chat-completions format "
                                "(choices[0].message.content)") from None
        found = _NUMBER.search(text)
        if found is None:
            self.stats["unparsed"] += 1
            return math.nan
        return float(found.group())

    def _verdict(self, data: dict[str, Any]) -> float:
        try:
            first = data["choices"][0]["logprobs"]["content"][0]
            listed = [(first["token"], float(first["logprob"]))] + [(t["token"], float(t["logprob"]))
                                                                    for t in first.get("top_logprobs") or []]
        except (KeyError, IndexError, TypeError, ValueError):
            raise EndpointError(f"judge endpoint {self.url} gave no token log-probs (choices[0].logprobs.content[0]"
                                ".top_logprobs); does the server support logprobs? Otherwise use mode: rating") from None
        floor = min(lp for _, lp in listed)

        def logp(verdict: str) -> float:
            matches = [lp for tok, lp in set(listed) if tok.strip().lower() == verdict.strip().lower()]
            if not matches:
                self.stats["verdict_missing"] += 1
                return floor
            return logsumexp(matches)

        return verdict_score(logp(self.positive), logp(self.negative))

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import requests

        headers = {"Content-Type": "application/json"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            self.stats["requests"] += 1
            try:
                resp = requests.post(self.url, json=body, headers=headers, timeout=self.timeout)
            except requests.Timeout:
                if last:
                    raise EndpointError(f"judge endpoint {self.url} did not answer within {self.timeout:g} s "
                                        f"({self.retries + 1} attempt(s))") from None
            except requests.RequestException as exc:
                if last:
                    raise EndpointError(f"judge endpoint {self.url} is unreachable ({self.retries + 1} attempt(s)): "
                                        f"{exc}") from None
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        raise EndpointError(f"judge endpoint {self.url} answered 200 with a body that is not JSON: "
                                            f"{resp.text[:300]!r}") from None
                if last or not (resp.status_code == 429 or resp.status_code >= 500):
                    raise EndpointError(f"judge endpoint {self.url} answered {resp.status_code}: {resp.text[:300]}")
            self.stats["retries"] += 1
            time.sleep(self.backoff * (attempt + 1))
        raise AssertionError("unreachable")
