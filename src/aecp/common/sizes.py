"""Sizes people write (``10G``, ``512M``, ``4096``) as bytes."""

from __future__ import annotations

import re

from aecp.common.errors import InvalidInput

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(field: str, value: str | int) -> int:
    """``10G``, ``512M``, ``4096`` → bytes; ``InvalidInput`` naming ``field`` otherwise."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise InvalidInput(field, f"{value!r} is not a size (e.g. 10G, 512M, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]
