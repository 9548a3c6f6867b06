"""The cluster API's models, one module per resource: what a request takes (Create, Update)
and what the API answers (Public). No stored record is answered as it is."""

from __future__ import annotations

from aecp.cluster.api.models.common import Accepted, EventPublic
from aecp.cluster.api.models.vms import VMPublic

__all__ = ["Accepted", "EventPublic", "VMPublic"]
