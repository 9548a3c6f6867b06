"""``/v1/vms/{name}/migrate`` and ``/v1/operations/{id}/cancel``: moving a VM to another node
(live when it runs, cold when it is stopped: ``cluster.migrations``) and cancelling it."""

from __future__ import annotations

from fastapi import status
from pydantic import BaseModel, ConfigDict, Field

from aecp.cluster import migrations
from aecp.cluster.api.deps import NamePath, Service
from aecp.cluster.api.models import Accepted
from aecp.cluster.api.models.operations import OperationPublic
from aecp.cluster.api.routing import api_router
from aecp.common.apierrors import error_responses
from aecp.common.names import NAME_PATTERN

router = api_router("/v1/vms", "vms")
ops_router = api_router("/v1/operations", "operations")


class VMMigrate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: str | None = Field(
        None, pattern=NAME_PATTERN, description="the node to move to (default: the scheduler's)"
    )
    bandwidth_mib_s: int = Field(
        0, ge=0, le=1 << 20, description="cap a live migration's bandwidth, MiB/s (0: the node's)"
    )


@router.post(
    "/{name}/migrate",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="migrate_vm",
    responses=error_responses(404, 409),
)
async def migrate_vm(name: NamePath, body: VMMigrate, svc: Service) -> Accepted:
    """Move the VM to ``node``: live (its memory copied while it runs, its disks handed over
    at the switch-over) when it runs, cold (its placement only) when it is stopped. 409 when
    it cannot move now or the node cannot take it, 404 for an unknown node."""
    entry, view = await svc.vm(name)
    op = await migrations.request_migration(
        svc.store, entry, view, body.node, svc.clock, bandwidth_mib_s=body.bandwidth_mib_s
    )
    return Accepted.of(op)


@ops_router.post(
    "/{op_id}/cancel",
    operation_id="cancel_operation",
    responses=error_responses(404, 409),
)
async def cancel_operation(op_id: str, svc: Service) -> OperationPublic:
    """Ask for a running operation to be cancelled (only live migrations can be): the node
    carrying it out decides, and the operation ends ``cancelled`` — or ``succeeded``, when
    the request came after the point of no return."""
    return OperationPublic.of(await migrations.cancel(svc.store, op_id, svc.clock))
