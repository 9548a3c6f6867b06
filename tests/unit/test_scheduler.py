"""Placement: the node with the most free memory that fits; a clear refusal when none does."""

from __future__ import annotations

import pytest

from aecp.cluster.scheduler import Scheduler, choose_node, reserve
from aecp.common.errors import NoCapacity
from aecp.model.node import Capacity, NodeAdmin, NodeState, NodeView
from aecp.model.operation import OpState
from aecp.model.vm import Placement, VMSpec, VMState, VMStatus
from aecp.store import keys
from aecp.store.memory import MemoryStore
from aecp.store.typed import read
from aecp.store.view import read_cluster
from tests.unit.conftest import add_node


def view(
    name: str, mem: int, reserved: int = 0, cpus: int = 4, state: NodeState = NodeState.READY
) -> NodeView:
    return NodeView(
        name=name,
        address="a",
        api_url="u",
        state=state,
        capacity=Capacity(cpus=cpus, memory_mib=mem, disk_bytes=1),
        usage=None,
        accel="tcg",
        reserved_memory_mib=reserved,
        reserved_vcpus=0,
        vms=0,
    )


def vm(name: str = "vm1", mem: int = 512, vcpus: int = 1, node: str | None = None) -> VMSpec:
    return VMSpec(name=name, uuid="u", image="tiny", vcpus=vcpus, memory_mib=mem, node=node)


def test_the_node_with_most_free_memory_wins() -> None:
    nodes = [view("n1", 4096, reserved=3000), view("n2", 4096, reserved=1000), view("n3", 2048)]
    assert choose_node(vm(), nodes).name == "n2"


def test_ties_go_to_the_first_name() -> None:
    assert choose_node(vm(), [view("n2", 1024), view("n1", 1024)]).name == "n1"


def test_unreachable_nodes_and_nodes_without_room_are_skipped() -> None:
    nodes = [
        view("n1", 8192, state=NodeState.UNREACHABLE),
        view("n2", 1024, reserved=900),
        view("n3", 1024),
    ]
    assert choose_node(vm(mem=512), nodes).name == "n3"


def test_a_vm_with_more_vcpus_than_a_node_has_does_not_go_there() -> None:
    assert (
        choose_node(vm(vcpus=8), [view("n1", 99999, cpus=4), view("n2", 512, cpus=8)]).name == "n2"
    )


def test_no_fit_raises_no_capacity_with_a_reason_per_node() -> None:
    with pytest.raises(NoCapacity) as err:
        choose_node(vm(mem=4096), [view("n1", 1024), view("n2", 2048, state=NodeState.UNREACHABLE)])
    assert "n1: 1024 MiB free" in err.value.message
    assert "n2: unreachable" in err.value.message


def test_a_pinned_vm_goes_only_to_its_node() -> None:
    nodes = [view("n1", 8192), view("n2", 1024)]
    assert choose_node(vm(node="n2"), nodes).name == "n2"
    with pytest.raises(NoCapacity, match="pinned to n2"):
        choose_node(vm(mem=2048, node="n2"), nodes)


def test_reserving_a_vm_reduces_free_memory() -> None:
    assert reserve(view("n1", 1024), vm(mem=256)).free_memory_mib == 768


async def test_one_pass_spreads_new_vms_across_equal_nodes(store: MemoryStore) -> None:
    for n in ("n1", "n2", "n3"):
        await add_node(store, n, memory_mib=2048)
    for i in range(3):
        await store.put(
            keys.vm_spec(f"vm{i}"), vm(f"vm{i}").model_copy(update={"created_at": float(i)}).dump()
        )
    decisions = await Scheduler(store).run_pass()
    placed = {}
    for i in range(3):
        got = await read(store, keys.vm_placement(f"vm{i}"), Placement)
        assert got is not None
        placed[f"vm{i}"] = got[0].node
    assert sorted(placed.values()) == ["n1", "n2", "n3"]
    assert all("placed on" in d.sentence for d in decisions)
    assert sorted(d.name for d in decisions) == ["vm0", "vm1", "vm2"]


async def test_an_unplaceable_vm_waits_as_unschedulable_with_the_reason(
    store: MemoryStore,
) -> None:
    from aecp.model.operation import Operation

    await add_node(store, "n1", memory_mib=1024)
    op = Operation(id="op-1", kind="vm.create", target="big", created_at=1, updated_at=1)
    await store.put(keys.op("op-1"), op.dump())
    await store.put(
        keys.vm_spec("big"), vm("big", mem=4096).model_copy(update={"op_id": "op-1"}).dump()
    )
    decisions = await Scheduler(store).run_pass()
    assert str(decisions[0]).startswith("vm big: cannot be placed now: no node can run VM big")
    status = await read(store, keys.vm_status("big"), VMStatus)
    assert status is not None and status[0].state is VMState.UNSCHEDULABLE
    got = await read(store, keys.op("op-1"), Operation)
    assert got is not None and got[0].state is OpState.RUNNING
    assert "waiting for a node" in got[0].message and "n1: 1024 MiB free" in got[0].message
    assert await store.get(keys.vm_placement("big")) is None
    await add_node(store, "n2", memory_mib=8192)
    assert str((await Scheduler(store).run_pass())[0]).startswith("vm big: placed on n2")


def test_a_cordoned_node_gets_no_new_vm_and_the_refusal_says_why() -> None:
    cordoned = view("n1", 8192).model_copy(update={"cordoned": True, "cordon_reason": "disk swap"})
    assert choose_node(vm(), [cordoned, view("n2", 1024)]).name == "n2"
    with pytest.raises(NoCapacity, match=r"n1: cordoned \(disk swap\)"):
        choose_node(vm(node="n1"), [cordoned, view("n2", 1024)])


async def test_the_cluster_view_reads_the_admin_key_beside_the_agents_record(
    store: MemoryStore,
) -> None:
    await add_node(store, "n1")
    admin = NodeAdmin(cordoned=True, reason="maintenance", updated_at=5)
    await store.put(keys.node_admin("n1"), admin.dump())
    cluster = await read_cluster(store)
    assert list(cluster.nodes) == ["n1"]
    assert cluster.node_view("n1").cordoned and cluster.node_view("n1").cordon_reason


async def test_a_vm_is_not_placed_on_a_node_cordoned_after_the_pass_read_the_cluster(
    store: MemoryStore,
) -> None:
    await add_node(store, "n1")
    await store.put(keys.vm_spec("vm1"), vm("vm1").dump())
    real_txn = store.txn

    async def cordon_first(*args: object, **kw: object) -> bool:
        admin = NodeAdmin(cordoned=True, reason="now", updated_at=5)
        await store.put(keys.node_admin("n1"), admin.dump())  # between the read and the write
        store.txn = real_txn  # type: ignore[method-assign]
        return await real_txn(*args, **kw)  # type: ignore[arg-type]

    store.txn = cordon_first  # type: ignore[method-assign]
    [decision] = await Scheduler(store).run_pass()
    assert "changed while being placed" in decision.sentence
    assert await store.get(keys.vm_placement("vm1")) is None
    [decision] = await Scheduler(store).run_pass()
    assert "cannot be placed now" in decision.sentence and "n1: cordoned (now)" in decision.sentence
