"""ABS metadata: volume validation, thin extent tables, attach epochs, replica drop generations,
and replica placement."""

from __future__ import annotations

import pytest

from aecp.cluster.volumeowners import ClusterOwners
from aecp.common.errors import AlreadyExists, InvalidInput, InvalidState, NoCapacity
from aecp.common.sizes import parse_size
from aecp.storage.meta.model import (
    MIB,
    ExtentRecord,
    StorageServer,
    default_replicas,
    new_extent_id,
)
from aecp.storage.meta.placement import StorageNode, place
from aecp.storage.meta.service import MetaService
from aecp.store import keys
from aecp.store.memory import MemoryStore
from tests.unit.conftest import dump_store


async def add_servers(store: MemoryStore, n: int, capacity: int = 10 << 30) -> None:
    for i in range(1, n + 1):
        s = StorageServer(
            node=f"n{i}",
            address=f"127.0.9.{i}",
            chunk_port=1,
            nbd_port=2,
            capacity_bytes=capacity,
            free_bytes=capacity,
        )
        await store.put(keys.abs_server(f"n{i}"), s.dump())


@pytest.fixture
async def meta(store: MemoryStore) -> MetaService:
    await add_servers(store, 3)
    return MetaService(store, extent_size=4 * MIB, owners=ClusterOwners(store))


def test_sizes_parse_with_units() -> None:
    assert parse_size("size", "10G") == 10 << 30
    assert parse_size("size", "512M") == 512 << 20
    assert parse_size("size", "4096") == 4096
    with pytest.raises(InvalidInput, match="size"):
        parse_size("size", "ten gigs")


def test_the_default_factor_is_two_below_five_nodes_and_three_from_five() -> None:
    assert [default_replicas(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 2, 2, 3, 3]


async def test_a_new_volume_is_thin_with_one_empty_slot_per_extent(meta: MetaService) -> None:
    vol = await meta.create_volume("v1", 10 * MIB, replicas=2)
    assert vol.extents == [None, None, None]
    assert vol.replicas == 2


@pytest.mark.parametrize(
    ("size", "replicas", "field"),
    [
        (0, 2, "size"),
        (1000, 2, "size"),
        (MIB, 4, "replicas"),
        (MIB, 0, "replicas"),
        (40 << 30, 3, "size"),  # 120 GiB provisioned > 3.0 x 30 GiB raw
    ],
)
async def test_bad_volumes_are_refused_and_change_nothing(
    meta: MetaService, store: MemoryStore, size: int, replicas: int, field: str
) -> None:
    before = await dump_store(store)
    with pytest.raises(InvalidInput) as err:
        await meta.create_volume("v1", size, replicas=replicas)
    assert err.value.fields["field"] == field
    assert await dump_store(store) == before


async def test_a_factor_above_the_number_of_storage_nodes_is_refused(store: MemoryStore) -> None:
    await add_servers(store, 2)
    with pytest.raises(InvalidInput, match="need 3 storage nodes"):
        await MetaService(store, owners=ClusterOwners(store)).create_volume("v", MIB, replicas=3)


async def test_duplicate_volumes_and_shrinking_are_refused(meta: MetaService) -> None:
    await meta.create_volume("v1", 8 * MIB, replicas=1)
    with pytest.raises(AlreadyExists):
        await meta.create_volume("v1", 8 * MIB, replicas=1)
    with pytest.raises(InvalidInput, match="only grow"):
        await meta.resize("v1", 4 * MIB)
    grown = await meta.resize("v1", 16 * MIB)
    assert grown.slots == 4


async def test_each_attach_raises_the_epoch_and_a_second_node_needs_takeover(
    meta: MetaService, store: MemoryStore
) -> None:
    await meta.create_volume("v1", 8 * MIB, replicas=1)
    lease = await store.grant_lease(10)
    _, e1 = await meta.attach("v1", "n1", lease)
    with pytest.raises(InvalidState, match="attached on n1"):
        await meta.attach("v1", "n2", lease)
    _, e2 = await meta.attach("v1", "n2", lease, takeover=True)
    assert e2 == e1 + 1
    with pytest.raises(InvalidState, match="in use"):
        await meta.delete_volume("v1")
    await meta.detach("v1", "n1", e1)  # not ours any more: no effect
    assert (await meta.attachment("v1")) is not None
    await meta.detach("v1", "n2", e2)
    assert await meta.delete_volume("v1") == []


async def test_dropping_a_replica_bumps_the_generation_and_remembers_what_it_missed(
    meta: MetaService,
) -> None:
    await meta.create_volume("v1", 8 * MIB, replicas=2)
    ext = ExtentRecord(id=new_extent_id(), size=4 * MIB, replicas=["n1", "n2"], generation=3)
    assert await meta.commit_extent("v1", 1, ext)
    assert not await meta.commit_extent("v1", 1, ext.model_copy(update={"id": "ext-other"}))
    dropped = await meta.drop_replica(ext.id, "n2")
    assert dropped.replicas == ["n1"] and dropped.generation == 4 and dropped.stale == {"n2": 3}
    with pytest.raises(InvalidState, match="last valid replica"):
        await meta.drop_replica(ext.id, "n1")
    freed = await meta.delete_volume("v1")
    assert [e.id for e in freed] == [ext.id]


def test_placement_spreads_replicas_and_prefers_the_vms_node() -> None:
    nodes = [StorageNode("n1", 100), StorageNode("n2", 300), StorageNode("n3", 200)]
    assert place(2, nodes, 10) == ["n2", "n3"]
    assert place(2, nodes, 10, prefer="n1") == ["n1", "n2"]
    assert place(1, nodes, 150, exclude=["n2"]) == ["n3"]


def test_placement_puts_replicas_in_different_racks_when_tagged() -> None:
    nodes = [
        StorageNode("n1", 300, rack="r1"),
        StorageNode("n2", 200, rack="r1"),
        StorageNode("n3", 100, rack="r2"),
    ]
    assert place(2, nodes, 10) == ["n1", "n3"]


def test_placement_without_enough_nodes_is_no_capacity() -> None:
    with pytest.raises(NoCapacity):
        place(3, [StorageNode("n1", 100), StorageNode("n2", 100)], 10)
