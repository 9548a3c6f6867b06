"""Issue 11 §2-§3 on a real one-node lab: a VM never takes over a volume by its name, names
derived from a VM name always fit, a failed VM can be deleted and takes its files with it,
power requests sent one after another all end, and a VM started by an older agent keeps its
console."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from aecp.compute.images.tiny import BOOT_MARKER
from aecp.compute.qemu.argv import RuntimePaths
from aecp.model.image import ImageRecord
from aecp.store import keys
from aecp.store.typed import read
from tests.labkit import LabKit, console_command, running_lab, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
PROMPT = "aecp:/# "


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    root: Path = tmp_path_factory.mktemp("vmops") / "lab"
    async with running_lab(root, subnet="127.0.91", nodes=1) as k:
        yield k


async def qemu_io(uri: str, command: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", "-c", command, uri,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    return out.decode()


async def at_prompt(kit: LabKit, name: str) -> None:
    async def ready() -> bool:
        log = await kit.console(name)
        marker = f"{BOOT_MARKER} name={name}"
        return marker in log and PROMPT in log.rsplit(marker, 1)[1]

    await wait_for(ready, f"{name} at its prompt", timeout=120)


def run_dir(kit: LabKit, vm: str) -> Path:
    return kit.lab.node_settings("node1").run_dir / vm


async def test_a_vm_named_after_a_volume_does_not_take_it_over(kit: LabKit) -> None:
    """The issue's repro: volume x-boot with a pattern; creating VM x is refused naming it,
    and the volume keeps its data."""
    r = await kit.call("POST", "/v1/volumes", json={"name": "x-boot", "size": "64M"})
    assert r.status_code == 201, r.text
    uri = kit.nbd_uri("x-boot")
    await qemu_io(uri, "write -P 0x5a 0 1M")
    before = await kit.store_dump()

    r = await kit.call("POST", "/v1/vms", json={"name": "x", "image": "tiny", "start": False})

    assert r.status_code == 409, r.text
    assert r.json()["volume"] == "x-boot" and "x-boot" in r.json()["message"]
    assert await kit.store_dump() == before
    assert (await kit.call("GET", "/v1/volumes/x-boot")).json()["owner"] is None
    assert "read 1048576/1048576" in await qemu_io(uri, "read -P 0x5a 0 1M")


async def test_a_63_character_vm_name_is_refused_with_the_rule(kit: LabKit) -> None:
    before = await kit.store_dump()
    r = await kit.call("POST", "/v1/vms", json={"name": "a" * 63, "image": "tiny"})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "name" and "at most 57 characters" in r.json()["message"]
    assert await kit.store_dump() == before


async def test_a_vm_with_the_longest_name_runs_owns_its_disk_and_leaves_nothing_behind(
    kit: LabKit,
) -> None:
    name = "l" * 57
    op = await kit.create_vm(name)
    assert op["state"] == "succeeded", op
    await at_prompt(kit, name)
    vol = (await kit.call("GET", f"/v1/volumes/{name}-boot")).json()
    assert vol["owner"]["kind"] == "vm" and vol["owner"]["name"] == name
    r = await kit.call("DELETE", f"/v1/volumes/{name}-boot")
    assert r.status_code == 409 and "delete the vm instead" in r.json()["message"], r.text
    assert (run_dir(kit, name) / "console.log").exists()

    assert (await kit.action(name, "poweroff"))["state"] == "succeeded"
    r = await kit.call("DELETE", f"/v1/vms/{name}")
    assert r.status_code == 202, r.text
    assert (await kit.wait_op(r.json()["operation"]["id"]))["state"] == "succeeded"

    assert not run_dir(kit, name).exists()
    assert (await kit.call("GET", f"/v1/volumes/{name}-boot")).status_code == 404


async def test_power_requests_sent_one_after_another_all_end_in_the_last_ones_state(
    kit: LabKit,
) -> None:
    """The probe: shutdown, start, shutdown, poweroff, start, poweroff, sent back to back to a
    running VM; 4 of 6 never finished before."""
    assert (await kit.create_vm("probe"))["state"] == "succeeded"
    await at_prompt(kit, "probe")
    accepted: list[str] = []
    for action in ("shutdown", "start", "shutdown", "poweroff", "start", "poweroff"):
        r = await kit.call("POST", f"/v1/vms/probe/actions/{action}")
        assert r.status_code in (202, 409), r.text
        if r.status_code == 202:
            accepted.append(r.json()["operation"]["id"])
    ops = [await kit.wait_op(op_id) for op_id in accepted]
    assert ops[-1]["state"] == "succeeded", ops[-1]
    for op in ops[:-1]:
        assert op["state"] in ("succeeded", "cancelled"), op
        if op["state"] == "cancelled":
            assert op["error"] == f"superseded by {op['superseded_by']}"
    assert (await kit.wait_vm("probe", "stopped"))["last_operation"] == accepted[-1]
    everything: list[dict[str, Any]] = (await kit.call("GET", "/v1/operations")).json()
    assert [o for o in everything if o["state"] == "running"] == []


async def image_file(kit: LabKit, name: str) -> Path:
    """Where the lab keeps image ``name`` (the cluster's record: the API does not say)."""
    store = kit.etcd()
    try:
        got = await read(store, keys.image(name), ImageRecord)
    finally:
        await store.close()
    assert got is not None
    return kit.lab.images_dir / got[0].file


async def test_a_vm_whose_start_failed_shows_error_and_can_be_deleted(kit: LabKit) -> None:
    op = await kit.create_vm("broken", start=False)
    assert op["state"] == "succeeded", op
    image = await image_file(kit, "tiny")
    aside = image.with_suffix(".aside")
    image.rename(aside)  # the start fails, and so does every retry, until it is back
    try:
        r = await kit.call("POST", "/v1/vms/broken/actions/start")
        assert r.status_code == 202, r.text
        start = r.json()["operation"]["id"]
        vm = await kit.wait_vm("broken", "error")
        assert "missing" in vm["message"]
        retrying = (await kit.call("GET", f"/v1/operations/{start}")).json()
        assert retrying["state"] == "running", retrying  # retried: not failed yet
        assert retrying["message"].startswith("retrying: image tiny is missing"), retrying

        r = await kit.call("DELETE", "/v1/vms/broken")  # its desired power is running

        assert r.status_code == 202, r.text
        assert (await kit.wait_op(r.json()["operation"]["id"]))["state"] == "succeeded"
    finally:
        aside.rename(image)
    assert (await kit.wait_op(start))["state"] == "cancelled"
    assert (await kit.call("GET", "/v1/vms/broken")).status_code == 404
    assert not run_dir(kit, "broken").exists()


async def test_a_start_that_fails_until_its_cause_is_gone_ends_as_succeeded(kit: LabKit) -> None:
    """Review finding: the start's operation failed at the first failure, the agent went on
    retrying, the VM ran, and the operation stayed failed."""
    assert (await kit.create_vm("later", start=False))["state"] == "succeeded"
    image = await image_file(kit, "tiny")
    aside = image.with_suffix(".aside")
    image.rename(aside)
    try:
        r = await kit.call("POST", "/v1/vms/later/actions/start")
        assert r.status_code == 202, r.text
        start = r.json()["operation"]["id"]
        await kit.wait_vm("later", "error")
    finally:
        aside.rename(image)
    assert (await kit.wait_op(start))["state"] == "succeeded"
    assert (await kit.vm("later"))["state"] == "running"
    await at_prompt(kit, "later")
    assert (await kit.action("later", "poweroff"))["state"] == "succeeded"


async def test_the_console_of_a_vm_whose_qemu_has_the_old_socket_layout_answers(
    kit: LabKit,
) -> None:
    """Review finding: the console route always connected to the new socket path; a VM whose
    QEMU keeps its sockets in run_dir/<vm>/ (started by an agent from before they moved) had
    no console once a newer agent re-attached to it. Here the QEMU's sockets are moved to
    the old layout while no agent runs (a listening socket keeps answering on its new name)."""
    assert (await kit.create_vm("oldcon"))["state"] == "succeeded"
    await at_prompt(kit, "oldcon")
    pid = (await kit.vm("oldcon"))["pid"]
    run = kit.lab.node_settings("node1").run_dir
    new = RuntimePaths.for_instance(run, "oldcon")
    old = RuntimePaths.before_sockets_moved(run, "oldcon")
    kit.lab.kill_agent("node1")
    new.qmp_socket.rename(old.qmp_socket)
    new.console_socket.rename(old.console_socket)
    kit.lab.start_agent("node1")
    await kit.lab.wait_ready()
    vm = await kit.wait_vm("oldcon", "running")
    assert vm["pid"] == pid  # the same QEMU, re-attached

    await console_command(kit, "oldcon", "echo console-$((6*7))", "console-42")

    assert (await kit.action("oldcon", "poweroff"))["state"] == "succeeded"
    assert not old.console_socket.exists()
