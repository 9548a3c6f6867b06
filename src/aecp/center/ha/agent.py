"""The HA agent: one per node of the trio (``aecp center ha agent``), on its HA IP.

On a data node it runs the management-IP mover (``vip.Mover``: the IP is here exactly while the
leader key is this node's and its PostgreSQL is the primary). On every node, the witness's
included, it is the health monitor: once a second it asks Patroni (``GET /cluster``, its own
first) and the other agents (``GET /local``) and keeps the trio's status (``status.compose``)
with the RPO state tracked over time (``rpo.RPOTracker``).

HTTP, every call with ``Authorization: Bearer <the trio's agent secret>``:

- ``GET /local``: this node's own facts (whether it holds the management IP, its last
  decisions, one sentence each);
- ``GET /status``: the trio's status as this node sees it (``model.HAStatus``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Header, HTTPException

from aecp.center.ha import status
from aecp.center.ha.etcdgw import EtcdGateway
from aecp.center.ha.model import HAStatus, Role, RPOKind, RPOState
from aecp.center.ha.patroni import NodePaths, Secrets
from aecp.center.ha.rpo import RPOTracker, standbys_from_patroni
from aecp.center.ha.topology import AGENT_PORT, PATRONI_PORT, HANode, Topology, load
from aecp.center.ha.vip import GatewayLeader, Mover, NetnsAddress, PatroniRole
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import InvalidInput
from aecp.common.tasks import cancel, spawn

log = logging.getLogger("aecp.center.ha.agent")
POLL_S = 1.0
ASK_TIMEOUT = 1.0


class Agent:
    """The agent's state and loops; ``mover`` is None on the witness."""

    def __init__(
        self,
        topology: Topology,
        me: HANode,
        secrets: Secrets,
        http: httpx.AsyncClient,
        mover: Mover | None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.topology, self.me, self.secrets = topology, me, secrets
        self.http, self.mover, self.clock = http, mover, clock
        self.rpo = RPOTracker(clock)
        self.status: HAStatus | None = None
        self._auth = {"Authorization": f"Bearer {secrets.agent}"}

    def local(self) -> dict[str, Any]:
        return {
            "name": self.me.name,
            "role": str(self.me.role),
            "holds_management_ip": self.mover.holds if self.mover else False,
            "decisions": list(self.mover.decisions) if self.mover else [],
        }

    async def poll_once(self) -> HAStatus:
        cluster = await self._patroni_cluster()
        others = [n for n in self.topology.nodes if n.name != self.me.name]
        answers = await asyncio.gather(*(self._local_of(n) for n in others))
        locals_: dict[str, Any] = {n.name: a for n, a in zip(others, answers, strict=True)}
        locals_[self.me.name] = self.local()
        rpo = self._rpo(cluster)
        self.status = status.compose(self.topology, cluster, locals_, rpo, self.clock.wall())
        return self.status

    def _rpo(self, cluster: dict[str, Any] | None) -> RPOState:
        if cluster is None:
            return RPOState(kind=RPOKind.UNKNOWN)
        leader_known, standbys = standbys_from_patroni(cluster)
        before = self.status.rpo.kind if self.status else None
        state = self.rpo.observe(leader_known, standbys)
        if before is not None and state.kind is not before:
            log.warning("ha: the RPO state is now %s (was %s)", state.text, before)
        return state

    async def _patroni_cluster(self) -> dict[str, Any] | None:
        order = sorted(self.topology.data_nodes, key=lambda n: n.name != self.me.name)
        for node in order:
            try:
                r = await self.http.get(
                    f"http://{node.ha_ip}:{PATRONI_PORT}/cluster", timeout=ASK_TIMEOUT
                )
                if r.status_code == 200:
                    data = r.json()
                    if isinstance(data, dict):
                        return data
            except (httpx.HTTPError, ValueError):
                continue
        return None

    async def _local_of(self, node: HANode) -> dict[str, Any] | None:
        try:
            r = await self.http.get(
                f"http://{node.ha_ip}:{AGENT_PORT}/local", headers=self._auth, timeout=ASK_TIMEOUT
            )
            if r.status_code == 200:
                data = r.json()
                return data if isinstance(data, dict) else None
        except (httpx.HTTPError, ValueError):
            pass
        return None

    async def run(self) -> None:
        """Poll for ever (and move the IP, on a data node); cancelled to stop."""
        moving = spawn(self.mover.run(), name="vip-mover") if self.mover else None
        try:
            while True:
                with contextlib.suppress(Exception):
                    await self.poll_once()
                await self.clock.sleep(POLL_S)
        finally:
            if moving is not None:
                await cancel(moving)


def make_app(agent: Agent) -> FastAPI:
    app = FastAPI(title="AECP HA agent", docs_url=None, redoc_url=None, openapi_url=None)

    def authorized(authorization: Annotated[str, Header()] = "") -> None:
        token = authorization.removeprefix("Bearer ")
        if not hmac.compare_digest(token.encode(), agent.secrets.agent.encode()):
            raise HTTPException(401, "the trio's agent secret is required")

    @app.get("/local", dependencies=[Depends(authorized)])
    def local() -> dict[str, Any]:
        return agent.local()

    @app.get("/status", dependencies=[Depends(authorized)])
    def trio() -> dict[str, Any]:
        if agent.status is None:
            raise HTTPException(503, "no reading yet")
        return agent.status.model_dump(mode="json")

    return app


def load_secrets(path: Path) -> Secrets:
    return Secrets.from_dict(json.loads(path.read_text()))


async def serve(topology: Topology, me: HANode, paths: NodePaths, secrets: Secrets) -> None:
    import uvicorn

    async with httpx.AsyncClient(trust_env=False) as http:
        mover = None
        gateway = None
        role = None
        if me.role is not Role.WITNESS:
            own = f"{me.ha_ip}:2379"  # its own member first, then the others
            gateway = EtcdGateway(
                [own, *(e for e in topology.etcd_endpoints() if e != own)],
                ca=paths.tls / "ca.crt",
                cert=paths.tls / "node.crt",
                key=paths.tls / "node.key",
            )
            role = PatroniRole(f"http://{me.ha_ip}:{PATRONI_PORT}")
            mover = Mover(
                me.name,
                NetnsAddress(topology.management_iface, topology.management_ip),
                GatewayLeader(gateway, topology.leader_key),
                role,
                SYSTEM_CLOCK,
            )
        agent = Agent(topology, me, secrets, http, mover)
        running = spawn(agent.run(), name="ha-agent")
        config = uvicorn.Config(
            make_app(agent), host=me.ha_ip, port=AGENT_PORT, log_level="warning"
        )
        try:
            await uvicorn.Server(config).serve()
        finally:
            await cancel(running)
            if gateway is not None:
                await gateway.aclose()
            if role is not None:
                await role.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aecp center ha agent")
    parser.add_argument("--topology", type=Path, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--base", type=Path, required=True, help="the node's state directory")
    parser.add_argument("--secrets", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        topology = load(args.topology)
        me = topology.node(args.node)
        paths = NodePaths(args.base)
        paths.claim(topology.cluster_id)
    except InvalidInput as e:
        raise SystemExit(f"aecp center ha agent: {e.fields.get('field')}: {e}") from None
    asyncio.run(serve(topology, me, paths, load_secrets(args.secrets)))


if __name__ == "__main__":
    main()
