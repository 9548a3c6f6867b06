"""Principals (API tokens): the create body; the public shapes are ``cluster.principals``'
(``PrincipalPublic``, and ``PrincipalCreated`` with the token, shown once)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from aecp.cluster.principals import ROLES, PrincipalCreated, PrincipalPublic
from aecp.model.base import Name


class PrincipalCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="the principal's name (the token starts with it)")
    role: str = Field(description=f"one of {ROLES}")


__all__ = ["PrincipalCreate", "PrincipalCreated", "PrincipalPublic"]
