"""Every test runs with a configuration home of its own: a CLI session a developer keeps in
``~/.config/aecp`` (``aecp login``, ``make run``) must neither capture the CLI runs of the
tests nor be overwritten by them; ``AECP_CLUSTER`` is not inherited either."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    home = tempfile.mkdtemp(prefix="aecp-test-config-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["XDG_CONFIG_HOME"] = home
    os.environ.pop("AECP_CLUSTER", None)
