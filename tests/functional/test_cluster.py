"""Whole-cluster behaviour in one event loop (``harness``): create → placed → running; an
agent restart re-adopting its VMs; a VM snapshot whose agent dies half-way; two controllers
racing for one role; placement moved by compare-and-swap while a start is in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aecp.cluster.placement import move
from aecp.common.clock import FakeClock
from aecp.compute.fake import FakeHypervisor, GatedStartHypervisor
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.memory import MemoryStore
from aecp.store.view import read_cluster
from tests.functional.harness import FunctionalCluster, FunctionalNode
from tests.unit.abskit import Cluster


@pytest.fixture
async def fc(
    store: MemoryStore, clock: FakeClock, cluster: Cluster, images_dir: Path
) -> AsyncIterator[FunctionalCluster]:
    up = await FunctionalCluster(store, clock, cluster, images_dir).up("n1", "n2")
    yield up
    await up.close()


async def create(fc: FunctionalCluster, name: str, **fields: Any) -> str:
    r = await fc.call("POST", "/v1/vms", json={"name": name, "image": "tiny", **fields})
    assert r.status_code == 202, r.text
    op_id: str = r.json()["operation"]["id"]
    return op_id


async def test_a_vm_created_through_the_api_is_placed_started_and_its_operation_ends(
    fc: FunctionalCluster,
) -> None:
    op_id = await create(fc, "web", data_disks_mib=[1])

    await fc.converge()

    vm = await fc.vm("web")
    assert vm["state"] == "running" and vm["node"] in ("n1", "n2")
    assert fc.running_on("web") == [vm["node"]]
    op = await fc.op(op_id)
    assert op["state"] == "succeeded" and op["requested_by"] == "admin"
    events = (await fc.call("GET", "/v1/vms/web/events")).json()
    assert any(e["sentence"].startswith(f"placed on {vm['node']}") for e in events)


async def test_a_restarted_agent_adopts_its_running_vms_without_starting_them_again(
    fc: FunctionalCluster,
) -> None:
    await create(fc, "web", node="n1")
    await fc.converge()
    pid = fc.nodes["n1"].world["web"].pid
    await fc.nodes["n1"].kill()

    new = await fc.add(FunctionalNode("n1", fc, world=fc.nodes["n1"].world))
    await fc.converge()

    assert ("start", "web") not in new.hv.calls
    assert fc.nodes["n1"].world["web"].pid == pid
    assert (await fc.vm("web"))["state"] == "running"


class HangsOnSecondSnapshot(SnapshotService):
    """Takes one snapshot, then hangs in the next (the agent is killed there)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.took_one = asyncio.Event()

    async def snapshot(self, volume: str, name: str, *args: Any, **kw: Any) -> Any:
        if self.took_one.is_set():
            await asyncio.Event().wait()
        rec = await super().snapshot(volume, name, *args, **kw)
        self.took_one.set()
        return rec


async def test_a_vm_snapshot_whose_agent_dies_half_way_is_whole_after_the_next_agent(
    fc: FunctionalCluster,
) -> None:
    await create(fc, "web", node="n1", data_disks_mib=[1])
    await fc.converge()
    n1 = fc.nodes["n1"]
    hangs = HangsOnSecondSnapshot(fc.abs.meta, fc.abs.pool)
    dying = await fc.add(FunctionalNode("n1", fc, world=n1.world, hv=n1.hv, snaps=hangs))
    r = await fc.call("POST", "/v1/vms/web/snapshots", json={"name": "s1"})
    assert r.status_code == 202, r.text
    op_id = r.json()["operation"]["id"]

    await dying.run_pass()
    await hangs.took_one.wait()
    await dying.kill()  # between the two disks
    assert await fc.store.get(keys.abs_snapshot("web-boot", "s1")) is not None
    assert await fc.store.get(keys.abs_snapshot("web-data1", "s1")) is None
    await fc.add(FunctionalNode("n1", fc, world=n1.world))
    await fc.converge()

    snaps = {}
    for vol in ("web-boot", "web-data1"):
        names = [kv.key.rsplit("/", 1)[1] for kv in await fc.store.list(keys.abs_snapshots(vol))]
        snaps[vol] = names
    assert snaps == {"web-boot": ["s1"], "web-data1": ["s1"]}
    assert (await fc.op(op_id))["state"] == "succeeded"
    assert (await fc.vm("web"))["state"] == "running"
    assert fc.running_on("web") == ["n1"]


async def test_two_nodes_racing_for_the_scheduler_role_place_each_vm_once(
    fc: FunctionalCluster,
) -> None:
    for name in ("a", "b", "c"):
        await create(fc, name, start=False)
    n1, n2 = fc.nodes["n1"], fc.nodes["n2"]

    await asyncio.gather(n1.run_pass(), n2.run_pass())

    leaders = [n for n in (n1, n2) if n.controllers.leads("scheduler")]
    assert len(leaders) == 1
    view = await read_cluster(fc.store)
    assert all(view.vms[n].placement is not None for n in ("a", "b", "c"))
    placed_events = 0
    for name in ("a", "b", "c"):
        events = (await fc.call("GET", f"/v1/vms/{name}/events")).json()
        placed = [e for e in events if e["sentence"].startswith("placed on")]
        assert len(placed) == 1 and placed[0]["node"] == leaders[0].name
        placed_events += 1
    assert placed_events == 3


async def test_placement_moved_by_cas_while_a_start_is_in_flight_ends_with_one_instance(
    fc: FunctionalCluster,
) -> None:
    n1 = fc.nodes["n1"]
    gated = GatedStartHypervisor(persistent=n1.world)
    slow = await fc.add(FunctionalNode("n1", fc, world=n1.world, hv=gated))
    await create(fc, "web", node="n1")
    await slow.run_pass()  # the scheduler places it on n1
    await slow.run_pass()  # n1 starts it: QEMU launching
    await gated.entered.wait()
    entry = (await read_cluster(fc.store)).vms["web"]

    assert await move(fc.store, entry, "n2", fc.clock)  # HA or migration moves it
    assert not await move(fc.store, entry, "n1", fc.clock)  # a second mover read the same
    gated.gate.set()
    await fc.converge()

    assert fc.running_on("web") == ["n2"]
    vm = await fc.vm("web")
    assert vm["node"] == "n2" and vm["state"] == "running"
    assert isinstance(fc.nodes["n2"].hv, FakeHypervisor)
