"""Test helpers for ``common.receive``."""

from __future__ import annotations

import pytest

from aecp.common.receive import Intake


def fail_first_reservation(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the next ``Intake.reserve`` raise ``MemoryError`` (later ones work); returns the
    sizes asked for, as they are asked."""
    real = Intake.reserve
    calls: list[int] = []

    def reserve(self: Intake, size: int) -> bytearray | None:
        calls.append(size)
        if len(calls) == 1:
            raise MemoryError
        return real(self, size)

    monkeypatch.setattr(Intake, "reserve", reserve)
    return calls
