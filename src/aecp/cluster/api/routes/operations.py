"""``/v1/operations``: long-running requests and their progress."""

from __future__ import annotations

from fastapi import APIRouter

from aecp.cluster.api.deps import Service
from aecp.model.operation import Operation

router = APIRouter(prefix="/v1/operations", tags=["operations"])


@router.get("", operation_id="list_operations")
async def list_operations(svc: Service) -> list[Operation]:
    return await svc.operations()


@router.get("/{op_id}", operation_id="get_operation")
async def get_operation(op_id: str, svc: Service) -> Operation:
    return await svc.operation(op_id)
