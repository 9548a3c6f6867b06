"""ABS space on a 3-node lab (real etcd, storage servers and NBD clients, on 127.0.81): a 1 TiB
thin volume is accepted; the extents only a snapshot names are re-replicated after their
storage server is lost; space comes back when a snapshot of overwritten data is deleted; a
volume deleted as its last client leaves is deleted, not refused; and with small capacities,
writes that run the servers out of space fail with ENOSPC while every acknowledged write stays
readable and no replica is dropped."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from aecp.cluster.volumeowners import ClusterOwners
from aecp.storage.meta.model import SnapshotRecord
from aecp.storage.meta.service import MetaService
from aecp.store import keys
from aecp.store.typed import read
from tests.integration.test_abs_lab import create_volume, tool, uri
from tests.labkit import LabKit, running_lab, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
MIB = 1 << 20
GIB = 1 << 30
CAPACITY_MIB = 48
#: what each storage server offers: the lab's servers share one disk, whose size would
#: otherwise decide whether a 1 TiB volume fits (3 x 400 GiB raw, 3.6 TiB provisionable)
CAPACITY_GIB = 400


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    root: Path = tmp_path_factory.mktemp("abs-space") / "lab"
    async with running_lab(root, subnet="127.0.81", extent_mib=4, capacity_gib=CAPACITY_GIB) as k:
        yield k


async def storage(kit: LabKit) -> dict[str, Any]:
    r = await kit.call("GET", "/v1/storage")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def delete(kit: LabKit, path: str) -> None:
    r = await kit.call("DELETE", path)
    assert r.status_code == 204, r.text


async def test_a_1_tib_thin_volume_is_accepted_and_a_refusal_names_the_limit(kit: LabKit) -> None:
    vol = await create_volume(kit, "huge", "1T")
    assert vol["size"] == 1 << 40 and vol["replicas"] == 2
    st = await storage(kit)
    assert st["raw_bytes"] == 3 * CAPACITY_GIB * GIB and st["overcommit_ratio"] == 3.0
    assert st["provisioned_bytes"] >= 2 << 40 > st["raw_bytes"]  # thin: more than raw
    r = await kit.call("POST", "/v1/volumes", json={"name": "huger", "size": "64T"})
    assert r.status_code == 422 and r.json()["field"] == "size", r.text
    assert "the limit is" in r.json()["message"] and "provisioned already" in r.json()["message"]
    await delete(kit, "/v1/volumes/huge")


async def snapshot_extents(kit: LabKit, volume: str, snap: str) -> list[str]:
    """The extents a snapshot's table names (ABS's own record: the API does not show it)."""
    store = kit.etcd()
    try:
        got = await read(store, keys.abs_snapshot(volume, snap), SnapshotRecord)
    finally:
        await store.close()
    assert got is not None
    return [x for x in got[0].extents if x]


async def test_extents_only_a_snapshot_names_are_re_replicated_after_a_node_loss(
    kit: LabKit,
) -> None:
    await create_volume(kit, "frz", "8M")
    u = await uri(kit, "frz", "node1")
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x51 0 8M", u)
    r = await kit.call("POST", "/v1/volumes/frz/snapshots", json={"name": "s1"})
    assert r.status_code == 201, r.text
    frozen = await snapshot_extents(kit, "frz", "s1")
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x52 0 8M", u)  # all copied on write
    store = kit.etcd()
    meta = MetaService(store, owners=ClusterOwners(store))
    try:
        exts = await meta.extents()
        victim = next(n for x in frozen for n in exts[x].replicas if n != "node1")
        kit.lab.kill_storage(victim)

        async def restored() -> bool:
            now = await meta.extents()
            return all(len(now[x].replicas) == 2 and victim not in now[x].replicas for x in frozen)

        await wait_for(restored, "the snapshot's extents back to two replicas", timeout=120)
    finally:
        await store.close()
    kit.lab.start_storage(victim)
    await kit.lab.wait_ready()
    r = await kit.call("POST", "/v1/volumes/frz/snapshots/s1/clone", json={"name": "frzc"})
    assert r.status_code == 201, r.text
    reader = next(n for n in ("node2", "node3") if n != victim)
    _, text = await tool(
        "qemu-io", "-f", "raw", "-c", "read -P 0x51 0 8M", await uri(kit, "frzc", reader)
    )
    assert "Pattern verification failed" not in text
    await delete(kit, "/v1/volumes/frzc")
    await delete(kit, "/v1/volumes/frz/snapshots/s1")
    await delete(kit, "/v1/volumes/frz")


def chunk_bytes(kit: LabKit) -> int:
    """Bytes the storage servers' replica files hold on disk."""
    total = 0
    for node in kit.lab.node_names:
        for f in (kit.lab.node_dir(node) / "data" / "chunks").rglob("*"):
            if f.is_file():
                total += os.stat(f).st_blocks * 512
    return total


async def test_space_returns_when_a_snapshot_of_overwritten_data_is_deleted(kit: LabKit) -> None:
    await create_volume(kit, "gc", "16M")
    u = await uri(kit, "gc", "node1")
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 16M", u)
    r = await kit.call("POST", "/v1/volumes/gc/snapshots", json={"name": "s1"})
    assert r.status_code == 201, r.text
    old = await snapshot_extents(kit, "gc", "s1")
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x62 0 16M", u)  # copies on write
    before = chunk_bytes(kit)
    await delete(kit, "/v1/volumes/gc/snapshots/s1")
    assert chunk_bytes(kit) <= before - 2 * 16 * MIB  # both replicas of the old 16 MiB
    for node in kit.lab.node_names:
        held = {f.stem for f in (kit.lab.node_dir(node) / "data" / "chunks").rglob("*.data")}
        assert not held & set(old)
    # the client has just left: its export is still flushing when the delete comes
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x63 0 1M", u)
    await delete(kit, "/v1/volumes/gc")


async def restart_storage_with(kit: LabKit, **storage_settings: Any) -> None:
    for node in kit.lab.node_names:
        cfg = kit.lab.node_dir(node) / "node.json"
        settings = json.loads(cfg.read_text())
        for capacity in ("capacity_gib", "capacity_mib"):  # one of them at most
            settings["storage"].pop(capacity, None)
        settings["storage"].update(storage_settings)
        cfg.write_text(json.dumps(settings, indent=2))
        kit.lab.storage(node).stop()
        kit.lab.start_storage(node)
    await kit.lab.wait_ready()


async def test_writes_past_the_servers_capacity_fail_with_enospc_and_lose_nothing(
    kit: LabKit,
) -> None:
    await restart_storage_with(kit, capacity_mib=CAPACITY_MIB)

    async def small() -> bool:
        return all(
            s["capacity_bytes"] == CAPACITY_MIB * MIB for s in (await storage(kit))["servers"]
        )

    await wait_for(small, "the servers to publish their small capacity")
    await create_volume(kit, "cap", "160M")  # 320 MiB provisioned on 144 MiB raw
    u = await uri(kit, "cap", "node1")
    args = [a for i in range(160) for a in ("-c", f"write -P {i % 250 + 1} {i}M 1M")]
    _, out = await tool("qemu-io", "-f", "raw", *args, u, check=False)
    results = [ln for ln in out.splitlines() if ln.startswith(("wrote", "write failed"))]
    assert len(results) == 160, out[-2000:]
    failed = [i for i, ln in enumerate(results) if ln.startswith("write failed")]
    assert failed, "the servers never ran out of space"
    assert all("No space left on device" in results[i] for i in failed), out[-2000:]
    acked = [i for i in range(160) if i not in failed]
    checks = [a for i in acked for a in ("-c", f"read -P {i % 250 + 1} {i}M 1M")]
    _, text = await tool("qemu-io", "-f", "raw", *checks, await uri(kit, "cap", "node2"))
    assert "Pattern verification failed" not in text and "read failed" not in text
    vol = (await kit.call("GET", "/v1/volumes/cap")).json()
    assert vol["health"] == "healthy"
    assert all(e["stale"] == [] and len(e["replicas"]) == 2 for e in vol["extents"])

    async def full() -> dict[str, Any] | None:
        st = await storage(kit)
        return st if st["level"] == "critical" else None

    st = await wait_for(full, "storage status to show the servers critical")
    assert any(s["level"] == "critical" for s in st["servers"]) and st["warnings"]
    await delete(kit, "/v1/volumes/cap")
