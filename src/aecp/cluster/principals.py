"""API principals: create (the token is shown once), list, revoke; and the check of a token.

Every request reads its principal from the store, so a revocation takes effect at once on
every node. The last ``admin`` principal cannot be revoked (nobody could manage principals
after): a revocation of an admin is stored only while another admin still exists, in one
transaction, so two concurrent revocations cannot remove the last two.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    NotFound,
    StoreUnavailable,
    Unauthorized,
)
from aecp.model.base import check_name
from aecp.model.cluster import ClusterInfo
from aecp.model.principal import (
    FIRST_ADMIN,
    PrincipalRecord,
    Role,
    holder,
    new_principal_token,
)
from aecp.store import keys
from aecp.store.base import Compare, Delete, Store
from aecp.store.typed import read

log = logging.getLogger(__name__)
ROLES = ", ".join(r.value for r in Role)


class PrincipalPublic(BaseModel):
    """A principal as the API shows it (never its token or digest)."""

    name: str
    role: Role
    created_at: float
    created_by: str


class PrincipalCreated(PrincipalPublic):
    token: str  # shown once: only its digest is stored


def public(rec: PrincipalRecord) -> PrincipalPublic:
    return PrincipalPublic(
        name=rec.name, role=rec.role, created_at=rec.created_at, created_by=rec.created_by
    )


def parse_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidInput("role", f"unknown role {value!r}; one of {ROLES}") from None


class PrincipalService:
    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.clock = clock

    async def authenticate(self, token: str) -> PrincipalRecord:
        """The principal holding ``token``; ``Unauthorized`` if none does. A store that
        cannot be read says only that (the caller is not authenticated yet)."""
        try:
            found = await self._holder(token)
        except StoreUnavailable:
            raise StoreUnavailable(
                "the token cannot be checked now: the cluster store cannot be reached"
            ) from None
        if found is None:
            raise Unauthorized("invalid token")
        return found

    async def _holder(self, token: str) -> PrincipalRecord | None:
        name = holder(token)
        try:
            check_name("principal", name)
        except InvalidInput:
            return None
        got = await read(self.store, keys.principal(name), PrincipalRecord)
        if got is not None:
            return got[0] if got[0].token_ok(token) else None
        if name == FIRST_ADMIN and "." not in token:
            return await self._before_principals(token)
        return None

    async def _before_principals(self, token: str) -> PrincipalRecord | None:
        """A cluster made before principals, not yet adopted (``cluster.upgrades``): its one
        token is the admin's while no principal exists, and using it adopts it now (so a
        principal it creates next never leaves the cluster without an admin)."""
        if await self.store.list(keys.PRINCIPALS):
            return None
        got = await read(self.store, keys.CLUSTER, ClusterInfo)
        if got is None or not got[0].token_sha256 or not got[0].token_ok(token):
            return None
        rec = legacy_admin(got[0].token_sha256, self.clock.wall())
        if await self.store.create(keys.principal(FIRST_ADMIN), rec.dump()):
            log.info("the cluster's token is now principal %s (admin)", FIRST_ADMIN)
            return rec
        return await self._holder(token)  # adopted meanwhile, or another admin made

    async def create(self, name: str, role: str, by: str) -> PrincipalCreated:
        check_name("name", name)
        rec_role = parse_role(role)
        token, token_digest = new_principal_token(name)
        rec = PrincipalRecord(
            name=name,
            role=rec_role,
            token_sha256=token_digest,
            created_at=self.clock.wall(),
            created_by=by,
        )
        if not await self.store.create(keys.principal(name), rec.dump()):
            raise AlreadyExists(f"principal {name} already exists", field="name")
        log.info("principal %s (%s) created by %s", name, rec_role.value, by or "?")
        return PrincipalCreated(**public(rec).model_dump(), token=token)

    async def principals(self) -> list[PrincipalPublic]:
        kvs = await self.store.list(keys.PRINCIPALS)
        return sorted((public(PrincipalRecord.load(kv.value)) for kv in kvs), key=lambda p: p.name)

    async def revoke(self, name: str, by: str) -> None:
        """Delete principal ``name``: its token stops working at once."""
        check_name("name", name)
        for _ in range(5):
            kvs = {kv.key: kv for kv in await self.store.list(keys.PRINCIPALS)}
            kv = kvs.get(keys.principal(name))
            if kv is None:
                raise NotFound(f"principal {name} does not exist", principal=name)
            guards = [Compare.unchanged(kv.key, kv.mod_revision)]
            if PrincipalRecord.load(kv.value).role is Role.ADMIN:
                others = [
                    o
                    for o in kvs.values()
                    if o.key != kv.key and PrincipalRecord.load(o.value).role is Role.ADMIN
                ]
                if not others:
                    raise Conflict(
                        f"principal {name} is the last admin: create another admin before "
                        "revoking it",
                        principal=name,
                    )
                guards += [Compare.unchanged(o.key, o.mod_revision) for o in others]
            if await self.store.txn(guards, [Delete(kv.key)]):
                log.info("principal %s revoked by %s", name, by or "?")
                return
        raise Conflict("the principals keep changing; try again")


def legacy_admin(token_digest: str, now: float) -> PrincipalRecord:
    """The ``admin`` principal of a cluster's token from before principals."""
    return PrincipalRecord(
        name=FIRST_ADMIN,
        role=Role.ADMIN,
        token_sha256=token_digest,
        created_at=now,
        created_by="the cluster's first token",
    )


def first_admin(token_digest: str, now: float) -> PrincipalRecord:
    """The first principal of a new cluster (``aecp lab up``)."""
    return PrincipalRecord(
        name=FIRST_ADMIN,
        role=Role.ADMIN,
        token_sha256=token_digest,
        created_at=now,
        created_by="cluster creation",
    )
