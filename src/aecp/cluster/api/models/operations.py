"""Operations as the API shows them: no server path in a message or an error."""

from __future__ import annotations

from pydantic import BaseModel

from aecp.common.apierrors import redact_paths
from aecp.model.operation import Operation, OpState


class OperationPublic(BaseModel):
    id: str
    kind: str
    target: str
    state: OpState
    progress: int
    message: str
    error: str
    superseded_by: str
    requested_by: str
    detail: dict[str, float | int | str] = {}
    cancel_requested: bool = False
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, op: Operation) -> OperationPublic:
        return cls(
            **op.model_dump(exclude={"message", "error"}),
            message=redact_paths(op.message),
            error=redact_paths(op.error),
        )
