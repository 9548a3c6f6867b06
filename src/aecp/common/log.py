"""Logging set-up: one format for every process, each line tagged with the object it is about."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(level: str = "INFO", stream: object = None) -> None:
    """Configure the root logger once for a daemon (idempotent)."""
    root = logging.getLogger()
    if any(getattr(h, "_aecp", False) for h in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._aecp = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "uvicorn.access", "qemu.qmp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
