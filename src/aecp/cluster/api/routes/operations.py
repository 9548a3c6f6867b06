"""``/v1/operations``: long-running requests and their progress."""

from __future__ import annotations

from aecp.cluster.api.deps import Service
from aecp.cluster.api.errors import error_responses, redact_paths
from aecp.cluster.api.routing import api_router
from aecp.model.operation import Operation

router = api_router("/v1/operations", "operations")


@router.get("", operation_id="list_operations")
async def list_operations(svc: Service) -> list[Operation]:
    return [public(op) for op in await svc.operations()]


@router.get("/{op_id}", operation_id="get_operation", responses=error_responses(404))
async def get_operation(op_id: str, svc: Service) -> Operation:
    return public(await svc.operation(op_id))


def public(op: Operation) -> Operation:
    """``op`` as callers see it: no server path in its message or error."""
    return op.model_copy(
        update={"message": redact_paths(op.message), "error": redact_paths(op.error)}
    )
