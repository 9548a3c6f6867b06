"""The one rule for object names (VMs, nodes, images, volumes, snapshots), shared by every
layer: 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NAME_RULE = "1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
# the rule as a JSON-schema pattern (ECMA-262: '$' is the end of the text), and the rule for a
# name that may be left empty
NAME_PATTERN = NAME_RE.pattern
OPTIONAL_NAME_PATTERN = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)?$"


def is_name(value: str) -> bool:
    """True if ``value`` follows the rule (the whole text: a trailing newline is refused)."""
    return NAME_RE.fullmatch(value) is not None
