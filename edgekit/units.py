"""Byte sizes: parse "3.5GiB" / "512MB" / "2000000000", and format for tables."""

from __future__ import annotations

import re

from .errors import UserInputError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")

MiB = 1024**2
GiB = 1024**3


def parse_size(text: str | int | float) -> int:
    """Bytes from an int or a string such as ``"3.5GiB"``, ``"512MB"``, ``"2e9"`` is not accepted."""
    if isinstance(text, bool):
        raise UserInputError(f"invalid size {text!r}: give bytes or a number with a unit, e.g. 3.5GiB or 512MB")
    if isinstance(text, (int, float)):
        if text <= 0:
            raise UserInputError(f"invalid size {text!r}: it must be positive, e.g. 3.5GiB")
        return int(text)
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UserInputError(
            f"invalid size {text!r}: use a number with one of the units B, KB, MB, GB, KiB, MiB, GiB, e.g. 3.5GiB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UserInputError(f"invalid size {text!r}: it must be positive, e.g. 3.5GiB")
    return value


def fmt_bytes(n: int | float) -> str:
    """Human-readable binary size: ``1.21 GiB``, ``222.6 MiB``."""
    n = float(n)
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= scale:
            digits = 2 if unit == "GiB" else 1
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"
