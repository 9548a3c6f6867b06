"""``/v1/tokens``: API principals (admin only). A new principal's token is in the answer to
its creation, and nowhere else, ever."""

from __future__ import annotations

from fastapi import Response, status

from aecp.cluster.api.deps import NamePath, Principal, Principals
from aecp.cluster.api.models.tokens import PrincipalCreate, PrincipalCreated, PrincipalPublic
from aecp.cluster.api.pages import Page, paginate
from aecp.cluster.api.routing import SECRET_ANSWER, api_router
from aecp.common.apierrors import error_responses

router = api_router("/v1/tokens", "tokens", admin_only=True)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    operation_id="create_token",
    responses=error_responses(409),
    openapi_extra={SECRET_ANSWER: True},
)
async def create_token(
    body: PrincipalCreate, principals: Principals, caller: Principal
) -> PrincipalCreated:
    """A new principal with ``role``; the answer holds its token, shown this once."""
    return await principals.create(body.name, body.role, caller.name)


@router.get("", operation_id="list_tokens")
async def list_tokens(
    principals: Principals, page: Page, response: Response
) -> list[PrincipalPublic]:
    return paginate(await principals.principals(), "tokens", lambda p: [p.name], page, response)


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="revoke_token",
    responses=error_responses(404, 409),
)
async def revoke_token(name: NamePath, principals: Principals, caller: Principal) -> None:
    """Revoke the principal: its token stops working at once, on every node. The last admin
    cannot be revoked."""
    await principals.revoke(name, caller.name)
