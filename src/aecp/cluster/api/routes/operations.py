"""``/v1/operations``: long-running requests and their progress."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Response

from aecp.cluster.api.deps import Operations
from aecp.cluster.api.models.operations import OperationPublic
from aecp.cluster.api.pages import Page, paginate
from aecp.cluster.api.routing import api_router
from aecp.common.apierrors import error_responses
from aecp.model.operation import OpState

router = api_router("/v1/operations", "operations")


@router.get("", operation_id="list_operations")
async def list_operations(
    svc: Operations,
    page: Page,
    response: Response,
    state: Annotated[OpState | None, Query(description="in this state")] = None,
    target: Annotated[str | None, Query(max_length=128, description="about this object")] = None,
) -> list[OperationPublic]:
    """Operations, oldest first (``limit``/``cursor`` pages them; ``state`` and ``target``
    filter them)."""
    ops = [
        OperationPublic.of(op)
        for op in await svc.operations()
        if (state is None or op.state is state) and (target is None or op.target == target)
    ]
    list_id = f"operations?state={state.value if state else ''}&target={target or ''}"
    return paginate(ops, list_id, lambda o: [o.created_at, o.id], page, response)


@router.get("/{op_id}", operation_id="get_operation", responses=error_responses(404))
async def get_operation(op_id: str, svc: Operations) -> OperationPublic:
    return OperationPublic.of(await svc.operation(op_id))
