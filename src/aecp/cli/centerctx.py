"""The CLI's session with an operation center: ``aecp login URL`` stores it (the center's
URL, the user, the session token and its expiry) in ``~/.config/aecp/center.json``, mode 0600;
``aecp logout`` ends it there and here."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aecp.cli.client import ApiError, Client


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "aecp" / "center.json"


def save(context: dict[str, Any]) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # before the token is written: an older file keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        json.dump(context, f)
    return path


def load() -> dict[str, Any]:
    path = config_path()
    if not path.exists():
        raise ApiError("not logged in to an operation center: aecp login URL")
    context: dict[str, Any] = json.loads(path.read_text())
    return context


def forget() -> None:
    config_path().unlink(missing_ok=True)


@contextmanager
def center_client() -> Iterator[Client]:
    context = load()
    c = Client([context["url"]], context["token"])
    try:
        yield c
    finally:
        c.close()
