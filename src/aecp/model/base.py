"""The common base of stored objects: strict pydantic models that round-trip through JSON bytes."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict

from aecp.common.errors import InvalidInput
from aecp.common.names import NAME_RE, NAME_RULE


class Stored(BaseModel):
    """A model persisted in the cluster store as JSON."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    def dump(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def load(cls, raw: bytes) -> Self:
        return cls.model_validate_json(raw)


def check_name(field: str, value: str) -> str:
    """Return ``value`` if it is a valid object name, else raise ``InvalidInput`` for ``field``."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidInput(field, f"{value!r} is not a valid name ({NAME_RULE})")
    return value
