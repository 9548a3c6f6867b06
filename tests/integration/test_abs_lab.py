"""ABS on a 3-node lab (real etcd, real storage servers, real NBD peers): volumes written and read
through different nodes' NBD exports, a replica node killed mid-write, single-writer epochs, and
interop with qemu-img, qemu-io, nbdinfo and nbdcopy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from aecp.cluster.volumeowners import ClusterOwners
from aecp.common.errors import InvalidState
from aecp.storage.attach import open_volume
from aecp.storage.blockdev import Fenced
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool
from tests.labkit import LabKit, running_lab, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
MIB = 1 << 20


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    root: Path = tmp_path_factory.mktemp("abs") / "lab"
    async with running_lab(root, subnet="127.0.63", extent_mib=4) as k:
        yield k


async def tool(*argv: str, check: bool = True) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if check:
        assert proc.returncode == 0, f"{argv}: {text}"
    return proc.returncode or 0, text


async def create_volume(kit: LabKit, name: str, size: str, replicas: int = 2) -> dict[str, Any]:
    r = await kit.call(
        "POST", "/v1/volumes", json={"name": name, "size": size, "replicas": replicas}
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def uri(kit: LabKit, name: str, node: str) -> str:
    """The volume through ``node``'s storage server (its local socket: QEMU's path)."""
    return kit.nbd_uri(name, node)


async def test_a_pattern_written_through_one_node_reads_back_through_another(kit: LabKit) -> None:
    await create_volume(kit, "pat", "32M")
    await tool(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 6M",
        "-c",
        "write -P 0xcd 10M 1M",
        await uri(kit, "pat", "node1"),
    )
    _, out = await tool(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "read -P 0xab 0 6M",
        "-c",
        "read -P 0xcd 10M 1M",
        "-c",
        "read -P 0 20M 1M",
        await uri(kit, "pat", "node2"),
    )
    assert "Pattern verification failed" not in out
    vol = (await kit.call("GET", "/v1/volumes/pat")).json()
    assert vol["extents_allocated"] == 3  # 4 MiB extents: slots 0, 1 and 2 were written
    assert vol["health"] == "healthy"
    assert all(len(e["replicas"]) == 2 for e in vol["extents"])


async def test_nbdinfo_maps_written_data_and_holes(kit: LabKit) -> None:
    await create_volume(kit, "map", "16M")
    u = await uri(kit, "map", "node1")
    await tool("qemu-io", "-f", "raw", "-c", "write -P 1 4M 1M", u)
    _, out = await tool("nbdinfo", "--map", "--json", u)
    runs = json.loads(out)
    data = [r for r in runs if r["type"] == 0]
    assert [(r["offset"], r["length"]) for r in data] == [(4 * MIB, MIB)]


async def test_qemu_img_convert_and_nbdcopy_round_trip(kit: LabKit, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(range(256)) * (8 * MIB // 256))
    await create_volume(kit, "conv", "8M")
    await tool(
        "qemu-img",
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        str(src),
        await uri(kit, "conv", "node3"),
    )
    back = tmp_path / "back.raw"
    await tool("nbdcopy", "--connections", "4", await uri(kit, "conv", "node1"), str(back))
    assert back.read_bytes() == src.read_bytes()
    await tool(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), await uri(kit, "conv", "node2")
    )


async def test_an_unknown_export_is_refused(kit: LabKit) -> None:
    code, out = await tool("nbdinfo", kit.nbd_uri("no-such-volume"), check=False)
    assert code != 0
    assert "no-such-volume" in out or "unknown" in out.lower()


async def test_killing_a_replica_node_mid_write_loses_no_acknowledged_write(kit: LabKit) -> None:
    await create_volume(kit, "survive", "24M")
    u = await uri(kit, "survive", "node1")
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0xee 0 24M", u)  # every extent exists
    before = (await kit.call("GET", "/v1/volumes/survive")).json()
    victim = next(n for n in before["extents"][0]["replicas"] if n != "node1")
    lost = {e["id"] for e in before["extents"] if victim in e["replicas"]}
    args = [a for i in range(24) for a in ("-c", f"write -P {i + 1} {i}M 1M")]
    proc = await asyncio.create_subprocess_exec(
        "qemu-io",
        "-f",
        "raw",
        *args,
        u,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    await asyncio.sleep(0.2)
    kit.lab.kill_storage(victim)
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and b"error" not in out.lower(), out.decode()
    checks = [a for i in range(24) for a in ("-c", f"read -P {i + 1} {i}M 1M")]
    reader = next(n for n in ("node2", "node3") if n != victim)
    _, text = await tool("qemu-io", "-f", "raw", *checks, await uri(kit, "survive", reader))
    assert "Pattern verification failed" not in text
    after = (await kit.call("GET", "/v1/volumes/survive")).json()
    assert after["health"] == "degraded"
    for e in after["extents"]:
        assert victim not in e["replicas"]
        if e["id"] in lost:
            assert e["stale"] == [victim] and e["generation"] >= 2
    kit.lab.start_storage(victim)
    await kit.lab.wait_ready()


async def test_a_second_access_point_fences_the_first(kit: LabKit) -> None:
    await create_volume(kit, "single", "8M")
    store = kit.etcd()
    meta = MetaService(store, owners=ClusterOwners(store))
    pool = ReplicaPool(meta, auth=kit.replica_auth())
    lease = await store.grant_lease(30)
    try:
        first = await open_volume(meta, pool, "tester-a", "single", lease)
        await first.write(0, b"a" * 4096)
        with pytest.raises(InvalidState, match="attached on tester-a"):
            await open_volume(meta, pool, "tester-b", "single", lease)
        second = await open_volume(meta, pool, "tester-b", "single", lease, takeover=True)
        # epochs are cluster-wide: another attach (a recovery pass of an earlier test's
        # volume) may take one in between, so only "newer" is guaranteed
        assert second.epoch > first.epoch
        with pytest.raises(Fenced):
            await first.write(0, b"x" * 4096)
        await second.write(4096, b"b" * 4096)
        assert await second.read(0, 8192) == b"a" * 4096 + b"b" * 4096
        await second.flush()
        await second.close()
    finally:
        await store.revoke_lease(lease)
        await pool.close()
        await store.close()


async def wait_healthy(kit: LabKit, name: str, timeout: float = 90) -> dict[str, Any]:
    async def healthy() -> dict[str, Any] | None:
        vol: dict[str, Any] = (await kit.call("GET", f"/v1/volumes/{name}")).json()
        return vol if vol["health"] == "healthy" else None

    return await wait_for(healthy, f"volume {name} healthy again", timeout)


async def test_a_replica_back_within_the_grace_period_copies_only_what_it_missed(
    kit: LabKit,
) -> None:
    await create_volume(kit, "inc", "16M")
    u = await uri(kit, "inc", "node1")
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 16M", u)
    vol = (await kit.call("GET", "/v1/volumes/inc")).json()
    victim = next(n for n in vol["extents"][0]["replicas"] if n != "node1")
    ext = vol["extents"][0]["id"]
    kit.lab.kill_storage(victim)
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x6b 1M 512k", u)  # 512 KiB missed
    kit.lab.start_storage(victim)
    healthy = await wait_healthy(kit, "inc")
    assert all(victim in e["replicas"] for e in healthy["extents"] if e["slot"] == 0)

    async def caught_up() -> list[str] | None:  # logged when the leader's pass ends
        logs = "".join(kit.lab.storage(n).log_file.read_text() for n in kit.lab.node_names)
        return [ln for ln in logs.splitlines() if ext in ln and "caught up" in ln] or None

    lines = await wait_for(caught_up, f"the catch-up of {ext} in the logs", 60)
    copied = [int(ln.split("copied ")[1].split(" bytes")[0]) for ln in lines]
    assert max(copied) <= 512 * 1024, lines  # only the blocks written meanwhile
    _, text = await tool(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "read -P 0x6b 1M 512k",
        "-c",
        "read -P 0x5a 2M 1M",
        await uri(kit, "inc", victim),
    )
    assert "Pattern verification failed" not in text


async def test_a_replica_kept_down_is_recreated_on_another_node(kit: LabKit) -> None:
    await create_volume(kit, "rerep", "8M")
    u = await uri(kit, "rerep", "node1")
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 8M", u)
    vol = (await kit.call("GET", "/v1/volumes/rerep")).json()
    victim = next(n for n in vol["extents"][0]["replicas"] if n != "node1")
    third = ({"node2", "node3"} - {victim}).pop()
    kit.lab.kill_storage(victim)
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x78 0 4k", u)  # drops the replica
    healthy = await wait_healthy(kit, "rerep")
    assert all(sorted(e["replicas"]) == sorted(["node1", third]) for e in healthy["extents"])
    kit.lab.start_storage(victim)
    await kit.lab.wait_ready()
    _, text = await tool(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "read -P 0x78 0 4k",
        "-c",
        "read -P 0x77 4k 4M",
        await uri(kit, "rerep", third),
    )
    assert "Pattern verification failed" not in text


async def test_a_flipped_bit_in_a_replica_is_served_good_and_repaired(kit: LabKit) -> None:
    await create_volume(kit, "flip", "4M")
    u = await uri(kit, "flip", "node1")
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "flush", u)
    vol = (await kit.call("GET", "/v1/volumes/flip")).json()
    ext = vol["extents"][0]["id"]
    [data] = list(kit.lab.node_dir("node1").rglob(f"{ext}.data"))
    with data.open("r+b") as f:
        f.seek(8192 + 17)
        byte = f.read(1)
        f.seek(8192 + 17)
        f.write(bytes([byte[0] ^ 0x01]))
    _, text = await tool("qemu-io", "-f", "raw", "-c", "read -P 0x42 0 1M", u)
    assert "Pattern verification failed" not in text
    with data.open("rb") as f:
        f.seek(8192 + 17)
        assert f.read(1) == byte, "the bad replica was repaired from the good one"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"name": "bad", "size": 0}, 422, "size"),
        ({"name": "bad", "size": 1000}, 422, "size"),
        ({"name": "bad", "size": "ten"}, 422, "size"),
        ({"name": "bad", "size": "1P"}, 422, "size"),
        ({"name": "bad", "size": "1M", "replicas": 4}, 422, "replicas"),
        ({"name": "Bad!", "size": "1M"}, 422, "name"),
        ({"name": "dupe", "size": "1M"}, 409, "name"),
    ],
)
async def test_bad_volume_requests_name_the_field_and_change_nothing(
    kit: LabKit, body: dict[str, Any], status: int, field: str
) -> None:
    if status == 409:
        await create_volume(kit, "dupe", "1M", replicas=1)
    before = await volume_keys(kit)
    r = await kit.call("POST", "/v1/volumes", json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    assert await volume_keys(kit) == before


async def volume_keys(kit: LabKit) -> dict[str, bytes]:
    """The volume records, minus the fields background recovery rewrites (epochs)."""
    dump = await kit.store_dump()
    return {
        k: json.dumps({**json.loads(v), "epoch": 0}).encode()
        for k, v in dump.items()
        if k.startswith("/aecp/abs/volumes/")
    }


async def test_shrinking_and_deleting_an_attached_volume_are_refused(kit: LabKit) -> None:
    await create_volume(kit, "busy", "4M")
    r = await kit.call("POST", "/v1/volumes/busy/resize", json={"size": "1M"})
    assert r.status_code == 422 and "only grow" in r.json()["message"]
    proc = await asyncio.create_subprocess_exec(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "sleep 3000",
        await uri(kit, "busy", "node1"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: _attached(kit, "busy"), "busy to be attached")
        r = await kit.call("DELETE", "/v1/volumes/busy")
        assert r.status_code == 409 and "in use" in r.json()["message"]
    finally:
        await proc.wait()


async def _attached(kit: LabKit, name: str) -> bool:
    vol: dict[str, Any] = (await kit.call("GET", f"/v1/volumes/{name}")).json()
    return vol["attached_to"] is not None


async def _detached(kit: LabKit, name: str) -> bool:
    """An export detaches its volume after the last client disconnected and a flush, so
    shortly after the client exits, not at once (a busy disk makes the flush slow)."""
    return not await _attached(kit, name)


async def test_snapshot_and_clone_hold_their_data_whatever_is_deleted_first(
    kit: LabKit,
) -> None:
    await create_volume(kit, "orig", "8M")
    u = await uri(kit, "orig", "node1")
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x31 0 8M", u)
    r = await kit.call("POST", "/v1/volumes/orig/snapshots", json={"name": "s1"})
    assert r.status_code == 201, r.text
    await tool("qemu-io", "-f", "raw", "-c", "write -P 0x32 0 1M", u)
    r = await kit.call("POST", "/v1/volumes/orig/snapshots/s1/clone", json={"name": "copy"})
    assert r.status_code == 201, r.text
    assert (await kit.call("DELETE", "/v1/volumes/orig/snapshots/s1")).status_code == 204
    await wait_for(lambda: _detached(kit, "orig"), "orig to be detached")
    assert (await kit.call("DELETE", "/v1/volumes/orig")).status_code == 204
    _, text = await tool(
        "qemu-io", "-f", "raw", "-c", "read -P 0x31 0 8M", await uri(kit, "copy", "node2")
    )
    assert "Pattern verification failed" not in text
    await wait_for(lambda: _detached(kit, "copy"), "copy to be detached")
    assert (await kit.call("DELETE", "/v1/volumes/copy")).status_code == 204
