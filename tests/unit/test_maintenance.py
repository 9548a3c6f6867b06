"""Maintenance pre-checks (``cluster.maintenance``): each check fails with its reason, every
failing check is listed at once, and the drain's plan is in its order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from aecp.cluster.api.app import create_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.maintenance import Action, Storage, check_exit, plan, precheck
from aecp.cluster.scheduler import choose_node, node_views
from aecp.cluster.vms import VMService
from aecp.common.errors import NoCapacity
from aecp.model.node import (
    Capacity,
    MaintenanceState,
    NodeAdmin,
    NodeHeartbeat,
    NodeRecord,
    Usage,
)
from aecp.model.vm import Placement, Power, VMSpec, VMState, VMStatus
from aecp.model.vmjob import JobKind, VMJob
from aecp.storage.meta.model import ExtentRecord, RecoveryRecord, VolumeRecord
from aecp.store import keys
from aecp.store.memory import MemoryStore
from aecp.store.view import ClusterView, VMEntry
from tests.unit.conftest import add_node, admin_token, dump_store


def node(name: str, memory_mib: int = 4096) -> NodeRecord:
    return NodeRecord(
        name=name,
        address="a",
        api_url="u",
        capacity=Capacity(cpus=4, memory_mib=memory_mib, disk_bytes=1),
        registered_at=1,
    )


def vm(
    name: str,
    on: str = "n1",
    mem: int = 512,
    state: VMState = VMState.RUNNING,
    power: Power | None = None,
    pin: str | None = None,
    job: VMJob | None = None,
) -> VMEntry:
    if power is None:
        power = Power.STOPPED if state is VMState.STOPPED else Power.RUNNING
    spec = VMSpec(
        name=name, uuid=f"u-{name}", image="tiny", vcpus=1, memory_mib=mem, node=pin, power=power
    )
    return VMEntry(
        spec=spec,
        spec_rev=1,
        placement=Placement(node=on, at=1),
        status=VMStatus(state=state, node=on),
        job=job,
    )


def cluster(
    *vms: VMEntry,
    nodes: dict[str, int] | None = None,
    down: tuple[str, ...] = (),
    admin: dict[str, NodeAdmin] | None = None,
) -> ClusterView:
    sizes = nodes or {"n1": 4096, "n2": 4096, "n3": 4096}
    return ClusterView(
        nodes={n: node(n, m) for n, m in sizes.items()},
        alive={n: NodeHeartbeat(name=n, at=1, usage=Usage()) for n in sizes if n not in down},
        vms={e.spec.name: e for e in vms},
        admin=admin or {},
    )


def in_state(state: MaintenanceState) -> NodeAdmin:
    return NodeAdmin(maintenance=state, maintenance_since=5)


def reasons(view: ClusterView, storage: Storage | None = None, shutdown: bool = False) -> list:
    return [str(f) for f in precheck(view, "n1", storage or Storage(), shutdown).failures]


def test_a_quiet_node_passes_every_check() -> None:
    assert precheck(cluster(vm("web")), "n1", Storage()).ok


def test_a_node_already_in_maintenance_cannot_enter_again() -> None:
    view = cluster(admin={"n1": in_state(MaintenanceState.MAINTENANCE)})
    assert reasons(view) == ["state: node n1 is already maintenance"]


def test_a_second_node_cannot_enter_while_another_is_in_or_entering() -> None:
    for state in (MaintenanceState.ENTERING, MaintenanceState.MAINTENANCE):
        view = cluster(admin={"n2": in_state(state)})
        assert reasons(view) == [
            f"one-at-a-time: node n2 is {state.value}: one node of a cluster at a time"
        ]


def test_the_last_ready_node_cannot_enter() -> None:
    view = cluster(down=("n2", "n3"))
    assert reasons(view) == [
        "last-ready-node: node n1 is the last ready node in use: no other node could run VMs"
    ]


def test_an_extent_whose_only_valid_replica_is_here_fails_and_names_its_volume() -> None:
    only = ExtentRecord(id="ext-1", size=1, replicas=["n1"], stale={"n2": 1})
    elsewhere_down = ExtentRecord(id="ext-2", size=1, replicas=["n1", "n3"])
    fine = ExtentRecord(id="ext-3", size=1, replicas=["n1", "n2"])
    vols = [
        VolumeRecord(name="web-boot", size=1, replicas=2, extent_size=1, extents=["ext-1"]),
        VolumeRecord(name="db-boot", size=1, replicas=2, extent_size=1, extents=["ext-2", None]),
    ]
    storage = Storage(extents=[only, elsewhere_down, fine], volumes=vols, servers={"n1", "n2"})
    assert reasons(cluster(), storage) == [
        "single-replica: 2 extents have their only valid replica on n1 (volumes db-boot, "
        "web-boot): wait for recovery to copy them"
    ]


def test_abs_recovery_in_progress_fails_the_check() -> None:
    copy = RecoveryRecord(
        volume="web-boot",
        extent="ext-1",
        kind="catch-up",
        target="n2",
        total_bytes=1,
        copied_bytes=0,
        started_at=1,
    )
    assert reasons(cluster(), Storage(recovering=[copy])) == [
        "recovery: ABS recovery is running: 1 copies in progress (web-boot); wait for it to finish"
    ]


def test_suspended_unknown_and_unsettled_vms_each_fail_with_their_reason() -> None:
    job = VMJob(
        vm="snap", vm_uuid="u-snap", kind=JobKind.SNAPSHOT, op_id="o", snapshot="s1", created_at=1
    )
    view = cluster(
        vm("paused", state=VMState.PAUSED, power=Power.PAUSED),
        vm("starting", state=VMState.STARTING),
        vm("broken", state=VMState.ERROR),
        vm("snap", job=job),
    )
    assert reasons(view) == [
        "vm-state: VM broken is in state error: start it again or power it off first",
        "vm-state: VM paused is suspended: resume it or power it off first",
        "vm-state: VM snap has a snapshot s1 in progress: wait for it to end",
        "vm-state: VM starting is starting: wait for it to settle",
    ]


def test_vms_of_an_unreachable_node_are_unknown() -> None:
    view = cluster(vm("web"), down=("n1",))
    assert reasons(view) == ["vm-state: VM web is in state unknown: its node does not answer"]


def test_a_running_vm_pinned_here_is_not_migratable_unless_powered_off() -> None:
    view = cluster(vm("pinned", pin="n1"))
    assert reasons(view) == ["migratable: VM pinned is pinned to n1: it cannot run elsewhere"]
    check = precheck(view, "n1", Storage(), shutdown_unmigratable=True)
    assert check.ok and [m.action for m in check.plan] == [Action.POWER_OFF]


def test_capacity_is_reserved_as_it_goes_largest_memory_first() -> None:
    # n2 and n3 have 1024 MiB each: 800 to n2, 700 to n3 (n2 is fuller now), 300 to n3
    view = cluster(
        vm("a", mem=700), vm("b", mem=800), vm("c", mem=300),
        nodes={"n1": 4096, "n2": 1024, "n3": 1024},
    )  # fmt: skip
    moves = plan(view, "n1", shutdown_unmigratable=False)
    assert [(m.vm, m.action, m.target) for m in moves] == [
        ("b", Action.LIVE, "n2"),
        ("a", Action.LIVE, "n3"),
        ("c", Action.LIVE, "n3"),
    ]
    view = cluster(vm("a", mem=700), vm("b", mem=800), nodes={"n1": 4096, "n2": 1024})
    [failure] = reasons(view)
    assert failure.startswith(
        "capacity: no other node has room for VM a (1 vCPUs, 700 MiB): n2: 224 MiB free"
    )
    check = precheck(view, "n1", Storage(), shutdown_unmigratable=True)
    assert check.ok and [(m.vm, m.action) for m in check.plan] == [
        ("b", Action.LIVE),
        ("a", Action.POWER_OFF),
    ]


def test_stopped_vms_are_cold_moved_after_the_running_ones_or_stay() -> None:
    view = cluster(
        vm("big-off", mem=900, state=VMState.STOPPED),
        vm("run", mem=512),
        vm("pinned-off", state=VMState.STOPPED, pin="n1"),
        vm("small-off", mem=100, state=VMState.STOPPED),
        nodes={"n1": 4096, "n2": 1024},
    )
    check = precheck(view, "n1", Storage())
    assert check.ok
    assert [(m.vm, m.action, m.target) for m in check.plan] == [
        ("run", Action.LIVE, "n2"),
        ("big-off", Action.STAY, ""),
        ("pinned-off", Action.STAY, ""),
        ("small-off", Action.COLD, "n2"),
    ]


def test_every_failing_check_is_listed_at_once() -> None:
    view = cluster(
        vm("paused", state=VMState.PAUSED, power=Power.PAUSED),
        vm("pinned", pin="n1"),
        admin={"n3": in_state(MaintenanceState.ENTERING)},
        down=("n2",),
    )
    copy = RecoveryRecord(
        volume="v", extent="e", kind="re-replicate", target="n2", total_bytes=1,
        copied_bytes=0, started_at=1,
    )  # fmt: skip
    only = ExtentRecord(id="e", size=1, replicas=["n1"])
    checks = [
        f.check for f in precheck(view, "n1", Storage(extents=[only], recovering=[copy])).failures
    ]
    assert checks == [
        "one-at-a-time",
        "last-ready-node",
        "single-replica",
        "recovery",
        "vm-state",
        "migratable",
    ]


def test_exit_needs_the_node_in_maintenance() -> None:
    assert check_exit(cluster(admin={"n1": in_state(MaintenanceState.MAINTENANCE)}), "n1") == ""
    assert check_exit(cluster(), "n1") == "node n1 is not in maintenance (it is in_use)"
    entering = cluster(admin={"n1": in_state(MaintenanceState.ENTERING)})
    assert "still entering" in check_exit(entering, "n1")


def test_no_new_vm_is_placed_on_a_node_not_in_use_and_the_refusal_names_its_state() -> None:
    for state in (MaintenanceState.ENTERING, MaintenanceState.MAINTENANCE):
        view = cluster(admin={"n1": in_state(state)}, nodes={"n1": 8192, "n2": 1024})
        spec = vm("new").spec
        views = node_views(view)
        assert choose_node(spec, views).name == "n2"
        pinned = spec.model_copy(update={"node": "n1"})
        with pytest.raises(NoCapacity, match=rf"n1: in maintenance mode \({state.value}\)"):
            choose_node(pinned, views)


# ---- the API -------------------------------------------------------------------------------
@pytest.fixture
async def api(
    store: MemoryStore, images_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    token = await admin_token(store)
    for n in ("n1", "n2", "n3"):
        await add_node(store, n)
    app = create_app(
        VMService(store, images_dir),
        NodeContext("n1", "http://127.0.9.1:8700", tmp_path / "run", lambda vm: None),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client, {"authorization": f"Bearer {token}"}


async def put_vm(store: MemoryStore, e: VMEntry) -> None:
    name = e.spec.name
    await store.put(keys.vm_spec(name), e.spec.dump())
    assert e.placement is not None and e.status is not None
    await store.put(keys.vm_placement(name), e.placement.dump())
    await store.put(keys.vm_status(name), e.status.dump())


API = tuple[httpx.AsyncClient, dict[str, str]]


async def test_entering_records_the_request_and_the_node_list_shows_it(
    api: API, store: MemoryStore
) -> None:
    client, auth = api
    await put_vm(store, vm("web"))
    r = await client.post("/v1/nodes/n1/maintenance/enter", headers=auth)
    assert r.status_code == 202
    op = r.json()["operation"]
    assert (op["kind"], op["target"], op["state"]) == ("node.maintenance", "n1", "running")
    assert op["message"] == "entering maintenance: 1 VMs to move or power off"
    nodes = {n["name"]: n for n in (await client.get("/v1/nodes", headers=auth)).json()}
    assert nodes["n1"]["maintenance"] == "entering_maintenance"
    assert nodes["n1"]["maintenance_op"] == op["id"]
    assert nodes["n2"]["maintenance"] == "in_use"
    admin = NodeAdmin.load((await store.get(keys.node_admin("n1"))).value)  # type: ignore[union-attr]
    assert not admin.shutdown_unmigratable and admin.maintenance_since > 0
    events = (await client.get("/v1/nodes/n1/events", headers=auth)).json()
    assert events[0]["sentence"] == f"entering maintenance as {op['id']}"


async def test_entering_a_second_node_is_refused_and_changes_nothing(
    api: API, store: MemoryStore
) -> None:
    client, auth = api
    assert (await client.post("/v1/nodes/n1/maintenance/enter", headers=auth)).status_code == 202
    before = await dump_store(store)
    r = await client.post("/v1/nodes/n2/maintenance/enter", headers=auth)
    assert r.status_code == 409 and r.json()["error"] == "invalid_state"
    assert r.json()["checks"] == [
        {
            "check": "one-at-a-time",
            "reason": "node n1 is entering_maintenance: one node of a cluster at a time",
        }
    ]
    assert await dump_store(store) == before


async def test_entering_the_last_ready_node_is_refused(api: API, store: MemoryStore) -> None:
    client, auth = api
    await store.delete(keys.alive("n2"))
    await store.delete(keys.alive("n3"))
    before = await dump_store(store)
    r = await client.post("/v1/nodes/n1/maintenance/enter", headers=auth)
    assert r.status_code == 409
    assert [c["check"] for c in r.json()["checks"]] == ["last-ready-node"]
    assert await dump_store(store) == before


async def test_failing_pre_checks_are_each_listed_and_nothing_changes(
    api: API, store: MemoryStore
) -> None:
    client, auth = api
    await put_vm(store, vm("paused", state=VMState.PAUSED, power=Power.PAUSED))
    await put_vm(store, vm("pinned", pin="n1"))
    await store.put(
        keys.abs_extent("ext-1"), ExtentRecord(id="ext-1", size=1, replicas=["n1"]).dump()
    )
    before = await dump_store(store)
    r = await client.post(
        "/v1/nodes/n1/maintenance/enter", json={"shutdown_unmigratable": False}, headers=auth
    )
    assert r.status_code == 409
    body = r.json()
    assert [c["check"] for c in body["checks"]] == ["single-replica", "vm-state", "migratable"]
    assert body["message"].startswith("node n1 cannot enter maintenance: 3 pre-checks failed: ")
    assert "VM paused is suspended" in body["message"]
    assert await dump_store(store) == before
    # powering off what cannot move lifts the pinned VM's check only
    r = await client.post(
        "/v1/nodes/n1/maintenance/enter", json={"shutdown_unmigratable": True}, headers=auth
    )
    assert [c["check"] for c in r.json()["checks"]] == ["single-replica", "vm-state"]


async def test_exiting_needs_the_node_in_maintenance(api: API, store: MemoryStore) -> None:
    client, auth = api
    before = await dump_store(store)
    r = await client.post("/v1/nodes/n1/maintenance/exit", headers=auth)
    assert r.status_code == 409 and r.json()["state"] == "in_use"
    assert r.json()["message"] == "node n1 is not in maintenance (it is in_use)"
    assert await dump_store(store) == before
    admin = NodeAdmin(maintenance=MaintenanceState.MAINTENANCE, maintenance_since=3)
    await store.put(keys.node_admin("n1"), admin.dump())
    r = await client.post("/v1/nodes/n1/maintenance/exit", json={"restore_vms": True}, headers=auth)
    assert r.status_code == 202 and r.json()["operation"]["message"].startswith("exiting")
    got = NodeAdmin.load((await store.get(keys.node_admin("n1"))).value)  # type: ignore[union-attr]
    assert got.maintenance is MaintenanceState.EXITING and got.restore_vms
    r = await client.post("/v1/nodes/n1/maintenance/exit", headers=auth)
    assert r.status_code == 409  # exiting already


async def test_an_unknown_node_is_404_and_a_bad_body_422_and_nothing_changes(
    api: API, store: MemoryStore
) -> None:
    client, auth = api
    before = await dump_store(store)
    for path in ("/v1/nodes/nope/maintenance/enter", "/v1/nodes/nope/maintenance/exit"):
        r = await client.post(path, headers=auth)
        assert r.status_code == 404 and r.json()["error"] == "not_found"
    for body in ({"shutdown_unmigratable": "yes"}, {"colour": "red"}):
        r = await client.post("/v1/nodes/n1/maintenance/enter", json=body, headers=auth)
        assert r.status_code == 422, body
    r = await client.post("/v1/nodes/n1/maintenance/exit", json={"restore": True}, headers=auth)
    assert r.status_code == 422
    assert await dump_store(store) == before


async def test_cordoning_keeps_the_maintenance_fields(api: API, store: MemoryStore) -> None:
    client, auth = api
    assert (await client.post("/v1/nodes/n1/maintenance/enter", headers=auth)).status_code == 202
    r = await client.post("/v1/nodes/n1/cordon", json={"reason": "disk"}, headers=auth)
    assert r.json()["cordoned"] and r.json()["maintenance"] == "entering_maintenance"
