"""The node's VM-network loop: makes this node's bridges, VLAN links and DHCP servers match the
VM networks in the store, and frees what nothing needs any more.

One pass (``step``) reads the networks, then for each: the node's address on it (handed out by
the cluster once, ``NetworkService.node_address``), the bridge with the uplink's VLAN link and
that address (``network.bridges``), the DHCP server with a hosts file of the addresses held by
VMs (``network.dhcp``). Then it removes the networks realised here that the store no longer
has (DHCP server first, then the VLAN link and the bridge, then their state directory), the
taps of VMs that no longer exist, and gives back the addresses of VMs deleted without
``release`` (``NetworkService.sweep``). It returns one sentence per change.

Ordering: a network's state directory (``<data_dir>/networks/<name>/realised.json``, naming its
bridge) is written before the bridge is made, so an agent that crashes half-way, or restarts
after the network was deleted, still finds what to remove. The bridges and DHCP servers
outlive the agent (like QEMU): a restarted agent adopts them.

The loop runs a pass when anything under ``/aecp/network`` changes (networks and their
addresses: a new VM's address is in the DHCP hosts file before its QEMU starts) and at least
every ``interval`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from pathlib import Path

from aecp.cluster.networks import NetworkService
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError
from aecp.common.tasks import cancel, spawn
from aecp.model.network import NetworkRecord
from aecp.model.vm import VMSpec
from aecp.network import bridges
from aecp.network.dhcp import DhcpServer, dnsmasq_argv, hosts_text
from aecp.store import keys
from aecp.store.base import Store

log = logging.getLogger(__name__)
WATCHED = keys.ROOT + "network"  # networks/ and network-ips/
_TAP = re.compile(r"^vt([0-9a-f]{7})[0-9a-f]{2}n[0-9]+$")


class NetworkReconciler:
    """Realises the cluster's VM networks on node ``node``; state in ``state_dir``."""

    def __init__(
        self,
        node: str,
        store: Store,
        state_dir: Path,
        uplink: str = "",
        clock: Clock = SYSTEM_CLOCK,
        interval: float = 5.0,
    ) -> None:
        self.node = node
        self.store = store
        self.state_dir = state_dir
        self.uplink = uplink
        self.clock = clock
        self.interval = interval
        self.networks = NetworkService(store, clock)
        self._wake = asyncio.Event()
        self._said_no_uplink = False

    # ---- one pass -----------------------------------------------------------------------
    async def step(self) -> list[str]:
        """One reconcile pass; returns what it changed, one sentence each."""
        done: list[str] = []
        recs = {r.name: r for r in await self.networks.records()}
        if recs and not self.uplink and not self._said_no_uplink:
            self._said_no_uplink = True
            log.info(
                "node %s: no VM uplink (network.vm_uplink): VM networks stay on this node",
                self.node,
            )
        for rec in recs.values():
            done += await self._realise(rec)
        for name in self._realised() - set(recs):
            done += await self._unrealise(name)
        done += await self._orphan_taps(recs)
        done += [f"address {a} of a deleted VM given back" for a in await self.networks.sweep()]
        return done

    async def _realise(self, rec: NetworkRecord) -> list[str]:
        bridge = bridges.bridge_name(rec.vlan, self.node)
        d = self.state_dir / rec.name
        self._record(d, rec, bridge)
        address = await self.networks.node_address(rec.name, self.node) or ""
        changes = await bridges.ensure_bridge(bridge, rec.vlan, self.uplink, self.node, address)
        held = await self.networks.holders(rec.name)
        argv = dnsmasq_argv(rec, bridge, d)
        if address:
            hosts = hosts_text((ip, h) for ip, (h, _) in held.items())
            changes += await DhcpServer(d).ensure(argv, hosts)
        return [f"network {rec.name}: {c}" for c in changes]

    def _record(self, d: Path, rec: NetworkRecord, bridge: str) -> None:
        want = {"bridge": bridge, "vlan": rec.vlan, "uplink": self.uplink}
        path = d / "realised.json"
        try:
            if json.loads(path.read_text()) == want:
                return
        except (OSError, ValueError):
            pass
        d.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want))

    def _realised(self) -> set[str]:
        try:
            return {p.name for p in self.state_dir.iterdir() if (p / "realised.json").exists()}
        except OSError:
            return set()

    async def _unrealise(self, name: str) -> list[str]:
        """Stop the DHCP server of network ``name``, then delete its VLAN link and bridge, then
        its state directory."""
        d = self.state_dir / name
        try:
            was = json.loads((d / "realised.json").read_text())
        except (OSError, ValueError):
            was = {}
        await DhcpServer(d).stop()
        if was.get("bridge"):
            await bridges.remove_bridge(
                str(was["bridge"]), int(was.get("vlan", 0)), str(was.get("uplink", "")), self.node
            )
        shutil.rmtree(d, ignore_errors=True)
        return [f"network {name}: deleted from the store; its bridge and DHCP server removed"]

    async def _orphan_taps(self, recs: dict[str, NetworkRecord]) -> list[str]:
        """Delete the taps of VMs that no longer exist (a VM deleted while its node's agent
        was down, or by code that did not call ``remove_taps``). Only taps on this node's
        bridges of this cluster's networks are looked at: the loopback lab runs every node
        of every lab in one network namespace, where the others' taps are not ours."""
        mine = {bridges.bridge_name(r.vlan, self.node) for r in recs.values()}
        taps = [t for t in bridges.links_here("vt") if _TAP.match(t) and bridges.master(t) in mine]
        if not taps:
            return []
        uuids = {
            VMSpec.load(kv.value).uuid.replace("-", "")[:7]
            for kv in await self.store.list(keys.VMS)
            if kv.key.endswith("/spec")
        }
        out = []
        for tap in taps:
            m = _TAP.match(tap)
            if m and m[1] not in uuids:
                await bridges.remove_tap(tap)
                out.append(f"tap {tap} of a deleted VM removed")
        return out

    # ---- the loop -----------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Reconcile on every change under ``/aecp/network`` and every ``interval`` s."""
        watcher = spawn(self._watch(), name=f"netwatch-{self.node}")
        try:
            while True:
                self._wake.clear()
                try:
                    for sentence in await self.step():
                        log.info("node %s: %s", self.node, sentence)
                except AecpError as exc:
                    log.warning("node %s: VM networks: %s", self.node, exc)
                await self._wait()
        finally:
            await cancel(watcher)

    async def _wait(self) -> None:
        waiter = asyncio.ensure_future(self._wake.wait())
        sleeper = asyncio.ensure_future(self.clock.sleep(self.interval))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel(waiter, sleeper)

    async def _watch(self) -> None:
        while True:
            try:
                async with self.store.watch(WATCHED) as events:
                    async for _ in events:
                        self._wake.set()
            except AecpError as exc:
                log.debug("node %s: network watch broke (%s); watching again", self.node, exc)
            await self.clock.sleep(1.0)
