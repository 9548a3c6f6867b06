"""A flood of refusals logs one line per interval, and the next line counts the rest."""

from __future__ import annotations

import logging

import pytest

from aecp.common.ratelog import RefusalLog


def test_refusals_within_the_interval_are_counted_in_the_next_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    refusals = RefusalLog(logging.getLogger("test.refusals"), every=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        for _ in range(5):
            refusals.warning("refused %s", "a")
        now[0] += 10.0
        refusals.warning("refused %s", "b")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a",
        "refused b (4 more refused since the last line)",
    ]
