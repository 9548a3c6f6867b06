"""VM network requests below the REST layer: create, list, show, delete, and the addresses the
cluster hands out (``allocate`` for a new VM's NICs, ``release`` for a deleted VM's,
``node_address`` for a node's bridge, ``sweep`` for addresses whose VM is gone).

Ordering and races: every write that hands out an address of a network also rewrites the
network's record (same value, new revision) and is guarded on the revision it read. So the
address writes of one network are serialised (two VMs created at once never get the same
address: the second transaction fails and is retried with a fresh read), and a delete of the
network, guarded the same way, cannot interleave with a VM being given one of its addresses.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from aecp.model.base import check_name
from aecp.model.network import (
    AddressHolder,
    NetworkCreate,
    NetworkRecord,
    highest_free,
    lowest_free,
    nic_mac,
)
from aecp.model.vm import VMNic, VMSpec
from aecp.store import keys
from aecp.store.base import Compare, Delete, KeyValue, Put, Store

log = logging.getLogger(__name__)


class AddressPublic(BaseModel):
    ip: str
    holder: str  # "vm", "node"
    vm: str = ""
    nic: int = 0
    node: str = ""


class NetworkPublic(BaseModel):
    name: str
    vlan: int
    subnet: str
    gateway: str
    created_at: float
    addresses: list[AddressPublic] = []  # handed out (show; empty in lists)


@dataclass
class Allocation:
    """Addresses picked for a new VM: its NICs with their addresses, and the guards and writes
    the caller's transaction must carry (they hand the addresses out)."""

    nics: list[VMNic]
    guards: list[Compare] = field(default_factory=list)
    puts: list[Put] = field(default_factory=list)


def release(spec: VMSpec) -> list[Delete]:
    """The deletes that give a deleted VM's addresses back: put them in the transaction that
    deletes its keys."""
    return [Delete(keys.network_ip(n.network, n.ip)) for n in spec.nics if n.ip]


class NetworkService:
    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.clock = clock

    # ---- reads -------------------------------------------------------------------------
    async def record(self, name: str) -> tuple[NetworkRecord, int]:
        check_name("name", name)
        kv = await self.store.get(keys.network(name))
        if kv is None:
            raise NotFound(f"network {name} does not exist", network=name)
        return NetworkRecord.load(kv.value), kv.mod_revision

    async def records(self) -> list[NetworkRecord]:
        return [NetworkRecord.load(kv.value) for kv in await self.store.list(keys.NETWORKS)]

    async def holders(self, name: str) -> dict[str, tuple[AddressHolder, KeyValue]]:
        """The addresses of network ``name`` handed out, by address."""
        prefix = keys.network_ips(name)
        out = {}
        for kv in await self.store.list(prefix):
            out[kv.key[len(prefix) :]] = (AddressHolder.load(kv.value), kv)
        return out

    async def all(self) -> list[NetworkPublic]:
        return [_public(r) for r in await self.records()]

    async def show(self, name: str) -> NetworkPublic:
        rec, _ = await self.record(name)
        held = await self.holders(name)
        addrs = [
            AddressPublic(ip=ip, holder=h.kind, vm=h.vm, nic=h.nic, node=h.node)
            for ip, (h, _) in sorted(held.items(), key=lambda i: ipaddress.IPv4Address(i[0]))
        ]
        return _public(rec, addrs)

    # ---- create / delete ----------------------------------------------------------------
    async def create(self, req: NetworkCreate) -> NetworkRecord:
        """Validate ``req`` against the other networks (name, VLAN, overlapping subnet) and
        store it. Two creates racing past each other's checks: the later one (by store
        revision) finds the earlier one after writing, deletes itself and is refused."""
        net, gw = req.validate_fields()
        self._check_clash(req, net, await self.records())
        rec = NetworkRecord(
            name=req.name,
            vlan=req.vlan,
            subnet=str(net),
            gateway=str(gw),
            created_at=self.clock.wall(),
        )
        if not await self.store.create(keys.network(rec.name), rec.dump()):
            raise AlreadyExists(f"network {rec.name} already exists", field="name")
        await self._undo_if_raced(rec, net)
        log.info("network %s: created (VLAN %d, %s, gateway %s)", rec.name, rec.vlan, net, gw)
        return rec

    @staticmethod
    def _check_clash(
        req: NetworkCreate, net: ipaddress.IPv4Network, others: Sequence[NetworkRecord]
    ) -> None:
        for o in others:
            if o.name == req.name:
                raise AlreadyExists(f"network {req.name} already exists", field="name")
            if o.vlan == req.vlan:
                raise Conflict(
                    f"VLAN {req.vlan} is network {o.name}'s", field="vlan", network=o.name
                )
            if o.net.overlaps(net):
                raise Conflict(
                    f"subnet {net} overlaps network {o.name}'s ({o.subnet})",
                    field="subnet",
                    network=o.name,
                )

    async def _undo_if_raced(self, rec: NetworkRecord, net: ipaddress.IPv4Network) -> None:
        kvs = {kv.key: kv for kv in await self.store.list(keys.NETWORKS)}
        mine = kvs.get(keys.network(rec.name))
        if mine is None:
            return
        for kv in kvs.values():
            if kv.create_revision >= mine.create_revision:
                continue
            other = NetworkRecord.load(kv.value)
            if other.vlan == rec.vlan or other.net.overlaps(net):
                await self.store.delete(mine.key, mod_revision=mine.mod_revision)
                req = NetworkCreate(name=rec.name, vlan=rec.vlan, subnet=rec.subnet)
                self._check_clash(req, net, [other])

    async def delete(self, name: str) -> None:
        """Delete network ``name`` and the addresses its nodes hold, unless a VM has a NIC on
        it (``Conflict`` naming the VMs)."""
        for _ in range(5):
            _, rev = await self.record(name)
            users = await self.users(name)
            if users:
                raise Conflict(
                    f"network {name} is in use by VM(s) {', '.join(users)}; delete them first",
                    network=name,
                    vms=users,
                )
            if await self.store.txn(
                [Compare.unchanged(keys.network(name), rev)],
                [Delete(keys.network(name)), Delete(keys.network_ips(name), prefix=True)],
            ):
                log.info("network %s: deleted", name)
                return
        raise Conflict(f"network {name} keeps changing; try again", network=name)

    async def users(self, name: str) -> list[str]:
        """The VMs with a NIC on network ``name``."""
        out = []
        for kv in await self.store.list(keys.VMS):
            if kv.key.endswith("/spec"):
                spec = VMSpec.load(kv.value)
                if any(n.network == name for n in spec.nics):
                    out.append(spec.name)
        return sorted(out)

    # ---- addresses ----------------------------------------------------------------------
    async def vlans(self, networks: Sequence[str]) -> dict[str, int]:
        """Each named network's VLAN; ``InvalidInput`` for ``networks`` naming one that does
        not exist."""
        out = {}
        for n in networks:
            kv = await self.store.get(keys.network(n))
            if kv is None:
                raise InvalidInput("networks", f"network {n} does not exist")
            out[n] = NetworkRecord.load(kv.value).vlan
        return out

    async def allocate(
        self,
        net: str,
        vm_name: str,
        vm_uuid: str,
        nic_index: int,
        exclude: frozenset[str] = frozenset(),
    ) -> tuple[str, list[Compare], list[Put]]:
        """The lowest free VM address of ``net`` (not the network's, broadcast or gateway
        address, none held, none in ``exclude``) and the guards and writes that hand it to NIC
        ``nic_index`` of the VM in the caller's transaction (the address key absent, the
        network unchanged and rewritten: see the module docstring). ``InvalidInput`` if the
        network does not exist; ``Conflict`` if it has no free address."""
        kv = await self.store.get(keys.network(net))
        if kv is None:
            raise InvalidInput("networks", f"network {net} does not exist")
        rec = NetworkRecord.load(kv.value)
        taken = set(await self.holders(net)) | exclude
        ip = lowest_free(rec, taken)
        if ip is None:
            raise Conflict(f"network {net} has no free address left", field="networks")
        mac = nic_mac(vm_uuid, nic_index)
        holder = AddressHolder(kind="vm", vm=vm_name, vm_uuid=vm_uuid, nic=nic_index, mac=mac)
        key = keys.network_ip(net, ip)
        guards = [Compare.absent(key), Compare.unchanged(kv.key, kv.mod_revision)]
        return ip, guards, [Put(key, holder.dump()), Put(kv.key, kv.value)]

    async def allocate_nics(self, spec: VMSpec) -> Allocation:
        """Addresses for every NIC of ``spec`` that has none (one transaction's worth: each
        network's record is rewritten once)."""
        nics: list[VMNic] = []
        guards: dict[tuple[str, str], Compare] = {}
        puts: dict[str, Put] = {}
        for i, nic in enumerate(spec.nics):
            if nic.ip:
                nics.append(nic)
                continue
            mine = frozenset(k.rsplit("/", 1)[1] for k in puts if _ip_key_of(k, nic.network))
            ip, cmp, wr = await self.allocate(nic.network, spec.name, spec.uuid, i, mine)
            vlan = nic.vlan or (await self.vlans([nic.network]))[nic.network]
            nics.append(nic.model_copy(update={"ip": ip, "vlan": vlan}))
            for c in cmp:
                guards.setdefault((c.key, c.target), c)
            for p in wr:
                puts[p.key] = p
        return Allocation(nics, list(guards.values()), list(puts.values()))

    async def taken_meanwhile(self, alloc: Allocation) -> bool:
        """True if an address ``alloc`` picked, or one of its networks, changed since: a
        transaction carrying it failed for that reason (retry with a fresh allocation)."""
        for c in alloc.guards:
            kv = await self.store.get(c.key)
            if c.target == "create" and kv is not None:
                return True
            if c.target == "mod" and (kv is None or kv.mod_revision != c.operand):
                return True
        return False

    async def node_address(self, net: str, node: str) -> str | None:
        """The address of ``node``'s bridge on ``net``, handed out now (the highest free) if it
        has none. None if the network is gone or has no free address."""
        for _ in range(5):
            kv = await self.store.get(keys.network(net))
            if kv is None:
                return None
            held = await self.holders(net)
            for have, (h, _) in held.items():
                if h.kind == "node" and h.node == node:
                    return have
            ip = highest_free(NetworkRecord.load(kv.value), set(held))
            if ip is None:
                return None
            key = keys.network_ip(net, ip)
            if await self.store.txn(
                [Compare.absent(key), Compare.unchanged(kv.key, kv.mod_revision)],
                [Put(key, AddressHolder(kind="node", node=node).dump()), Put(kv.key, kv.value)],
            ):
                log.info("network %s: address %s handed to node %s", net, ip, node)
                return ip
        return None

    async def sweep(self) -> list[str]:
        """Give back the addresses held for VMs that no longer exist (a VM deleted by code
        that did not ``release`` them); returns ``network/ip`` of each freed."""
        freed = []
        for kv in await self.store.list(keys.NETWORK_IPS):
            holder = AddressHolder.load(kv.value)
            if holder.kind != "vm":
                continue
            spec_kv = await self.store.get(keys.vm_spec(holder.vm))
            if spec_kv is not None and VMSpec.load(spec_kv.value).uuid == holder.vm_uuid:
                continue
            vm_guard = (
                Compare.absent(keys.vm_spec(holder.vm))
                if spec_kv is None
                else Compare.unchanged(spec_kv.key, spec_kv.mod_revision)
            )
            if await self.store.txn(
                [Compare.unchanged(kv.key, kv.mod_revision), vm_guard], [Delete(kv.key)]
            ):
                freed.append(kv.key[len(keys.NETWORK_IPS) :])
        if freed:
            log.info("networks: addresses of deleted VMs given back: %s", ", ".join(freed))
        return freed


def _ip_key_of(key: str, net: str) -> bool:
    return key.startswith(keys.network_ips(net))


def _public(rec: NetworkRecord, addrs: list[AddressPublic] | None = None) -> NetworkPublic:
    return NetworkPublic(
        name=rec.name,
        vlan=rec.vlan,
        subnet=rec.subnet,
        gateway=rec.gateway,
        created_at=rec.created_at,
        addresses=addrs or [],
    )
