"""``GET /v1/ha``: the HA trio's status as the local HA agent reads it now (``HAStatus``:
members, leader, epoch, RPO, whether automatic failover can happen).

Any role that may read clusters may read it (``cluster.read``). A standalone center has no
trio: ``404`` saying so. In a trio the agent is asked at each request (``2 s`` at most); one
that does not answer makes it ``503``, saying why."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from aecp.center.accounts import Caller
from aecp.center.api.deps import bearer, needs
from aecp.center.ha.gate import fetch_status, leadership_of
from aecp.center.ha.model import HAStatus
from aecp.common import apierrors as errors
from aecp.common.errors import NotFound

router = APIRouter(tags=["ha"])
MayClusterRead = Annotated[Caller, Depends(needs("cluster.read"))]


@router.get(
    "/v1/ha",
    operation_id="ha_status",
    dependencies=[Depends(bearer)],
    responses=errors.error_responses(401, 403, 404, 503),
)
async def ha_status(request: Request, who: MayClusterRead) -> HAStatus:
    """The trio's status now, from the local HA agent."""
    leadership = leadership_of(request.app)
    if leadership is None:
        raise NotFound("this center runs standalone: it is not part of an HA trio")
    return await fetch_status(leadership.http, leadership.ha)
