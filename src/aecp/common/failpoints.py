"""Fail points: named places where a test makes a process stop as if it were killed there.

``AECP_FAILPOINTS`` (names, comma-separated) is read once, at import; a process reaching a
listed point logs ``failpoint NAME reached`` and waits there for ever, so that the test can
``SIGKILL`` it at exactly that step (no race with the step after). Unset, as in production, a
point costs one set lookup. Only tests set it; the names are the points' callers' to define.
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)

_ACTIVE = frozenset(n.strip() for n in os.environ.get("AECP_FAILPOINTS", "").split(",") if n)


async def failpoint(name: str) -> None:
    """Wait here for ever if ``name`` is an active fail point; return at once otherwise."""
    if name in _ACTIVE:
        log.warning("failpoint %s reached: waiting here until killed", name)
        await asyncio.Event().wait()
