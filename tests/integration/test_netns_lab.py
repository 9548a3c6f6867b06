"""The netns lab (root): three nodes in network namespaces of their own, the API on the
management network, etcd and replica traffic on the storage network, one network cut without
the other, and nothing of the lab's left behind by ``down``."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from aecp.lab import netns
from aecp.network import rootops
from aecp.store import keys
from tests.labkit import LabKit, running_lab, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

MGMT = "10.231.64.0/24"
STORAGE = "10.231.65.0/24"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    assert os.geteuid() == 0, "the netns lab tests need root (CI runs them as root)"
    root: Path = tmp_path_factory.mktemp("netns") / "lab"
    async with running_lab(
        root, netns=True, mgmt_cidr=MGMT, storage_cidr=STORAGE, accel="tcg"
    ) as k:
        yield k


async def test_the_cluster_api_answers_on_each_nodes_management_address(kit: LabKit) -> None:
    for k, name in enumerate(kit.lab.node_names, start=1):
        assert kit.lab.mgmt_address(name) == f"10.231.64.{k}"
        assert kit.lab.api_url(name) == f"http://10.231.64.{k}:8700"
        r = await kit.call("GET", "/v1/nodes", node=name)
        assert r.status_code == 200
        assert {n["name"]: n["state"] for n in r.json()}[name] == "ready"


async def test_each_node_runs_in_its_own_namespace(kit: LabKit) -> None:
    names = await rootops.netns_list()
    for name in kit.lab.node_names:
        ns = kit.lab.namespace(name)
        assert ns is not None and ns in names
        pid = kit.lab.agent(name).pid()
        assert pid is not None
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino


async def test_etcd_and_the_storage_servers_use_storage_addresses(kit: LabKit) -> None:
    storage = {n: kit.lab.storage_address(n) for n in kit.lab.node_names}
    assert storage == {f"node{k}": f"10.231.65.{k}" for k in (1, 2, 3)}
    assert kit.lab.etcd_cluster().client_endpoints() == [f"{a}:2379" for a in storage.values()]
    store = kit.etcd()
    try:
        kvs = await store.list(keys.ABS_SERVERS)
        servers = {kv.key.rsplit("/", 1)[1]: json.loads(kv.value) for kv in kvs}
    finally:
        await store.close()
    assert {n: s["address"] for n, s in servers.items()} == storage
    settings = kit.lab.node_settings("node1")
    assert settings.address == "10.231.64.1"
    assert settings.storage.address == "10.231.65.1"
    assert settings.compute.migration_address == "10.231.65.1"
    assert settings.network.vm_uplink == netns.NODE_IFACE["vm"]


async def test_cutting_storage_loses_the_storage_lease_while_the_api_stays_reachable(
    kit: LabKit,
) -> None:
    await kit.lab.cut("node3", "storage")
    try:

        async def lease_gone() -> bool:
            store = kit.etcd()
            try:
                return await store.get(keys.ABS_SERVERS + "node3") is None
            finally:
                await store.close()

        await wait_for(lease_gone, "node3's storage server to lose its lease", timeout=30)
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.get(kit.lab.api_url("node3") + "/v1/nodes")
        assert r.status_code in (200, 401, 503), r.text  # an answer, over management
    finally:
        await kit.lab.restore("node3", "storage")
    await kit.lab.wait_ready(timeout=60)


async def test_down_leaves_no_namespace_bridge_or_veth_of_the_lab(kit: LabKit) -> None:
    plan = kit.lab.spec.plan()
    assert len(await netns.leftovers(plan)) == 3 + 3 + 9
    kit.lab.down()
    assert await netns.leftovers(plan) == []
    kit.lab.down()  # again, as after a crash: nothing to do, no error
