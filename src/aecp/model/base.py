"""The common base of stored objects (strict pydantic models that round-trip through JSON bytes)
and the name rule as a check and as the type of request fields."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field

from aecp.common.errors import InvalidInput
from aecp.common.names import NAME_PATTERN, NAME_RULE, OPTIONAL_NAME_PATTERN, is_name

# a name field of a request: the rule is its pattern, so the API document states it
Name = Annotated[str, Field(pattern=NAME_PATTERN, description=f"a name: {NAME_RULE}")]
OptionalName = Annotated[
    str, Field(pattern=OPTIONAL_NAME_PATTERN, description=f"empty, or a name: {NAME_RULE}")
]


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
    if not isinstance(value, str) or not is_name(value):
        raise InvalidInput(field, f"{value!r} is not a valid name ({NAME_RULE})")
    return value
