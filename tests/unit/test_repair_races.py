"""Sector repairs ordered against everything else the access point sees: a repair never
overwrites a write acknowledged while it ran, never copies from a replica dropped meanwhile,
and a repair by an access point that was closed meanwhile changes nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from aecp.storage.chunk.errors import ChecksumError, ReplicaUnavailable
from aecp.storage.recovery import RecoveryPolicy, Repairer
from tests.unit._sync import run_ready
from tests.unit.abskit import BLOCK, Cluster
from tests.unit.test_recovery_races import Override, filled

AT = 12 * BLOCK


def held_read(cluster: Cluster) -> tuple[asyncio.Event, asyncio.Event]:
    """n1's reads of the repair's source data stop until released: (reading, go_on)."""
    n1, go_on, reading = cluster.replicas["n1"], asyncio.Event(), asyncio.Event()

    async def slow_read(*args: Any, **kw: Any) -> Any:
        data = await n1.read(*args, **kw)
        reading.set()
        await go_on.wait()
        return data

    cluster.pool.add("n1", Override(n1, "read", slow_read))  # type: ignore[arg-type]
    return reading, go_on


async def test_a_scrub_repair_never_overwrites_a_write_acknowledged_meanwhile(
    cluster: Cluster,
) -> None:
    dev, ext_id, other = await filled(cluster)
    ext, _ = await cluster.meta.extent(ext_id)
    reading, gate = held_read(cluster)
    rep = Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board)
    repairing = asyncio.ensure_future(rep._repair_sectors(ext, other, [AT // 4096]))
    await reading.wait()
    cluster.pool.add("n1", cluster.replicas["n1"])  # type: ignore[arg-type]
    writing = asyncio.ensure_future(dev.write(AT, b"\x99" * 4096))
    await run_ready()  # it waits for the repair (no I/O before that)
    gate.set()
    await asyncio.gather(repairing, writing)
    assert await cluster.replicas[other].store.read(ext_id, AT, 4096) == b"\x99" * 4096


async def test_a_scrub_by_an_access_point_closed_meanwhile_changes_nothing(
    cluster: Cluster,
) -> None:
    dev, ext_id, other = await filled(cluster)
    ext, _ = await cluster.meta.extent(ext_id)
    reading, go_on = held_read(cluster)
    rep = Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board)  # the daemon's scrub pass
    repairing = asyncio.ensure_future(rep._repair_sectors(ext, other, [AT // 4096]))
    await reading.wait()
    cluster.pool.add("n1", cluster.replicas["n1"])  # type: ignore[arg-type]
    await dev.flush()
    await dev.close()  # the last connection went away, and the client came back:
    again = await cluster.open("v", "n1")
    await again.write(AT, b"\x99" * 4096)
    go_on.set()
    await repairing
    assert await cluster.replicas[other].store.read(ext_id, AT, 4096) == b"\x99" * 4096


async def test_a_read_repair_never_copies_from_a_replica_dropped_while_it_waited(
    cluster: Cluster,
) -> None:
    dev, ext_id, other = await filled(cluster)
    n1, elsewhere = cluster.replicas["n1"], cluster.replicas[other]
    gate, in_flight, served, once = asyncio.Event(), asyncio.Event(), asyncio.Event(), []

    async def n1_read(ext: str, offset: int, length: int) -> Any:
        if offset == AT and not once:  # a latent bad sector on n1
            once.append(1)
            raise ChecksumError(ext, [AT // 4096])
        return await n1.read(ext, offset, length)

    async def n1_write(*args: Any, **kw: Any) -> Any:
        in_flight.set()
        await gate.wait()
        return await n1.write(*args, **kw)

    async def other_write(*args: Any, **kw: Any) -> Any:
        raise ReplicaUnavailable(other, "its writes fail")

    async def other_read(*args: Any, **kw: Any) -> Any:
        data = await elsewhere.read(*args, **kw)
        served.set()
        return data

    cluster.pool.add("n1", Override(Override(n1, "read", n1_read), "write", n1_write))  # type: ignore[arg-type]
    failing = Override(Override(elsewhere, "read", other_read), "write", other_write)
    cluster.pool.add(other, failing)  # type: ignore[arg-type]
    writing = asyncio.ensure_future(dev.write(AT, b"\x99" * 4096))
    await in_flight.wait()
    reading = asyncio.ensure_future(dev.read(AT, 4096))  # good data from `other`; repair waits
    await served.wait()
    await run_ready()  # on to the repair, which waits for the write (no I/O before that)
    assert not reading.done()
    gate.set()  # the write lands on n1, `other` is dropped, the write is acknowledged
    await asyncio.gather(writing, reading)
    ext, _ = await cluster.meta.extent(ext_id)
    assert ext.replicas == ["n1"]
    assert await n1.store.read(ext_id, AT, 4096) == b"\x99" * 4096
