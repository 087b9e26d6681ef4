"""A named unwanted pattern in replies: the default one (references to earlier context that never existed), a user's
own (a regex, a list of phrases, or a file of them), the sentences of a reply that show it, and the reply with
exactly those sentences removed. Shared by the `suppress-pattern` context and the `pattern_rate` probe.

The default pattern carries the seed finding (DPO on radiology reports with and without lines that refer to prior
exams that do not exist cut those lines 3.2-4.8x while keeping clinical accuracy) to general chat: a single-turn
reply has no earlier conversation, so "as I mentioned earlier", "as we discussed", "compared with last time",
"like I said", "following up on our last chat" all refer to context that was never there. Self-references inside
one reply ("as noted above" after a list) also match: a 96-token reply rarely has an earlier part worth pointing
back to, and the probe's neutral prompts measure that floor.

Units. A reply is cut into sentences by `segments` (the boundary rule of `dpolab.replycodes`: after . ! ? with any
closing quotes or brackets, when whitespace follows, and at every line break; a bare list marker such as "2." does
not end a sentence, so a list item stays whole). A "pattern line" is a sentence the pattern matches; the per-text
count is the number of such sentences, not of matches.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from dpolab.banks import asset, bank_split, read_jsonl
from dpolab.errors import ConfigError

BANK = "pattern/prompts.jsonl"
REFERENCES = "pattern/reference_replies.jsonl"
KINDS = ("invite", "neutral")

_I = re.IGNORECASE
_SAID = (r"(?:mentioned|said|discussed|noted|explained|described|covered|talked about|went over|gone over|agreed|"
         r"established|suggested|recommended|outlined|told you|shared|went through|gone through)")
_TALK = r"(?:conversation|chat|discussion|session|talk|exchange|message|meeting|lesson|visit)s?"

# The default pattern: phrases that point back to earlier context. Each regex is case-insensitive and word-bounded;
# a sentence matching any of them is a pattern line. Written to catch the forms SmolLM2-135M-Instruct produces on
# the inviting prompts of assets/pattern/prompts.jsonl, and to leave ordinary sentences alone (tests/test_pattern.py
# holds positive and negative example sentences).
DEFAULT_RULES: dict[str, str] = {
    # "as I mentioned earlier", "as we discussed", "as I've said before", "as we agreed"
    "as_i_said": rf"\bas (?:i|we)(?:'ve|'d| have| had)? (?:already |previously |just )?{_SAID}\b",
    # "like I said", "like I told you", "as I was saying"
    "like_i_said": r"\b(?:like|as) (?:i|we) (?:said|told you|was saying|were saying|mentioned)\b",
    # "as noted above", "as mentioned earlier", "the tips mentioned earlier", "the plan discussed last time"
    "as_noted_above": r"\bas (?:noted|mentioned|stated|discussed|said|described|outlined|explained|covered|shown|agreed) "
                      r"(?:above|earlier|before|previously|last time)\b"
                      r"|\b(?:the|that|this|those|these) (?:\w+ )?(?:noted|mentioned|discussed|described|outlined|"
                      r"explained|suggested|recommended) (?:earlier|before|previously|last time)\b",
    # "our previous conversation", "in my last answer", "from our prior discussion", "the previous chat"
    "previous_conversation": rf"\b(?:our|my) (?:previous|last|earlier|prior|past|recent) (?:{_TALK}|"
                             rf"(?:response|answer|reply|advice|explanation|interpretation|suggestion|"
                             rf"recommendation|version)s?)\b"
                             rf"|\b(?:the|that|your|this) (?:previous|last|earlier|prior) "
                             rf"(?:conversation|chat|discussion|exchange)s?\b"
                             rf"|\bthe (?:previous|last|earlier|prior) (?:response|answer|reply|explanation)s?\b",
    # "compared with last time", "since last time", "as I did before", "as before", "like before"
    "last_time": r"\b(?:compared (?:with|to)|since|than|from|unlike|same as|like|as (?:we did|i did|you did)) "
                 r"last time\b|\blast time (?:we|i|you) (?:talked|spoke|discussed|met|chatted|worked)\b"
                 r"|\bas (?:i|we) did (?:before|earlier|previously)\b"
                 r"|(?<!such )\b(?:as|like|same as|just as) before\b(?! (?:you|we|i|they|he|she|it|the|a|an|bed|"
                 r"eating|going|starting|using|cooking|sleeping)\b)",
    # "going back to what I said", "back to what we discussed"
    "going_back": rf"\b(?:going |coming |getting )?back to (?:what|where) (?:i|we|you) (?:{_SAID}|were|left off)\b",
    # "where we left off", "pick up where I stopped"
    "left_off": r"\bwhere (?:we|i|you) (?:left off|stopped|left it)\b",
    # "as you know from our previous conversation", "as you'll remember", "as you may recall"
    "as_you_recall": r"\bas you (?:may |might |will |'ll |probably |already )?(?:recall|remember)\b"
                     r"|\bas you know from\b",
    # "I already explained", "we previously discussed", "I mentioned earlier", "earlier, I suggested"
    "already_said": rf"\b(?:i|we) (?:already|previously|earlier) {_SAID}\b"
                    rf"|\b(?:i|we)(?:'ve| have| had)? {_SAID} (?:earlier|before|previously|last time|yesterday|"
                    rf"last week|the other day)\b"
                    rf"|\b(?:earlier|previously|last time),? (?:i|we) {_SAID}\b",
    # "following up on our chat", "to recap our discussion", "recap of what we covered"
    "follow_up": r"\bfollowing up on (?:our|my|what (?:we|i))\b"
                 r"|\b(?:to recap|recapping|recap of|to summari[sz]e) (?:our|what (?:we|i))\b",
    # "you mentioned last time", "you told me earlier", "you asked me before"
    "you_said_before": r"\byou (?:mentioned|told me|said|asked(?: me)?|shared) (?:earlier|before|previously|"
                       r"last time|the other day|yesterday|last week)\b",
    # "the recipe I gave you", "the warm-up I mentioned", "the plan we made together", "the tips I suggested"
    "what_i_gave_you": r"\b(?:that|the|those|these) (?:\w+ ){1,2}(?:i|we) (?:gave you|sent you|showed you|shared|"
                       r"made together|worked out|mentioned|described|suggested|recommended|discussed|talked about|"
                       r"went over|explained)\b",
    # "I told you", "we talked about", "we went over", "we've discussed", "we agreed"
    "we_discussed": r"\b(?:i|we)(?:'ve| have| had)? (?:told you|talked about|went over|gone over|discussed|agreed)\b",
}


def _compile(entry: str, *, what: str) -> re.Pattern[str]:
    try:
        rx = re.compile(entry, _I)
    except re.error as exc:
        raise ConfigError(f"{what} {entry!r} is not a valid regular expression: {exc.msg} at position {exc.pos}"
                          ) from None
    if rx.search(""):
        raise ConfigError(f"{what} {entry!r} matches the empty string, so it would match every sentence")
    return rx


def phrase_regex(phrase: str) -> str:
    """A literal phrase as a regex: its words escaped, any whitespace between them, word boundaries at the ends
    where the phrase starts or ends with a word character ("like I said" also matches "Like  I said")."""
    words = phrase.split()
    if not words:
        raise ConfigError("a pattern phrase is empty")
    body = r"\s+".join(re.escape(w) for w in words)
    start = r"\b" if re.match(r"\w", words[0]) else ""
    end = r"\b" if re.search(r"\w$", words[-1]) else ""
    return f"{start}{body}{end}"


@dataclass(frozen=True)
class Pattern:
    """A compiled pattern: named regexes, any of which makes a sentence a pattern line.

    source: where it came from ("default", "regex", "phrases", "file:<path>"), for summaries.
    """

    source: str
    rules: tuple[tuple[str, re.Pattern[str]], ...]

    def rule(self, sentence: str) -> str | None:
        """The name of the first rule matching the sentence, or None."""
        return next((name for name, rx in self.rules if rx.search(sentence)), None)

    def matches(self, sentence: str) -> bool:
        return self.rule(sentence) is not None

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "rules": {name: rx.pattern for name, rx in self.rules}}


def default_pattern() -> Pattern:
    return Pattern("default", tuple((name, _compile(rx, what="default rule")) for name, rx in DEFAULT_RULES.items()))


def _entries(entries: Sequence[str], *, source: str) -> Pattern:
    """Phrases, or regexes written between slashes ("/as (i|we) said/"); blank entries and "#" comments skipped."""
    rules = []
    for entry in entries:
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        if len(entry) > 2 and entry.startswith("/") and entry.endswith("/"):
            rules.append((entry, _compile(entry[1:-1], what="pattern")))
        else:
            rules.append((entry, _compile(phrase_regex(entry), what="pattern phrase")))
    if not rules:
        raise ConfigError(f"the pattern from {source} has no entries")
    return Pattern(source, tuple(rules))


def resolve(pattern: str | Sequence[str] | None = None, pattern_file: str | Path | None = None) -> Pattern:
    """The pattern a context or probe option names.

    pattern: None for the default; a string is one regular expression (case-insensitive, used as written: add
        `\\b` yourself for word boundaries); a list is phrases, each matched literally, case-insensitive and
        word-bounded, except entries written between slashes, which are regexes.
    pattern_file: a UTF-8 text file with one entry per line, read as a list (blank lines and lines starting with
        "#" skipped). Give `pattern` or `pattern_file`, not both.
    A bad regex, an empty one, one that matches the empty string, or a missing file is a ConfigError naming it.
    """
    if pattern is not None and pattern_file is not None:
        raise ConfigError("give pattern or pattern_file, not both")
    if pattern_file is not None:
        path = Path(pattern_file)
        if not path.is_file():
            raise ConfigError(f"pattern_file {str(path)!r} does not exist")
        return _entries(path.read_text(encoding="utf-8").splitlines(), source=f"file:{path}")
    if pattern is None:
        return default_pattern()
    if isinstance(pattern, str):
        if not pattern.strip():
            raise ConfigError("pattern is empty; leave it unset for the default")
        return Pattern("regex", (("regex", _compile(pattern, what="pattern")),))
    return _entries(list(pattern), source="phrases")


# -- the banks ----------------------------------------------------------------------------------------------------


class PatternPrompt(BaseModel):
    """A single-turn user prompt: `invite` ones are written to invite the pattern with no earlier context."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    kind: Literal["invite", "neutral"]
    topic: str
    prompt: str
    split: Literal["train", "test"]


class ReferenceReply(BaseModel):
    """A good reply to a prompt, scored for its per-token NLL (the probe's quality guard)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    prompt: str
    reply: str


def read_prompts(path: str | Path | None, split: str) -> list[PatternPrompt]:
    """A user's prompt file (all its rows), or the shipped bank's split."""
    return read_jsonl(path, PatternPrompt) if path else bank_split(read_jsonl(asset(BANK), PatternPrompt), split)


def read_references(path: str | Path | None = None) -> list[ReferenceReply]:
    return read_jsonl(path or asset(REFERENCES), ReferenceReply)


# -- sentences with their spans ------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")
_ENDS_SENTENCE = re.compile(r"[.!?][\"'”’)\]]*$")
_LIST_MARKER = re.compile(r"(?:\d+|[A-Za-z])[.)]$|[-*•]$")


@dataclass(frozen=True)
class Sentence:
    start: int  # character offsets in the text: text[start:end] is the sentence, no surrounding whitespace
    end: int
    text: str


def segments(text: str) -> list[Sentence]:
    """The text's sentences with their character spans, in order; the whitespace between them (and around the
    text) belongs to none. A break is a whitespace run that contains a line break, or that follows . ! ? (with any
    closing quotes or brackets), unless what precedes it on its own is a list marker ("2.", "b)", "-")."""
    out: list[Sentence] = []
    start = None
    pos = 0
    for ws in _WHITESPACE.finditer(text):
        if ws.start() > pos:
            start = pos if start is None else start
        if start is not None:
            before = text[start:ws.start()]
            if "\n" in ws.group() or (_ENDS_SENTENCE.search(before) and not _LIST_MARKER.fullmatch(before)):
                out.append(Sentence(start, ws.start(), before))
                start = None
        pos = ws.end()
    if pos < len(text):
        start = pos if start is None else start
    if start is not None:
        out.append(Sentence(start, len(text), text[start:]))
    return out


def matching_sentences(text: str, pattern: Pattern | None = None) -> list[Sentence]:
    """The sentences of `text` the pattern (default: the default pattern) matches: the reply's pattern lines."""
    pattern = pattern or _DEFAULT
    return [s for s in segments(text) if pattern.matches(s.text)]


def count_lines(text: str, pattern: Pattern | None = None) -> int:
    """How many sentences of `text` the pattern matches."""
    return len(matching_sentences(text, pattern))


@dataclass(frozen=True)
class Removal:
    """A text with its pattern lines removed.

    text: the remainder. removed: the removed sentences, with their spans in the original text.
    """

    text: str
    removed: tuple[Sentence, ...]

    @property
    def spans(self) -> list[list[int]]:
        return [[s.start, s.end] for s in self.removed]


def remove_matching(text: str, pattern: Pattern | None = None) -> Removal:
    """The text with exactly the matching sentences removed.

    Every kept sentence is byte-identical and in order. Between two kept sentences stands one of the original
    whitespace runs between them: the one with the most line breaks (the first on a tie), so a removed sentence
    that ended a paragraph does not merge two paragraphs, and one inside a line leaves a single space. The text's
    own leading and trailing whitespace stays. With nothing removed the text comes back unchanged; with every
    sentence removed the remainder is that leading and trailing whitespace only (blank).
    """
    pattern = pattern or _DEFAULT
    sents = segments(text)
    gone = [pattern.matches(s.text) for s in sents]
    if not any(gone):
        return Removal(text, ())
    kept = [s for s, g in zip(sents, gone) if not g]
    lead = text[: sents[0].start] if sents else ""
    tail = text[sents[-1].end:] if sents else ""
    parts = [lead]
    last = None  # index of the previous kept sentence
    for i, (s, g) in enumerate(zip(sents, gone)):
        if g:
            continue
        if last is not None:
            gaps = [text[sents[j].end:sents[j + 1].start] for j in range(last, i)]
            parts.append(max(gaps, key=lambda gap: gap.count("\n")))
        parts.append(s.text)
        last = i
    parts.append(tail)
    out = "".join(parts) if kept else lead + tail
    return Removal(out, tuple(s for s, g in zip(sents, gone) if g))


_DEFAULT = default_pattern()
