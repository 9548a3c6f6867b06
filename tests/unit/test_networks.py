"""VM networks over the in-memory store: bad input gets a clear error and changes nothing;
addresses are handed out lowest first, once, in the VM's create transaction, and given back
when the VM is deleted; a network in use cannot be deleted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from aecp.cluster.api.app import create_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.networks import NetworkService, release
from aecp.cluster.vms import VMService
from aecp.model.network import AddressHolder, NetworkCreate, NetworkRecord, nic_mac
from aecp.model.vm import VMCreate, VMSpec
from aecp.network.bridges import bridge_name, tap_name
from aecp.network.dhcp import dnsmasq_argv, hosts_text
from aecp.node.vmnics import nics_for
from aecp.store import keys
from aecp.store.base import Delete
from aecp.store.memory import MemoryStore
from tests.unit.conftest import add_node, admin_token, dump_store

Api = tuple[httpx.AsyncClient, dict[str, str]]


@pytest.fixture
async def api(store: MemoryStore, images_dir: Path, tmp_path: Path) -> AsyncIterator[Api]:
    token = await admin_token(store)
    await add_node(store, "n1")
    app = create_app(
        VMService(store, images_dir),
        NodeContext("n1", "http://127.0.9.1:8700", tmp_path / "run", lambda vm: None),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client, {"authorization": f"Bearer {token}"}


async def _net(api: Api, name: str = "blue", vlan: int = 100, subnet: str = "10.10.0.0/24") -> None:
    client, auth = api
    r = await client.post(
        "/v1/networks", json={"name": name, "vlan": vlan, "subnet": subnet}, headers=auth
    )
    assert r.status_code == 201, r.text


async def test_a_network_is_created_with_its_first_host_as_gateway(api: Api) -> None:
    client, auth = api
    await _net(api)
    r = await client.get("/v1/networks/blue", headers=auth)
    assert r.json() | {"created_at": 0} == {
        "name": "blue",
        "vlan": 100,
        "subnet": "10.10.0.0/24",
        "gateway": "10.10.0.1",
        "created_at": 0,
        "addresses": [],
    }
    assert [n["name"] for n in (await client.get("/v1/networks", headers=auth)).json()] == ["blue"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"name": "red", "vlan": 0, "subnet": "10.20.0.0/24"}, 422, "vlan"),
        ({"name": "red", "vlan": 4095, "subnet": "10.20.0.0/24"}, 422, "vlan"),
        ({"name": "red", "vlan": "7", "subnet": "10.20.0.0/24"}, 422, "vlan"),
        ({"name": "red", "vlan": 7, "subnet": "10.20.0.0"}, 422, "subnet"),
        ({"name": "red", "vlan": 7, "subnet": "10.20.0.5/24"}, 422, "subnet"),
        ({"name": "red", "vlan": 7, "subnet": "10.20.0.0/33"}, 422, "subnet"),
        ({"name": "red", "vlan": 7, "subnet": "10.20.0.0/30"}, 422, "subnet"),
        ({"name": "red", "vlan": 7, "subnet": "fd00::/64"}, 422, "subnet"),
        ({"name": "red", "vlan": 7, "subnet": "127.1.0.0/16"}, 422, "subnet"),
        (
            {"name": "red", "vlan": 7, "subnet": "10.20.0.0/24", "gateway": "10.21.0.1"},
            422,
            "gateway",
        ),
        ({"name": "Red", "vlan": 7, "subnet": "10.20.0.0/24"}, 422, "name"),
        ({"name": "red", "vlan": 7, "subnet": "10.20.0.0/24", "mtu": 9000}, 422, "mtu"),
        ({"name": "blue", "vlan": 7, "subnet": "10.20.0.0/24"}, 409, "name"),
        ({"name": "red", "vlan": 100, "subnet": "10.20.0.0/24"}, 409, "vlan"),
        ({"name": "red", "vlan": 7, "subnet": "10.10.0.128/25"}, 409, "subnet"),
        ({"name": "red", "vlan": 7, "subnet": "10.0.0.0/8"}, 409, "subnet"),
    ],
)
async def test_bad_networks_get_a_clear_error_and_change_nothing(
    api: Api, store: MemoryStore, body: dict[str, object], status: int, field: str
) -> None:
    client, auth = api
    await _net(api)
    before = await dump_store(store)
    r = await client.post("/v1/networks", json=body, headers=auth)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    assert await dump_store(store) == before


async def test_an_unknown_network_is_404_and_a_vm_on_one_is_refused(
    api: Api, store: MemoryStore
) -> None:
    client, auth = api
    assert (await client.get("/v1/networks/nope", headers=auth)).status_code == 404
    assert (await client.delete("/v1/networks/nope", headers=auth)).status_code == 404
    before = await dump_store(store)
    body = {"name": "vm1", "image": "tiny", "networks": ["nope"]}
    r = await client.post("/v1/vms", json=body, headers=auth)
    assert r.status_code == 422 and r.json()["field"] == "networks", r.text
    assert "nope" in r.json()["message"]
    assert await dump_store(store) == before


async def test_vms_get_the_lowest_free_addresses_and_show_them(api: Api) -> None:
    client, auth = api
    await _net(api)
    await _net(api, "green", 200, "10.30.0.0/29")
    for vm, nets in (("vm1", ["blue"]), ("vm2", ["blue", "green", "blue"])):
        body = {"name": vm, "image": "tiny", "networks": nets, "start": False}
        assert (await client.post("/v1/vms", json=body, headers=auth)).status_code == 202
    vm2 = (await client.get("/v1/vms/vm2", headers=auth)).json()
    assert [(n["network"], n["ip"]) for n in vm2["nics"]] == [
        ("blue", "10.10.0.3"),
        ("green", "10.30.0.2"),
        ("blue", "10.10.0.4"),
    ]
    assert vm2["nics"][0]["mac"] == nic_mac(vm2["uuid"], 0)
    assert len({n["mac"] for n in vm2["nics"]}) == 3
    shown = (await client.get("/v1/networks/blue", headers=auth)).json()["addresses"]
    assert [(a["ip"], a["vm"], a["nic"]) for a in shown] == [
        ("10.10.0.2", "vm1", 0),
        ("10.10.0.3", "vm2", 0),
        ("10.10.0.4", "vm2", 2),
    ]
    vm0 = (await client.get("/v1/vms/vm1", headers=auth)).json()
    assert vm0["nics"][0]["ip"] == "10.10.0.2"


async def test_a_network_in_use_is_not_deleted_and_names_its_vms(
    api: Api, store: MemoryStore
) -> None:
    client, auth = api
    await _net(api)
    body = {"name": "vm1", "image": "tiny", "networks": ["blue"], "start": False}
    assert (await client.post("/v1/vms", json=body, headers=auth)).status_code == 202
    before = await dump_store(store)
    r = await client.delete("/v1/networks/blue", headers=auth)
    assert r.status_code == 409 and r.json()["vms"] == ["vm1"], r.text
    assert "vm1" in r.json()["message"]
    assert await dump_store(store) == before
    r = await client.delete("/v1/vms/vm1", headers=auth)  # never placed: deleted at once
    assert r.status_code == 202
    assert await store.list(keys.network_ips("blue")) == []  # its address given back
    assert (await client.delete("/v1/networks/blue", headers=auth)).status_code == 204
    assert await store.list(keys.NETWORKS) == []


async def test_a_full_network_refuses_the_vm_and_changes_nothing(
    api: Api, store: MemoryStore
) -> None:
    client, auth = api
    await _net(api, "tiny-net", 300, "10.40.0.0/29")  # hosts .1-.6, .1 the gateway
    svc = NetworkService(store)
    for node in ("n1", "n2"):
        assert await svc.node_address("tiny-net", node) in ("10.40.0.6", "10.40.0.5")
    for i in range(3):
        body = {"name": f"vm{i}", "image": "tiny", "networks": ["tiny-net"], "start": False}
        assert (await client.post("/v1/vms", json=body, headers=auth)).status_code == 202
    before = await dump_store(store)
    body = {"name": "vm9", "image": "tiny", "networks": ["tiny-net"], "start": False}
    r = await client.post("/v1/vms", json=body, headers=auth)
    assert r.status_code == 409 and r.json()["field"] == "networks", r.text
    assert await dump_store(store) == before


async def test_vms_created_at_once_never_share_an_address(
    store: MemoryStore, images_dir: Path
) -> None:
    await add_node(store, "n1")
    svc = VMService(store, images_dir)
    await NetworkService(store).create(NetworkCreate(name="blue", vlan=5, subnet="10.5.0.0/24"))
    reqs = [VMCreate(name=f"vm{i}", networks=["blue"], start=False, image="tiny") for i in range(6)]
    made = await asyncio.gather(*(svc.create_vm(r) for r in reqs))
    ips = sorted(spec.nics[0].ip for spec, _ in made)
    assert ips == [f"10.5.0.{i}" for i in range(2, 8)]


async def test_node_addresses_come_from_the_top_and_stay(store: MemoryStore) -> None:
    svc = NetworkService(store)
    await svc.create(NetworkCreate(name="blue", vlan=5, subnet="10.5.0.0/24"))
    assert await svc.node_address("blue", "n1") == "10.5.0.254"
    assert await svc.node_address("blue", "n2") == "10.5.0.253"
    assert await svc.node_address("blue", "n1") == "10.5.0.254"
    assert await svc.node_address("gone", "n1") is None


async def test_the_sweep_gives_back_addresses_of_vms_that_are_gone(
    store: MemoryStore, images_dir: Path
) -> None:
    await add_node(store, "n1")
    vms = VMService(store, images_dir)
    nets = NetworkService(store)
    await nets.create(NetworkCreate(name="blue", vlan=5, subnet="10.5.0.0/24"))
    spec, _ = await vms.create_vm(VMCreate(name="vm1", networks=["blue"], image="tiny"))
    await nets.node_address("blue", "n1")
    assert await nets.sweep() == []
    await store.delete(keys.vm_spec("vm1"))  # deleted by code that did not release
    assert await nets.sweep() == ["blue/10.5.0.2"]
    held = [AddressHolder.load(kv.value).kind for kv in await store.list(keys.NETWORK_IPS)]
    assert held == ["node"]
    assert release(spec) == [Delete(keys.network_ip("blue", "10.5.0.2"))]


def _spec(nets: list[str]) -> VMSpec:
    spec = VMSpec.from_create(VMCreate(name="vm1", networks=nets), "op", 0.0, {"blue": 7})
    return spec.model_copy(update={"uuid": "0123abcd-0000-4000-8000-000000000000"})


def test_a_vm_without_networks_keeps_its_user_mode_nic() -> None:
    (nic,) = nics_for(_spec([]), "n1", "127.0.0.9", 4000)
    assert nic.tap == ""
    assert [(f.host_address, f.host_port, f.guest_port) for f in nic.forwards] == [
        ("127.0.0.9", 4000, 80)
    ]


def test_a_vm_on_networks_gets_one_tap_per_nic_with_short_stable_names() -> None:
    spec = _spec(["blue", "blue"])
    nics = nics_for(spec, "n1", "127.0.0.9", 4000)
    taps = [n.tap for n in nics]
    assert [t[:9] for t in taps] == ["vt0123abc"] * 2 and [t[-2:] for t in taps] == ["n0", "n1"]
    assert all(len(t) <= 15 for t in taps)
    assert nics_for(spec, "n2", "127.0.0.9", 4000)[0].tap != taps[0]  # a migration has both
    assert [n.mac for n in nics] == [n.mac for n in spec.nics]
    assert all(n.forwards == () for n in nics)
    assert tap_name(spec.uuid, 7, "n1") == taps[0][:-1] + "7"
    assert len(bridge_name(4094, "a-very-long-node-name-indeed")) <= 15
    assert bridge_name(7, "n1") != bridge_name(7, "n2")


def test_the_dhcp_hosts_file_lists_vm_nics_by_address_and_not_nodes() -> None:
    held = [
        ("10.5.0.10", AddressHolder(kind="vm", vm="b", mac="52:54:00:00:00:0b")),
        ("10.5.0.9", AddressHolder(kind="vm", vm="a", mac="52:54:00:00:00:0a")),
        ("10.5.0.254", AddressHolder(kind="node", node="n1")),
    ]
    assert hosts_text(held) == "52:54:00:00:00:0a,10.5.0.9\n52:54:00:00:00:0b,10.5.0.10\n"


def test_dnsmasq_serves_only_static_leases_on_the_bridge_without_dns(tmp_path: Path) -> None:
    rec = NetworkRecord(name="blue", vlan=5, subnet="10.5.0.0/24", gateway="10.5.0.1")
    argv = dnsmasq_argv(rec, "vb5-abcdef", tmp_path)
    assert {
        "--interface=vb5-abcdef",
        "--bind-interfaces",
        "--except-interface=lo",
        "--port=0",
        "--leasefile-ro",
        "--dhcp-range=10.5.0.0,static,255.255.255.0,1h",
        f"--dhcp-hostsfile={tmp_path / 'hosts'}",
        "--dhcp-option=option:router,10.5.0.1",
    } <= set(argv)
