"""A VM's serial console: its log (read on the VM's node, relayed from any other) and the
socket of its interactive console (on the VM's node only). The API's routes carry bytes;
the decisions are here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from aecp.cluster.vms import VMService
from aecp.common.errors import Conflict, NotFound, Unavailable

MAX_LOG = 4 * 1024 * 1024


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str | None


class ConsoleService:
    """The consoles of the VMs, as node ``node`` serves them: its VMs' logs are under
    ``run_dir/<vm>/``; ``socket_of`` finds the console socket of a VM it runs."""

    def __init__(
        self,
        vms: VMService,
        node: str,
        run_dir: Path,
        socket_of: Callable[[str], Path | None],
    ) -> None:
        self.vms, self.node, self.run_dir, self.socket_of = vms, node, run_dir, socket_of

    async def log(self, vm: str, tail: int, path_and_query: str, authorization: str) -> Answer:
        """The last ``tail`` bytes of ``vm``'s console log: read here if it runs here, else
        the answer of its node (relayed as it is: a log, or an error body)."""
        entry, view = await self.vms.vm(vm)
        owner = entry.node
        if owner is None:
            raise Conflict(f"VM {vm} has not been placed on a node yet", vm=vm)
        if owner != self.node:
            if owner not in view.nodes:
                raise Unavailable(f"VM {vm} is on node {owner}, which is not registered")
            return await _relay(view.nodes[owner].api_url, path_and_query, authorization)
        data = await asyncio.to_thread(_read_tail, self.run_dir / vm / "console.log", tail)
        return Answer(200, data, "text/plain; charset=utf-8")

    async def socket(self, vm: str) -> Path:
        """The socket of ``vm``'s interactive console (``NotFound`` if it runs elsewhere,
        ``Conflict`` if it is not running)."""
        entry, _ = await self.vms.vm(vm)
        if entry.node != self.node:
            raise NotFound(f"VM {vm} does not run on {self.node}; ask node {entry.node}")
        path = self.socket_of(vm)
        if path is None:
            raise Conflict(f"VM {vm} is not running: it has no console", vm=vm)
        return path


def _read_tail(path: Path, tail: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - tail))
            return f.read()
    except FileNotFoundError:
        return b""


async def _relay(api_url: str, path_and_query: str, authorization: str) -> Answer:
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            resp = await client.get(
                api_url + path_and_query, headers={"authorization": authorization}
            )
    except httpx.HTTPError as exc:
        raise Unavailable(f"the VM's node at {api_url} did not answer: {exc}") from None
    return Answer(resp.status_code, resp.content, resp.headers.get("content-type"))
