"""Byte sizes: parse "3.5GiB" / "512MB" / "2000000000", and format for tables."""

from __future__ import annotations

import re
from fractions import Fraction

from .errors import UserInputError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")

MiB = 1024**2
GiB = 1024**3
MAX_SIZE = 1024**6   # 1 EiB: more than any device; bigger numbers are typos


def parse_size(text: str | int | float) -> int:
    """Bytes from an int or a string such as ``"3.5GiB"``, ``"512MB"``, ``"2e9"`` is not accepted."""
    if isinstance(text, bool):
        raise UserInputError(f"invalid size {text!r}: give bytes or a number with a unit, e.g. 3.5GiB or 512MB")
    if isinstance(text, (int, float)):
        if not 0 < text <= MAX_SIZE:    # (also refuses NaN)
            raise UserInputError(f"invalid size {str(text)[:40]}: give a positive number of bytes up to 1 EiB, "
                                 "e.g. 3.5GiB")
        return int(text)
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    shown = repr(text) if len(text) <= 40 else repr(text[:40]) + f"... ({len(text)} characters)"
    if not m or unit not in _UNITS:
        raise UserInputError(
            f"invalid size {shown}: use a number with one of the units B, KB, MB, GB, KiB, MiB, GiB, e.g. 3.5GiB")
    # exact decimal arithmetic: a float turns "3.3GB" into 3299999999 and a 400-digit number into infinity
    whole, _, fraction = m.group(1).partition(".")
    value = (int(Fraction(f"{whole or 0}.{fraction[:30] or 0}") * _UNITS[unit]) if len(whole.lstrip("0")) <= 30
             else MAX_SIZE + 1)
    if value <= 0:
        raise UserInputError(f"invalid size {shown}: it must be positive, e.g. 3.5GiB")
    if value > MAX_SIZE:
        raise UserInputError(f"invalid size {shown}: more than any machine has (at most 1 EiB), e.g. 3.5GiB")
    return value


def fmt_bytes(n: int | float) -> str:
    """Human-readable binary size: ``1.21 GiB``, ``222.6 MiB``."""
    n = float(n)
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= scale:
            digits = 2 if unit == "GiB" else 1
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"
