"""How a number is written for a reader: three significant digits, a true minus sign, a dash when it is missing.

The report writes every value, delta, CI bound, percentage and duration through `num`, so one page never mixes
`−7.688` with `12.6`. It imports nothing from dpolab, so any module that shows numbers can use it.
"""
from __future__ import annotations

import math
from numbers import Integral
from typing import Any

DIGITS = 3
MINUS = "\u2212"  # "−", as wide as "+" (a hyphen is narrower), so signed columns line up
MISSING = "—"
TINY = 1e-4  # below this a fixed-point number is mostly zeros: 1.23e−5 instead


def is_missing(x: Any) -> bool:
    """None or NaN: a value that was not measured."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def num(x: Any, *, signed: bool = False) -> str:
    """`x` to three significant digits: 0.0123, 0.123, 1.23, 12.3, 123, 1.00 (trailing zeros kept: they are digits).

    A number with more whole digits keeps them all (1234, never 1.23e+03); one below 0.0001 is written 1.23e−5; an
    integer (a count of tokens or items) is written whole, 37 and not 37.0. Negative numbers take "−" (U+2212);
    `signed` puts "+" before positive ones (a change reads as one). Zero is "0" either way; None and NaN are "—".
    """
    count = isinstance(x, Integral) and not isinstance(x, bool)
    x = None if x is None else int(x) if count else float(x)
    if is_missing(x):
        return MISSING
    if x == 0:
        return "0"
    a = abs(x)
    if count:
        text = str(a)
    elif math.isinf(a):
        text = "∞"
    elif a < TINY:
        mantissa, exponent = f"{a:.{DIGITS - 1}e}".split("e")
        text = f"{mantissa}e{int(exponent)}".replace("-", MINUS)
    else:
        rounded = float(f"{a:.{DIGITS - 1}e}")  # 9.996 -> 10.0: the decimals follow the rounded number
        whole = math.floor(math.log10(rounded)) + 1
        text = f"{a:.0f}" if whole >= DIGITS else f"{rounded:.{DIGITS - whole}f}"
    return (MINUS if x < 0 else "+" if signed else "") + text


def ci(low: Any, high: Any, *, signed: bool = False) -> str:
    """"[−28.5, +12.6]": an interval's bounds as `num` writes them; "" when neither bound is known."""
    if is_missing(low) and is_missing(high):
        return ""
    return f"[{num(low, signed=signed)}, {num(high, signed=signed)}]"


def percent(x: Any, *, signed: bool = False) -> str:
    """A share as a percentage, "12.3%"; "—" when missing."""
    return MISSING if is_missing(x) else num(100 * float(x), signed=signed) + "%"
