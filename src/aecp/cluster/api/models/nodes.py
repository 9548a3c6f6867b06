"""Node requests (the node's public shape is ``model.node.NodeView``, a view of several
records, never one of them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class NodeCordon(BaseModel):
    """The body of ``POST /v1/nodes/{name}/cordon``."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=200, description="why, for people (shown with the node)")
