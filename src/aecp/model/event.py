"""What a controller decided about an object, kept as the object's events."""

from __future__ import annotations

from aecp.model.base import Stored


class ObjectEvent(Stored):
    """``/aecp/events/<kind>/<name>/<stamp>``: one decision a controller took about an object
    (``role``: the controller; ``node``: the node whose process ran it; ``at``: wall time)."""

    at: float
    role: str
    node: str
    sentence: str
