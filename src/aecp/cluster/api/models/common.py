"""Models every resource's routes share: an accepted request's operation, an object's
events."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from aecp.cluster.api.models.operations import OperationPublic
from aecp.model.base import Name
from aecp.model.event import ObjectEvent
from aecp.model.operation import Operation


class EventPublic(BaseModel):
    """What a controller decided about an object (``aecp vm events``, ``aecp node events``)."""

    at: float
    role: str
    node: str
    sentence: str

    @classmethod
    def of(cls, event: ObjectEvent) -> EventPublic:
        return cls(at=event.at, role=event.role, node=event.node, sentence=event.sentence)


class Accepted(BaseModel):
    """A request that takes time: follow ``operation`` to its end."""

    operation: OperationPublic

    @classmethod
    def of(cls, op: Operation) -> Accepted:
        return cls(operation=OperationPublic.of(op))


class NewName(BaseModel):
    """The body of a request that makes an object of this name (a snapshot, a template, a
    clone of a volume)."""

    model_config = ConfigDict(extra="forbid")

    name: Name
