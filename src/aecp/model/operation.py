"""Operations: long-running requests as objects with a state and a progress figure.

Every operation ends: ``succeeded``, ``failed`` (``error`` says why) or ``cancelled`` (``error``
says why: ``superseded by op-…`` when a later request on the same object overtook it, or the
object was deleted). A finished operation never changes again.
"""

from __future__ import annotations

import enum
import secrets

from pydantic import Field

from aecp.model.base import Stored


class OpState(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self is not OpState.RUNNING


class Operation(Stored):
    """``/aecp/ops/<id>``: created by the API with the request, finished by whoever carries it
    out (the scheduler, the node agent), or cancelled by the API when a later request on the
    same object supersedes it (in the transaction that stores the later one). ``progress`` is
    0-100."""

    id: str
    kind: str  # e.g. "vm.create", "vm.shutdown"
    target: str  # the object's name
    state: OpState = OpState.RUNNING
    progress: int = 0
    message: str = ""
    error: str = ""
    superseded_by: str = ""  # the operation that cancelled this one, if any
    requested_by: str = ""  # the principal whose request created it ("" for none)
    # figures of the work under way, for people and tools (a migration: bytes sent and left,
    # passes, dirty rate, expected downtime); raw numbers, the CLI and UI format them
    detail: dict[str, float | int | str] = Field(default_factory=dict)
    cancel_requested: bool = False  # a user asked to cancel it; its carrier decides
    created_at: float
    updated_at: float

    def advance(
        self,
        progress: int,
        message: str,
        now: float,
        detail: dict[str, float | int | str] | None = None,
    ) -> Operation:
        update: dict[str, object] = {
            "progress": max(self.progress, progress),
            "message": message,
            "updated_at": now,
        }
        if detail is not None:
            update["detail"] = detail
        return self.model_copy(update=update)

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

    def cancel(self, reason: str, now: float, superseded_by: str = "") -> Operation:
        """Ended without being carried out to its end: ``reason`` says why."""
        return self.model_copy(
            update={
                "state": OpState.CANCELLED,
                "error": reason,
                "message": reason,
                "superseded_by": superseded_by,
                "updated_at": now,
            }
        )

    def superseded(self, by: str, now: float) -> Operation:
        return self.cancel(f"superseded by {by}", now, superseded_by=by)


def new_op_id() -> str:
    return "op-" + secrets.token_hex(6)
