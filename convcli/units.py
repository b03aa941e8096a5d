"""Byte sizes as people write them: ``256M``, ``1G``, ``64MiB``, ``1048576``."""

from __future__ import annotations

import re

from convcli.errors import UsageError

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, param: str = "workspace") -> int:
    """Bytes in ``text``: a number with an optional K/M/G/T suffix (powers of 1024).

    Raises
    ------
    UsageError
        For ``param`` when the text is not a positive size.
    """
    match = _SIZE.match(text)
    if not match:
        raise UsageError(
            f"{{param}} {text!r}: expected a size like 64M, 1G or 1048576", param=param
        )
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1:
        raise UsageError(f"{{param}} {text!r}: must be at least 1 byte", param=param)
    return int(value)


def format_size(count: int) -> str:
    """``268435456`` -> ``"256 MiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.4g} {unit}"
    return f"{count} B"
