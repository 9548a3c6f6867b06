"""Operations: long-running requests as objects with a state and a progress figure."""

from __future__ import annotations

import enum
import secrets

from aecp.model.base import Stored


class OpState(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self is not OpState.RUNNING


class Operation(Stored):
    """``/aecp/ops/<id>``: created by the API with the request, finished by whoever carries it
    out (the scheduler, the node agent). ``progress`` is 0-100."""

    id: str
    kind: str  # e.g. "vm.create", "vm.shutdown"
    target: str  # the object's name
    state: OpState = OpState.RUNNING
    progress: int = 0
    message: str = ""
    error: str = ""
    created_at: float
    updated_at: float

    def advance(self, progress: int, message: str, now: float) -> Operation:
        return self.model_copy(
            update={"progress": max(self.progress, progress), "message": message, "updated_at": now}
        )

    def succeed(self, message: str, now: float) -> Operation:
        return self.model_copy(
            update={
                "state": OpState.SUCCEEDED,
                "progress": 100,
                "message": message,
                "updated_at": now,
            }
        )

    def fail(self, error: str, now: float) -> Operation:
        return self.model_copy(
            update={"state": OpState.FAILED, "error": error, "message": error, "updated_at": now}
        )


def new_op_id() -> str:
    return "op-" + secrets.token_hex(6)
