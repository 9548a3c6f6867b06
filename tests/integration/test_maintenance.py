"""Maintenance mode on a four-node lab (real etcd, QEMU, ABS; ``docs/design/maintenance.md``):
three running VMs on one node; failing pre-checks are each listed with their reason and change
nothing; entering moves every VM off, running, its memory and disk intact, and no new VM goes
to the node; the node's storage server stopped while in maintenance: its replicas wait for the
maintenance grace (no re-replication, though the ordinary grace passes), and when it is back
they catch up with only what changed; exiting with ``restore_vms`` brings the VMs back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from aecp.cluster.volumeowners import ClusterOwners
from aecp.common.proc import pid_alive
from aecp.compute.images.tiny import BOOT_MARKER
from aecp.conf import settings
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool
from aecp.store import keys
from tests.labkit import LabKit, console_command, running_lab, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
PROMPT = "aecp:/# "
NODE = "node4"  # the node that goes into maintenance
VMS = ("ev1", "ev2", "ev3")
GRACE = 4.0  # the lab's storage.recovery_grace_s (the maintenance grace stays 3600 s)
MIB = 1 << 20
SEEDS = {vm: f"{vm}a" for vm in VMS}  # the pattern on each VM's /dev/vdb (8 MiB)
CHANGED_MIB = 2  # what is rewritten on ev1's disk while NODE's storage server is down


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    """The lab with ev1-3 running on NODE (the other nodes cordoned while they are created),
    each with a pattern on its data disk and a marker in its memory (its tmpfs)."""
    root: Path = tmp_path_factory.mktemp("maintenance") / "lab"
    # the lab's own lease TTL (5 s), not labkit's 3 s: four nodes and three TCG guests load a
    # small machine enough that etcd stalls for 2 s at times, and a node that cannot renew
    # its lease fences (powers its VMs off), which is not what this test is about
    spec = {"nodes": 4, "lease_ttl": 5, "recovery_grace_s": GRACE}
    async with running_lab(root, subnet="127.0.68", **spec) as k:
        others = [n for n in k.lab.node_names if n != NODE]
        for n in others:
            r = await k.call("POST", f"/v1/nodes/{n}/cordon", json={"reason": "test set-up"})
            assert r.status_code == 200, r.text
        ops = await asyncio.gather(
            *(k.create_vm(vm, data_disks_mib=[16], memory_mib=128) for vm in VMS)
        )
        assert all(op["state"] == "succeeded" for op in ops), ops
        for n in others:
            assert (await k.call("POST", f"/v1/nodes/{n}/uncordon")).status_code == 200
        assert {(await k.vm(vm))["node"] for vm in VMS} == {NODE}
        await asyncio.gather(*(_prepare(k, vm) for vm in VMS))
        yield k


async def _prepare(kit: LabKit, vm: str) -> None:
    marker = f"{BOOT_MARKER} name={vm}"

    async def ready() -> bool:
        log = await kit.console(vm)
        return marker in log and PROMPT in log.rsplit(marker, 1)[1]

    await wait_for(ready, f"{vm} at its prompt", timeout=150)
    await console_command(
        kit, vm, f"aecp-pattern write /dev/vdb {SEEDS[vm]} 8", "AECP-PATTERN-WRITTEN dev=/dev/vdb"
    )
    await console_command(kit, vm, f"echo {vm}-kept-$((6*7)) > /tmp/m", PROMPT)


async def check_guest(kit: LabKit, vm: str, seed: str, mib: int = 8) -> None:
    """The same guest (the marker in its memory) with its disk's pattern intact."""
    await console_command(kit, vm, "cat /tmp/m", f"{vm}-kept-42")
    await console_command(
        kit,
        vm,
        f"aecp-pattern verify /dev/vdb {seed} {mib}",
        f"AECP-PATTERN-OK dev=/dev/vdb seed={seed}",
    )


async def enter(kit: LabKit, node: str) -> httpx.Response:
    return await kit.call("POST", f"/v1/nodes/{node}/maintenance/enter", json={})


async def nodes(kit: LabKit) -> dict[str, dict[str, Any]]:
    r = await kit.call("GET", "/v1/nodes")
    r.raise_for_status()
    return {n["name"]: n for n in r.json()}


async def admin_state(kit: LabKit) -> tuple[list[tuple[Any, ...]], dict[str, bytes]]:
    """What a maintenance request could change: each node's maintenance and cordon fields as
    listed, and the nodes' admin keys, operations and migrations as stored."""
    listed = [
        (
            n["name"],
            n["maintenance"],
            n["maintenance_since"],
            n["maintenance_op"],
            n["maintenance_error"],
            n["cordoned"],
        )
        for n in (await nodes(kit)).values()
    ]
    prefixes = (keys.NODE_ADMIN, keys.OPS, keys.VM_MIGRATIONS)
    stored = {k: v for k, v in (await kit.store_dump()).items() if k.startswith(prefixes)}
    return listed, stored


def checks(body: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((c["check"], c["reason"]) for c in body["checks"])


def instances(kit: LabKit, node: str) -> set[str]:
    """The VMs whose QEMU runs on ``node`` (by its pidfiles)."""
    run_dir = settings.load(kit.lab.node_dir(node) / "node.json").run_dir
    out = set()
    for pidfile in run_dir.glob("*/qemu.pid"):
        try:
            alive = pid_alive(int(pidfile.read_text()))
        except (OSError, ValueError):
            continue
        if alive:
            out.add(pidfile.parent.name)
    return out


async def test_failing_prechecks_are_each_listed_with_their_reason_and_change_nothing(
    kit: LabKit,
) -> None:
    r = await kit.call("POST", f"/v1/nodes/{NODE}/maintenance/exit", json={"restore_vms": True})
    assert r.status_code == 409, r.text
    assert f"node {NODE} is not in maintenance (it is in_use)" in r.json()["message"]

    # a suspended VM there, and no other node may take the running ones (all cordoned)
    assert (await kit.action("ev2", "suspend"))["state"] == "succeeded"
    others = [n for n in kit.lab.node_names if n != NODE]
    for n in others:
        r = await kit.call("POST", f"/v1/nodes/{n}/cordon", json={"reason": "racked out"})
        assert r.status_code == 200, r.text
    before = await admin_state(kit)
    r = await enter(kit, NODE)
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"] == "invalid_state" and "3 pre-checks failed" in body["message"], body
    found = checks(body)
    assert [c for c, _ in found] == ["capacity", "capacity", "vm-state"], found
    assert found[2][1] == "VM ev2 is suspended: resume it or power it off first"
    for vm, (_, reason) in zip(("ev1", "ev3"), found[:2], strict=True):
        assert reason.startswith(f"no other node has room for VM {vm} (1 vCPUs, 128 MiB)")
        assert all(f"{n}: cordoned (racked out)" in reason for n in others), reason
    assert await admin_state(kit) == before

    for n in others:
        assert (await kit.call("POST", f"/v1/nodes/{n}/uncordon")).status_code == 200
    before = await admin_state(kit)
    r = await enter(kit, NODE)
    assert r.status_code == 409, r.text
    assert checks(r.json()) == [
        ("vm-state", "VM ev2 is suspended: resume it or power it off first")
    ]
    assert await admin_state(kit) == before
    assert (await kit.action("ev2", "resume"))["state"] == "succeeded"
    await kit.wait_vm("ev2", "running")


async def test_entering_moves_every_vm_off_running_with_its_memory_and_disk(
    kit: LabKit,
) -> None:
    r = await enter(kit, NODE)
    assert r.status_code == 202, r.text
    op_id = r.json()["operation"]["id"]
    entering = (await nodes(kit))[NODE]  # three live migrations to go: not done yet
    assert entering["maintenance"] == "entering_maintenance", entering
    assert entering["maintenance_op"] == op_id, entering
    op = await kit.wait_op(op_id, timeout=150)
    assert op["state"] == "succeeded" and op["kind"] == "node.maintenance", op
    assert op["message"].startswith(f"{NODE} is in maintenance (moved live: "), op
    moved = op["message"].split("moved live: ")[1].rstrip(")").split(", ")
    assert sorted(moved) == list(VMS), op

    listed = (await nodes(kit))[NODE]
    assert listed["maintenance"] == "maintenance" and listed["maintenance_op"] == op_id, listed
    assert listed["vms"] == 0 and listed["maintenance_error"] == "", listed
    placed = {vm: (await kit.wait_vm(vm, "running"))["node"] for vm in VMS}
    assert NODE not in placed.values(), placed
    assert len(set(placed.values())) == 3, placed  # each to the node with the most room left
    assert instances(kit, NODE) == set()
    for vm, node in placed.items():
        assert vm in instances(kit, node)
    await asyncio.gather(*(check_guest(kit, vm, SEEDS[vm]) for vm in VMS))


async def test_no_new_vm_goes_to_a_node_in_maintenance(kit: LabKit) -> None:
    r = await kit.call(
        "POST",
        "/v1/vms",
        json={"name": "pinned", "image": "tiny", "node": NODE, "memory_mib": 128, "start": False},
    )
    assert r.status_code == 409, r.text
    assert f"{NODE}: in maintenance mode (maintenance)" in r.json()["message"]
    assert (await kit.call("GET", "/v1/vms/pinned")).status_code == 404
    # NODE has the most free memory of all: only maintenance keeps the scheduler off it
    free = {
        n: v["capacity"]["memory_mib"] - v["reserved_memory_mib"]
        for n, v in (await nodes(kit)).items()
    }
    assert max(free, key=lambda n: free[n]) == NODE, free
    op = await kit.create_vm("probe", memory_mib=128, start=False)
    assert op["state"] == "succeeded", op
    assert (await kit.vm("probe"))["node"] not in (NODE, None)
    r = await kit.call("DELETE", "/v1/vms/probe")
    assert r.status_code == 202, r.text
    assert (await kit.wait_op(r.json()["operation"]["id"]))["state"] == "succeeded"


async def test_a_second_node_and_the_same_node_again_are_refused_and_change_nothing(
    kit: LabKit,
) -> None:
    before = await admin_state(kit)
    r = await enter(kit, "node1")
    assert r.status_code == 409, r.text
    assert checks(r.json()) == [
        ("one-at-a-time", f"node {NODE} is maintenance: one node of a cluster at a time")
    ]
    r = await enter(kit, NODE)
    assert r.status_code == 409, r.text
    assert checks(r.json()) == [("state", f"node {NODE} is already maintenance")]
    assert await admin_state(kit) == before


# ---- storage while in maintenance ----------------------------------------------------------
def storage_log(kit: LabKit) -> list[tuple[float, str]]:
    """Every storage server's log lines with their time (lines without one left out)."""
    out = []
    for n in kit.lab.node_names:
        for line in kit.lab.storage(n).log_file.read_text(errors="replace").splitlines():
            try:
                at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            out.append((at, line))
    return out


async def volume(kit: LabKit, name: str) -> dict[str, Any]:
    r = await kit.call("GET", f"/v1/volumes/{name}")
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


async def extents(kit: LabKit) -> dict[str, dict[str, Any]]:
    """Every extent of the VMs' disks, by id."""
    out = {}
    for vm in VMS:
        for disk in ("boot", "data1"):
            out |= {e["id"]: e for e in (await volume(kit, f"{vm}-{disk}"))["extents"]}
    return out


async def replica_sets(kit: LabKit) -> dict[str, set[str]]:
    return {x: set(e["replicas"]) for x, e in (await extents(kit)).items()}


async def replica_data(kit: LabKit, node: str, extent: str, length: int) -> bytes:
    """The first ``length`` bytes of ``extent``'s replica on ``node``, read from it alone."""
    store = kit.etcd()
    pool = ReplicaPool(MetaService(store, owners=ClusterOwners(store)), auth=kit.replica_auth())
    try:
        return await (await pool.client(node)).read(extent, 0, length)
    finally:
        await pool.close()
        await store.close()


async def test_a_storage_server_stopped_in_maintenance_waits_and_catches_up_what_changed(
    kit: LabKit,
) -> None:
    vol = "ev1-data1"
    [ext] = (await volume(kit, vol))["extents"]  # 16 MiB: one extent
    assert NODE in ext["replicas"], ext  # first written on NODE: a replica there
    [partner] = [n for n in ext["replicas"] if n != NODE]
    placed = await replica_sets(kit)
    kit.lab.kill_storage(NODE)
    try:
        await _stale_and_waited_for(kit, vol, ext["id"], partner, placed)
        started = max(t for t, _ in storage_log(kit))
    finally:
        kit.lab.start_storage(NODE)
    await kit.lab.wait_ready()
    caught = f"extent {ext['id']}: {NODE} caught up from {partner}: copied "

    async def caught_up() -> list[int] | None:
        lines = [line for t, line in storage_log(kit) if t >= started and caught in line]
        return [int(line.split(caught)[1].split(" bytes")[0]) for line in lines] or None

    copied = await wait_for(caught_up, f"{NODE} to catch {vol} up", timeout=60)
    assert 0 < max(copied) <= CHANGED_MIB * MIB, copied  # only what changed meanwhile

    async def caught_up_all() -> bool:
        return await replica_sets(kit) == placed and not any(
            e["stale"] for e in (await extents(kit)).values()
        )

    await wait_for(caught_up_all, "every replica of the VMs' disks valid again", timeout=60)
    assert await replica_data(kit, NODE, ext["id"], 8 * MIB) == await replica_data(
        kit, partner, ext["id"], 8 * MIB
    )
    assert not [line for _, line in storage_log(kit) if "re-replicat" in line]
    await check_guest(kit, "ev1", "ev1b", CHANGED_MIB)
    assert (await nodes(kit))[NODE]["maintenance"] == "maintenance"


async def _stale_and_waited_for(
    kit: LabKit, vol: str, ext_id: str, partner: str, placed: dict[str, set[str]]
) -> None:
    """With NODE's storage server down: a write drops its replica of ``vol`` to stale, and
    the repair passes wait for it past the ordinary grace, re-replicating nothing."""
    await console_command(
        kit,
        "ev1",
        f"aecp-pattern write /dev/vdb ev1b {CHANGED_MIB}",
        "AECP-PATTERN-WRITTEN dev=/dev/vdb seed=ev1b",
    )

    async def dropped() -> dict[str, Any] | None:
        [e] = (await volume(kit, vol))["extents"]
        return e if e["stale"] == [NODE] else None

    stale = await wait_for(dropped, f"{NODE}'s replica of {vol} to be stale")
    assert stale["replicas"] == [partner], stale

    # the access point's repair passes say why they wait; one decided after the ordinary
    # grace had passed (counted from the first such pass, after the replica was dropped)
    waiting = f"extent {ext_id}: waiting for {NODE} to come back (grace 3600s)"

    async def waits_since() -> float | None:
        return min((t for t, line in storage_log(kit) if waiting in line), default=None)

    first = await wait_for(waits_since, f"a repair pass waiting for {NODE}", timeout=30)

    async def still_waits_after_grace() -> bool:
        return any(waiting in line and t > first + GRACE + 1 for t, line in storage_log(kit))

    await wait_for(still_waits_after_grace, "a repair pass after the ordinary grace", GRACE + 30)
    # nothing re-replicated: no copy made or in progress, no new replica placed
    assert not [line for _, line in storage_log(kit) if "re-replicat" in line]
    for x, e in (await extents(kit)).items():
        assert "re-replicate" not in e["recovery"], e
        assert set(e["replicas"]) <= placed[x], e
    [e] = (await volume(kit, vol))["extents"]
    assert e["replicas"] == [partner] and e["stale"] == [NODE], e


async def test_exiting_with_restore_vms_brings_the_vms_back_running_with_their_data(
    kit: LabKit,
) -> None:
    r = await kit.call("POST", f"/v1/nodes/{NODE}/maintenance/exit", json={"restore_vms": True})
    assert r.status_code == 202, r.text
    op = await kit.wait_op(r.json()["operation"]["id"], timeout=150)
    assert op["state"] == "succeeded", op
    assert op["message"] == f"{NODE} is back in use; its VMs moved back", op
    listed = (await nodes(kit))[NODE]
    assert listed["maintenance"] == "in_use" and listed["maintenance_error"] == "", listed
    for vm in VMS:
        assert (await kit.wait_vm(vm, "running"))["node"] == NODE
    assert instances(kit, NODE) == set(VMS)
    seeds = {**SEEDS, "ev1": "ev1b"}
    mibs = {vm: CHANGED_MIB if vm == "ev1" else 8 for vm in VMS}
    await asyncio.gather(*(check_guest(kit, vm, seeds[vm], mibs[vm]) for vm in VMS))
