"""Preference data: the pair schema, file readers and writers, validation, and chat-template tokenization."""
from dpolab.data.formats import SUPPORTED, write_pairs
from dpolab.data.read import PairSet, check_pairs, read_pairs, validate
from dpolab.data.schema import PreferencePair, Problem
from dpolab.data.tokenization import (
    PairTokenizationError,
    TokenizationSettings,
    TokenizedData,
    TokenizedPair,
    end_of_turn_id,
    tokenize_pair,
    tokenize_pairs,
)

__all__ = [
    "SUPPORTED",
    "PairSet",
    "PairTokenizationError",
    "PreferencePair",
    "Problem",
    "TokenizationSettings",
    "TokenizedData",
    "TokenizedPair",
    "check_pairs",
    "end_of_turn_id",
    "read_pairs",
    "tokenize_pair",
    "tokenize_pairs",
    "validate",
    "write_pairs",
]
