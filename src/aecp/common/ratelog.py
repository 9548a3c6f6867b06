"""Warnings about what peers do, at most one line per interval: a flood of bad connections
must not flood the log. The lines held back are counted in the next one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RefusalLog:
    """Logs a refusal unless one was logged in the last ``every`` seconds; the next line
    logged says how many were refused in between."""

    def __init__(
        self, logger: logging.Logger, every: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger, self.every, self.clock = logger, every, clock
        self._logged_at: float | None = None
        self._held = 0

    def warning(self, msg: str, *args: object) -> None:
        """``logger.warning(msg, *args)``, with the count of the refusals held back."""
        now = self.clock()
        if self._logged_at is not None and now - self._logged_at < self.every:
            self._held += 1
            return
        more = f" ({self._held} more refused since the last line)" if self._held else ""
        self._logged_at, self._held = now, 0
        self.logger.warning(msg + "%s", *args, more, stacklevel=2)
