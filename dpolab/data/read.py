"""Reading and validating preference data: file -> every row checked -> PairSet (good pairs + every problem)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpolab.data.formats import read_raw
from dpolab.data.schema import PreferencePair, Problem, format_problems, parse_row
from dpolab.data.tokenization import (
    PairTokenizationError,
    TokenizationSettings,
    TokenizedData,
    TokenizedPair,
    end_of_turn_id,
    tokenize_pair,
    tokenized_data,
)
from dpolab.errors import DataError


@dataclass
class PairSet:
    pairs: list[PreferencePair]  # the good rows, in file order
    problems: list[Problem]  # every problem found: those about the whole file first, then row by row
    n_rows: int  # rows in the file, good and bad
    n_skipped: int  # rows left out of `pairs` because they have problems
    tokenized: list[TokenizedPair] | None = None  # with a tokenizer: `pairs` tokenized, in the same order
    settings: TokenizationSettings | None = None  # the settings `tokenized` used

    def tokenized_data(self) -> TokenizedData | None:
        """The good pairs as training data, when they were tokenized while checking (no second pass)."""
        return None if self.tokenized is None else tokenized_data(self.tokenized, self.settings)


def check_pairs(path: str | Path, *, tokenizer=None, max_length: int | None = None, emphasis: float = 1.0,
                counterfactual: bool = False) -> PairSet:
    """Read every row and record every problem, never raising for bad rows (only for unreadable files).

    tokenizer: also render each pair with its chat template (catches answers that contain the end-of-turn token).
    max_length: with a tokenizer, flag pairs whose prompt cannot be cut to fit (see dpolab.data.tokenization).
    emphasis: with a tokenizer, weight the tokens of each pair's emphasis spans (and flag spans that are bad).
    counterfactual: with a tokenizer, also tokenize (and check) each pair's meta.nullified_prompt.
    """
    if max_length is not None and tokenizer is None:
        raise DataError("max_length needs a tokenizer to count tokens")
    raw = read_raw(path)
    problems = list(raw.problems)
    pairs: list[PreferencePair] = []
    tokenized: list[TokenizedPair] = []
    first_seen: dict[str, str] = {}
    eot = end_of_turn_id(tokenizer) if tokenizer is not None else None
    settings = TokenizationSettings(max_length=max_length, emphasis=emphasis, counterfactual=counterfactual)
    for row in raw.rows:
        row_problems = list(row.problems)
        pair = None
        if row.record is not None:
            parsed = parse_row(row.record, index=row.index, where=row.where, text_cells=raw.text_cells)
            pair, row_problems = parsed.pair, row_problems + parsed.problems
        if pair is not None and pair.id in first_seen:
            row_problems.append(row.where.problem("id", f"duplicate id {pair.id!r} (first used at {first_seen[pair.id]})"))
            pair = None
        if pair is not None:
            first_seen[pair.id] = pair.source
            if tokenizer is not None:
                try:
                    tokenized.append(tokenize_pair(pair, tokenizer, settings, eot=eot))
                except PairTokenizationError as exc:
                    row_problems.append(row.where.problem(exc.field, exc.reason))
                    pair = None
        problems.extend(row_problems)
        if pair is not None:
            pairs.append(pair)
    return PairSet(pairs=pairs, problems=problems, n_rows=len(raw.rows), n_skipped=len(raw.rows) - len(pairs),
                   tokenized=tokenized if tokenizer is not None else None,
                   settings=settings if tokenizer is not None else None)


def validate(path: str | Path, *, tokenizer=None, max_length: int | None = None) -> list[Problem]:
    """Every problem in a preference-data file (empty when it is all good). Raises DataError only if unreadable."""
    return check_pairs(path, tokenizer=tokenizer, max_length=max_length).problems


def read_pairs(path: str | Path, *, tokenizer=None, max_length: int | None = None, skip_invalid: bool = False,
               emphasis: float = 1.0, counterfactual: bool = False) -> PairSet:
    """Read preference pairs, raising one DataError that lists every problem.

    skip_invalid: drop bad rows instead (PairSet.n_skipped says how many; the caller reports it). A file with no
    good row (empty, unreadable JSON, every row bad) still raises.
    """
    result = check_pairs(path, tokenizer=tokenizer, max_length=max_length, emphasis=emphasis,
                         counterfactual=counterfactual)
    if result.problems and (not skip_invalid or not result.pairs):
        if not result.n_rows:
            summary = "no rows could be read"
        elif skip_invalid:
            summary = f"all {result.n_rows} rows are invalid"
        else:
            summary = f"{result.n_skipped} of {result.n_rows} rows are invalid (fix them, or drop them with --skip-invalid)"
        raise DataError(f"{path}: {summary}:\n{format_problems(result.problems)}")
    return result
