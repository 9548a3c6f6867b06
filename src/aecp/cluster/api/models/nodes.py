"""Node requests (the node's public shape is ``model.node.NodeView``, a view of several
records, never one of them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool


class NodeCordon(BaseModel):
    """The body of ``POST /v1/nodes/{name}/cordon``."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=200, description="why, for people (shown with the node)")


class NodeMaintenanceEnter(BaseModel):
    """The body of ``POST /v1/nodes/{name}/maintenance/enter`` (optional)."""

    model_config = ConfigDict(extra="forbid")

    shutdown_unmigratable: StrictBool = Field(
        False,
        description="power off the running VMs that cannot move (pinned here, or no room "
        "elsewhere) instead of refusing",
    )


class NodeMaintenanceExit(BaseModel):
    """The body of ``POST /v1/nodes/{name}/maintenance/exit`` (optional)."""

    model_config = ConfigDict(extra="forbid")

    restore_vms: StrictBool = Field(
        False, description="move the VMs evacuated from the node back to it, one at a time"
    )
