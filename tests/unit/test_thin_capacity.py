"""Thin provisioning: volumes may provision up to ``overcommit_ratio`` x the raw capacity; a
replica store with a capacity refuses writes that need space it lacks (ENOSPC, nothing
changed); the access point answers ENOSPC without dropping a full replica, and every write it
acknowledged stays readable; storage status shows how full each server and the cluster are."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from aecp.cluster.volumeowners import ClusterOwners
from aecp.cluster.volumes import VolumeService
from aecp.common.errors import ConfigError, InvalidInput, NoCapacity
from aecp.conf.settings import parse
from aecp.storage.blockdev import NoSpace
from aecp.storage.chunk import replica as replica_module
from aecp.storage.chunk.errors import ChunkIOError
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.meta.model import GIB, MIB, StorageServer, new_extent_id
from aecp.storage.meta.service import MetaService
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.memory import MemoryStore
from tests.unit.abskit import BLOCK, EXTENT, Cluster
from tests.unit.conftest import dump_store
from tests.unit.test_abs_meta import add_servers
from tests.unit.test_settings import good

# ---- the replica store ----------------------------------------------------------------------


async def test_a_write_needing_more_space_than_the_capacity_fails_and_changes_nothing(
    tmp_path: Path,
) -> None:
    async with ReplicaStore(tmp_path, block_size=BLOCK, capacity=4 * BLOCK) as store:
        ext = new_extent_id()
        await store.create(ext, EXTENT)
        await store.write(ext, 0, b"a" * 3 * BLOCK, epoch=1, generation=1)
        runs = await store.allocation(ext)
        with pytest.raises(ChunkIOError) as err:
            await store.write(ext, 3 * BLOCK, b"b" * 2 * BLOCK, epoch=1, generation=1)
        assert err.value.errno == errno.ENOSPC
        assert "no space left" in err.value.message
        assert await store.allocation(ext) == runs
        assert await store.read(ext, 3 * BLOCK, 2 * BLOCK) == bytes(2 * BLOCK)
        assert store.space.used == 3 * BLOCK
        # rewriting allocated blocks needs no space, and the replica still takes writes
        await store.write(ext, 0, b"c" * BLOCK, epoch=1, generation=2)
        await store.write(ext, 3 * BLOCK, b"d" * BLOCK, epoch=1, generation=2)
        assert store.space.used == 4 * BLOCK
        assert await store.read(ext, 0, 4 * BLOCK) == b"c" * BLOCK + b"a" * 2 * BLOCK + b"d" * BLOCK


async def test_trims_and_deletes_give_their_space_back(tmp_path: Path) -> None:
    async with ReplicaStore(tmp_path, block_size=BLOCK, capacity=4 * BLOCK) as store:
        ext = new_extent_id()
        await store.create(ext, EXTENT)
        await store.write(ext, 0, b"a" * 4 * BLOCK, epoch=1, generation=1)
        await store.trim(ext, BLOCK, 2 * BLOCK, epoch=1, generation=2)
        assert store.space.used == 2 * BLOCK
        await store.write(ext, 8 * BLOCK, b"e" * 2 * BLOCK, epoch=1, generation=3)  # fits again
        await store.delete(ext)
        assert store.space.used == 0
        assert store.space.free() == 4 * BLOCK


async def test_a_write_the_disk_refuses_for_space_fails_alone_and_the_replica_lives_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ReplicaStore(tmp_path, block_size=BLOCK, uring=False) as store:
        ext = new_extent_id()
        await store.create(ext, EXTENT)
        await store.write(ext, 0, b"a" * BLOCK, epoch=1, generation=1)
        real = replica_module.write_sectors

        def full(*args: object) -> object:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(replica_module, "write_sectors", full)
        with pytest.raises(ChunkIOError) as err:
            await store.write(ext, BLOCK, b"b" * BLOCK, epoch=1, generation=1)
        assert err.value.errno == errno.ENOSPC
        monkeypatch.setattr(replica_module, "write_sectors", real)
        await store.write(ext, BLOCK, b"b" * BLOCK, epoch=1, generation=2)  # not failed
        await store.flush(ext)
        assert await store.read(ext, 0, 2 * BLOCK) == b"a" * BLOCK + b"b" * BLOCK


# ---- the access point -----------------------------------------------------------------------


async def test_a_full_replica_fails_the_write_with_enospc_and_is_not_dropped(
    cluster: Cluster,
) -> None:
    await cluster.meta.create_volume("v", 4 * EXTENT, replicas=2)
    dev = await cluster.open("v", "n1")  # n1 holds a replica of every extent (placed locally)
    n1 = cluster.replicas["n1"].store
    n1.space.capacity = EXTENT  # room for one extent's blocks
    await dev.write(0, b"\x11" * EXTENT)  # acknowledged: n1 is full now
    vol, _ = await cluster.meta.volume("v")
    first = (await cluster.meta.extent(vol.extents[0] or ""))[0]
    with pytest.raises(NoSpace) as err:
        await dev.write(EXTENT, b"\x22" * BLOCK)  # a new extent: its blocks need space on n1
    assert err.value.errno == errno.ENOSPC and "n1" in err.value.message
    started = dev.write_nowait(EXTENT + BLOCK, b"\x33" * 4096)  # the fast path answers so too
    if started is not None:
        with pytest.raises(NoSpace):
            await started
    vol, _ = await cluster.meta.volume("v")
    for ext_id in (x for x in vol.extents if x):
        ext, _ = await cluster.meta.extent(ext_id)
        assert len(ext.replicas) == 2 and "n1" in ext.replicas and ext.stale == {}
    assert (await cluster.meta.extent(first.id))[0].generation == first.generation
    await dev.write(4096, b"\x44" * 4096)  # allocated blocks: still writable in place
    assert await dev.read(0, 8192) == b"\x11" * 4096 + b"\x44" * 4096
    assert await dev.read(8192, EXTENT - 8192) == b"\x11" * (EXTENT - 8192)
    await dev.flush()
    await dev.close()


async def test_a_write_a_full_replica_refused_is_undone_on_the_replicas_that_took_it(
    cluster: Cluster,
) -> None:
    # else the replicas disagree on the range, and a read depends on which one serves it
    await cluster.meta.create_volume("v", 2 * EXTENT, replicas=2)
    dev = await cluster.open("v", "n1")
    n1 = cluster.replicas["n1"].store
    n1.space.capacity = EXTENT + BLOCK
    await dev.write(0, b"\x11" * EXTENT)
    await dev.write(EXTENT, b"\x55" * BLOCK)  # acknowledged: n1 is full now
    vol, _ = await cluster.meta.volume("v")
    ext, _ = await cluster.meta.extent(vol.extents[1] or "")
    other = cluster.replicas[next(n for n in ext.replicas if n != "n1")].store
    used = other.space.used
    with pytest.raises(NoSpace):  # its second half needs a new block on n1
        await dev.write(EXTENT + BLOCK // 2, b"\x66" * BLOCK)
    expected = b"\x55" * BLOCK + bytes(BLOCK)
    assert await n1.read(ext.id, 0, 2 * BLOCK) == expected
    assert await other.read(ext.id, 0, 2 * BLOCK) == expected
    assert await other.allocation(ext.id) == await n1.allocation(ext.id)
    assert other.space.used == used  # the block the write filled there was given back
    assert (await cluster.meta.extent(ext.id))[0].replicas == ext.replicas
    await dev.close()


# ---- admission ------------------------------------------------------------------------------


async def servers(store: MemoryStore, capacity: int = 10 * GIB) -> None:
    await add_servers(store, 3, capacity)


async def set_free(store: MemoryStore, node: str, free: int) -> None:
    kv = await store.get(keys.abs_server(node))
    assert kv is not None
    s = StorageServer.load(kv.value)
    await store.put(keys.abs_server(node), s.model_copy(update={"free_bytes": free}).dump())


async def test_volumes_may_provision_up_to_the_overcommit_ratio_of_raw_capacity(
    store: MemoryStore,
) -> None:
    await servers(store)  # 30 GiB raw: 90 GiB may be provisioned at 3.0
    meta = MetaService(store, extent_size=64 * MIB, owners=ClusterOwners(store))
    await meta.create_volume("big", 40 * GIB, replicas=2)  # 80 GiB: thin, more than raw
    before = await dump_store(store)
    with pytest.raises(InvalidInput) as err:
        await meta.create_volume("more", 6 * GIB, replicas=2)
    assert err.value.fields["field"] == "size"
    assert (
        f"the limit is {90 * GIB} bytes (3 x {30 * GIB} bytes of raw capacity) and "
        f"{80 * GIB} bytes are provisioned already" in err.value.message
    )
    with pytest.raises(InvalidInput, match="would provision"):
        await meta.resize("big", 46 * GIB)
    with pytest.raises(NoCapacity, match="would provision"):
        await SnapshotService(meta, pool=None).clone_volume("big", "copy")  # type: ignore[arg-type]
    assert await dump_store(store) == before
    await meta.create_volume("fits", 5 * GIB, replicas=2)  # exactly at the limit


async def test_an_overcommit_ratio_of_one_admits_only_the_raw_capacity(
    store: MemoryStore,
) -> None:
    await servers(store)
    meta = MetaService(store, overcommit_ratio=1.0, owners=ClusterOwners(store))
    with pytest.raises(InvalidInput, match=f"the limit is {30 * GIB} bytes"):
        await meta.create_volume("v", 16 * GIB, replicas=2)


async def set_server(store: MemoryStore, node: str, **fields: object) -> None:
    kv = await store.get(keys.abs_server(node))
    assert kv is not None
    s = StorageServer.load(kv.value)
    await store.put(keys.abs_server(node), s.model_copy(update=fields).dump())


async def test_every_node_admits_by_the_lowest_overcommit_ratio_the_storage_servers_publish(
    store: MemoryStore,
) -> None:
    # The ratio was the setting of the node whose API took the request: the same volume was
    # admitted through one node and refused through another.
    await servers(store)  # 30 GiB raw
    for node, ratio in (("n1", 2.0), ("n2", 3.0), ("n3", 3.0)):
        await set_server(store, node, overcommit_ratio=ratio)
    for local in (1.0, 5.0):  # what each API node is configured with itself
        meta = MetaService(store, overcommit_ratio=local, owners=ClusterOwners(store))
        with pytest.raises(InvalidInput, match=f"the limit is {60 * GIB} bytes \\(2 x "):
            await meta.create_volume("big", 31 * GIB, replicas=2)
    one = MetaService(store, overcommit_ratio=1.0, owners=ClusterOwners(store))
    await one.create_volume("big", 30 * GIB, replicas=2)
    meta = MetaService(store, owners=ClusterOwners(store))
    st = await VolumeService(meta, pool=None).status()  # type: ignore[arg-type]
    assert st.overcommit_ratio == 2.0 and st.provisioned_limit_bytes == 60 * GIB
    assert any("different overcommit ratios (2 on n1, 3 on n2, 3 on n3)" in w for w in st.warnings)


async def test_storage_status_warns_when_provisioning_exceeds_the_limit_after_capacity_shrinks(
    store: MemoryStore,
) -> None:
    await servers(store)  # 30 GiB raw: 90 GiB may be provisioned
    meta = MetaService(store, owners=ClusterOwners(store))
    await meta.create_volume("v", 40 * GIB, replicas=2)
    svc = VolumeService(meta, pool=None)  # type: ignore[arg-type]
    assert not any("provisioned" in w for w in (await svc.status()).warnings)
    for node in ("n1", "n2", "n3"):  # smaller disks: 15 GiB raw, 45 GiB may be provisioned
        await set_server(store, node, capacity_bytes=5 * GIB, free_bytes=5 * GIB)
    st = await svc.status()
    warning = f"{80 * GIB} bytes are provisioned, more than the limit of {45 * GIB} bytes"
    assert any(w.startswith(warning) for w in st.warnings)


async def test_a_published_overcommit_ratio_that_is_not_a_finite_positive_number_is_ignored(
    store: MemoryStore,
) -> None:
    # A negative ratio in a record made the limit negative (nothing could be created), and an
    # infinite one made it infinite where it was the lowest published.
    await servers(store)  # 30 GiB raw
    for node, ratio in (("n1", "-1.0"), ("n2", "1e400"), ("n3", "2.0")):
        kv = await store.get(keys.abs_server(node))
        assert kv is not None
        raw = kv.value.decode().replace('"overcommit_ratio":null', f'"overcommit_ratio":{ratio}')
        await store.put(keys.abs_server(node), raw.encode())
    meta = MetaService(store, owners=ClusterOwners(store))
    assert [s.overcommit_ratio for s in (await meta.servers()).values()] == [None, None, 2.0]
    with pytest.raises(InvalidInput, match=f"the limit is {60 * GIB} bytes \\(2 x "):
        await meta.create_volume("big", 31 * GIB, replicas=2)
    await meta.create_volume("fits", 30 * GIB, replicas=2)


def test_an_overcommit_ratio_that_is_not_finite_is_refused_in_the_settings() -> None:
    # It was accepted: the server published null (ignored), and int(raw x inf) failed creates.
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ConfigError) as err:
            parse(good() | {"storage": {"overcommit_ratio": bad}})
        assert "storage.overcommit_ratio" in " ".join(err.value.fields["problems"])


def test_the_overcommit_ratio_must_be_positive_and_one_capacity_is_given() -> None:
    base = good()
    with pytest.raises(ConfigError) as err:
        parse(base | {"storage": {"overcommit_ratio": 0}})
    assert "storage.overcommit_ratio" in " ".join(err.value.fields["problems"])
    with pytest.raises(ConfigError, match="not both"):
        parse(base | {"storage": {"capacity_gib": 1, "capacity_mib": 64}})
    assert parse(base | {"storage": {"capacity_mib": 64}}).storage.capacity_bytes == 64 * MIB
    assert parse(base).storage.overcommit_ratio == 3.0


# ---- status ---------------------------------------------------------------------------------


async def test_storage_status_warns_over_80_and_is_critical_over_90_percent(
    store: MemoryStore,
) -> None:
    await servers(store, capacity=100 * MIB)
    for node in ("n1", "n2", "n3"):
        await set_free(store, node, 50 * MIB)
    meta = MetaService(store, owners=ClusterOwners(store))
    svc = VolumeService(meta, pool=None)  # type: ignore[arg-type]
    await meta.create_volume("v", 200 * MIB, replicas=2)
    st = await svc.status()
    assert st.level == "ok" and st.warnings == []
    assert (st.raw_bytes, st.free_bytes, st.provisioned_bytes) == (300 * MIB, 150 * MIB, 400 * MIB)
    assert st.provisioned_limit_bytes == 900 * MIB and st.used_pct == 50.0
    await set_free(store, "n1", 15 * MIB)
    await set_free(store, "n2", 5 * MIB)
    st = await svc.status()
    levels = {s.node: (s.used_pct, s.level) for s in st.servers}
    assert levels == {"n1": (85.0, "warning"), "n2": (95.0, "critical"), "n3": (50.0, "ok")}
    assert st.level == "critical"
    assert "storage server n1 is 85% full (warning)" in st.warnings
    assert "storage server n2 is 95% full (critical)" in st.warnings
