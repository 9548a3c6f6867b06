"""Test support for whole-lab tests: start a lab on its own loopback subnet, talk to its API,
wait for conditions (polling with a deadline; never asserting on durations)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

from aecp.common.tls import Credentials
from aecp.compute.images.tiny import ensure_tiny_image
from aecp.lab.harness import Lab, LabSpec
from aecp.node.vmdisks import local_uri
from aecp.storage.chunk.auth import ReplicaAuth
from aecp.store.etcd import EtcdStore

T = TypeVar("T")
# keys that background loops rewrite on their own (heartbeats, free space, attachments of
# clients that just left, recovery progress, leadership): not state a request could change
VOLATILE = (
    "/aecp/alive/",
    "/aecp/abs/servers/",
    "/aecp/abs/attach/",
    "/aecp/abs/epoch",
    "/aecp/abs/recovery/",
    "/aecp/leaders/",
)


async def wait_for(
    check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 60, every: float = 0.2
) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class LabKit:
    """A running lab plus an authenticated API client."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.http = httpx.AsyncClient(
            timeout=30, headers={"authorization": f"Bearer {lab.token()}"}
        )

    def url(self, node: str = "node1") -> str:
        return self.lab.api_url(node)

    async def call(
        self, method: str, path: str, node: str | None = None, **kw: Any
    ) -> httpx.Response:
        """Call ``node``'s API, or the first node whose API answers (like the CLI does)."""
        if node is not None:
            return await self.http.request(method, self.url(node) + path, **kw)
        error: Exception | None = None
        for name in self.lab.node_names:
            try:
                return await self.http.request(method, self.url(name) + path, **kw)
            except httpx.TransportError as exc:
                error = exc
        raise AssertionError(f"no node API answered: {error!r}")

    async def vm(self, name: str) -> dict[str, Any]:
        r = await self.call("GET", f"/v1/vms/{name}")
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    async def create_vm(self, name: str, **fields: Any) -> dict[str, Any]:
        r = await self.call("POST", "/v1/vms", json={"name": name, "image": "tiny", **fields})
        assert r.status_code == 202, r.text
        return await self.wait_op(r.json()["operation"]["id"])

    async def action(self, name: str, action: str) -> dict[str, Any]:
        r = await self.call("POST", f"/v1/vms/{name}/actions/{action}")
        assert r.status_code == 202, r.text
        return await self.wait_op(r.json()["operation"]["id"])

    async def wait_op(self, op_id: str, timeout: float = 120) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            op: dict[str, Any] = (await self.call("GET", f"/v1/operations/{op_id}")).json()
            return op if op["state"] != "running" else None

        return await wait_for(done, f"operation {op_id}", timeout)

    async def console(self, name: str) -> str:
        r = await self.call("GET", f"/v1/vms/{name}/console/log")
        r.raise_for_status()
        return r.text

    async def wait_console(self, name: str, text: str, count: int = 1, timeout: float = 90) -> str:
        async def seen() -> str | None:
            log = await self.console(name)
            return log if log.count(text) >= count else None

        return await wait_for(seen, f"{text!r} x{count} on {name}'s console", timeout)

    async def wait_vm(self, name: str, state: str, timeout: float = 60) -> dict[str, Any]:
        async def reached() -> dict[str, Any] | None:
            vm = await self.vm(name)
            return vm if vm["state"] == state else None

        return await wait_for(reached, f"{name} {state}", timeout)

    async def node_state(self, name: str, via: str | None = None) -> str:
        """The node's state as the API on ``via`` reports it ("http 503" while etcd elects)."""
        r = await self.call("GET", f"/v1/nodes/{name}", node=via)
        if r.status_code != 200:
            return f"http {r.status_code}"
        state: str = r.json()["state"]
        return state

    def etcd(self) -> EtcdStore:
        """A store on the lab's etcd (with the credentials the lab's tools use); close it."""
        return self.lab.etcd_cluster().client()

    def nbd_uri(self, volume: str, node: str = "node1") -> str:
        """``volume`` on ``node``'s local NBD socket (what its QEMU uses; tests run as root)."""
        return local_uri(self.lab.node_settings(node).nbd_socket, volume)

    def replica_auth(self, node: str = "node1") -> ReplicaAuth:
        """Replica credentials of ``node``, for a test that acts as that node's access point."""
        return ReplicaAuth(Credentials(self.lab.ca.node_bundle(node)))

    async def store_dump(self) -> dict[str, bytes]:
        """Every key in etcd (to show a refused request changed nothing), minus heartbeats."""
        store = self.etcd()
        try:
            kvs = await store.list("/aecp/")
        finally:
            await store.close()
        return {kv.key: kv.value for kv in kvs if not kv.key.startswith(VOLATILE)}


@asynccontextmanager
async def running_lab(root: Path, **spec: Any) -> AsyncIterator[LabKit]:
    """A lab under ``root`` (give each module its own ``subnet``); always torn down."""
    lab = Lab(
        root,
        LabSpec(
            **{
                "accel": "auto",
                "lease_ttl": 3,
                "node_memory_mib": 2048,
                "resync_interval": 1.0,
                **spec,
            }
        ),
    )
    kit: LabKit | None = None
    try:
        await lab.up(image=ensure_tiny_image())
        kit = LabKit(lab)
        yield kit
    finally:
        if kit is not None:
            await kit.http.aclose()
        if (root / "lab.json").exists():
            _keep_logs(lab, root.parent / "logs")
            lab.down()


def _keep_logs(lab: Lab, dest: Path) -> None:
    """Copy the lab's logs next to it before ``down`` removes it (for failure analysis)."""
    dest.mkdir(parents=True, exist_ok=True)
    for log in lab.root.rglob("*.log"):
        rel = log.relative_to(lab.root)
        (dest / str(rel).replace("/", "_")).write_bytes(log.read_bytes())


async def console_command(
    kit: LabKit, vm: str, command: str, expect: str, timeout: float = 60
) -> str:
    """Type ``command`` on ``vm``'s serial console and wait until ``expect`` is printed."""
    from websockets.asyncio.client import connect

    info = await kit.vm(vm)
    node = (await kit.call("GET", f"/v1/nodes/{info['node']}")).json()
    url = node["api_url"].replace("http://", "ws://") + f"/v1/vms/{vm}/console"
    seen = ""
    async with connect(
        url, additional_headers={"authorization": f"Bearer {kit.lab.token()}"}
    ) as ws:
        await ws.send(("\n" + command + "\n").encode())
        deadline = time.monotonic() + timeout
        while expect not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{expect!r} not printed by {command!r}: {seen[-800:]}")
            try:
                msg = await asyncio.wait_for(ws.recv(), timeout=left)
            except TimeoutError:
                continue
            seen += msg.decode(errors="replace") if isinstance(msg, bytes) else msg
    return seen
