"""Every bad input to the real cluster API (one-node lab, real etcd and QEMU) gets a 4xx naming
the field or the state, and changes nothing that was stored."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.integration.test_vm_naming_ops import image_file
from tests.labkit import LabKit, running_lab

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    root: Path = tmp_path_factory.mktemp("badinput") / "lab"
    async with running_lab(root, subnet="127.0.62", nodes=1) as k:
        await k.create_vm("running1")
        yield k


async def refused(kit: LabKit, method: str, path: str, status: int, **kw: Any) -> dict[str, Any]:
    before = await kit.store_dump()
    r = await kit.call(method, path, **kw)
    assert r.status_code == status, r.text
    assert await kit.store_dump() == before, "a refused request must change nothing"
    body: dict[str, Any] = r.json()
    return body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"memory_mib": 0}, "memory_mib"),
        ({"memory_mib": -256}, "memory_mib"),
        ({"vcpus": 4096}, "vcpus"),
        ({"vcpus": 0}, "vcpus"),
        ({"image": "no-such-image"}, "image"),
        ({"node": "node9"}, "node"),
        ({"name": "Bad Name!"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"memory_mib": "lots"}, "memory_mib"),
    ],
)
async def test_a_bad_create_names_the_field(kit: LabKit, body: dict[str, Any], field: str) -> None:
    req = {"name": "newvm", "image": "tiny", **body}
    err = await refused(kit, "POST", "/v1/vms", 422, json=req)
    assert err["field"] == field


async def test_a_duplicate_name_is_a_conflict(kit: LabKit) -> None:
    err = await refused(kit, "POST", "/v1/vms", 409, json={"name": "running1", "image": "tiny"})
    assert err["error"] == "already_exists" and err["field"] == "name"


async def test_more_memory_than_is_free_is_refused_with_the_reason(kit: LabKit) -> None:
    err = await refused(
        kit, "POST", "/v1/vms", 409, json={"name": "huge", "image": "tiny", "memory_mib": 2000}
    )
    assert err["error"] == "no_capacity" and "MiB free" in err["message"]


@pytest.mark.parametrize(
    ("action", "word"), [("resume", "not suspended"), ("start", "not stopped")]
)
async def test_a_power_operation_invalid_in_the_current_state_is_refused(
    kit: LabKit, action: str, word: str
) -> None:
    err = await refused(kit, "POST", f"/v1/vms/running1/actions/{action}", 409)
    assert err["error"] == "invalid_state" and err["state"] == "running" and word in err["message"]


async def test_deleting_a_running_vm_is_refused(kit: LabKit) -> None:
    err = await refused(kit, "DELETE", "/v1/vms/running1", 409)
    assert "power it off" in err["message"]


async def test_an_unknown_vm_is_404(kit: LabKit) -> None:
    await refused(kit, "POST", "/v1/vms/ghost/actions/start", 404)


async def test_a_corrupt_upload_is_refused_and_leaves_no_file(kit: LabKit) -> None:
    junk = b"QFI\xfb" + b"\x00\x00\x00\x03" + b"\xff" * 4088
    err = await refused(kit, "PUT", "/v1/images/junk", 422, content=junk)
    assert err["error"] == "image_error"
    assert not any("junk" in p.name for p in kit.lab.images_dir.iterdir())
    await refused(kit, "PUT", "/v1/images/empty", 422, content=b"")
    await refused(kit, "PUT", "/v1/images/tiny", 409, content=b"\0" * 512)


async def test_a_corrupted_image_file_fails_at_create_time(kit: LabKit) -> None:
    src = await image_file(kit, "tiny")
    r = await kit.call("PUT", "/v1/images/tiny2", content=src.read_bytes())
    assert r.status_code == 201, r.text
    with (await image_file(kit, "tiny2")).open("r+b") as f:
        f.seek(4096)
        f.write(b"corrupted!")
    err = await refused(kit, "POST", "/v1/vms", 422, json={"name": "c1", "image": "tiny2"})
    assert err["error"] == "image_error" and "corrupt" in err["message"]


async def test_a_corrupt_upload_error_names_no_server_path(kit: LabKit) -> None:
    junk = b"QFI\xfb" + b"\x00\x00\x00\x03" + b"\xff" * 4088
    err = await refused(kit, "PUT", "/v1/images/junk2", 422, content=junk)
    assert err["error"] == "image_error" and "Could not open" in err["message"]
    assert str(kit.lab.images_dir) not in str(err) and str(kit.lab.root) not in str(err)
    assert not re.search(r"(?<![\w:])/\w+/", str(err)), err


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "vol1", "size": True}, "size"),
        ({"name": "vol1", "size": 1e9}, "size"),
        ({"name": "vol1", "size": "1G", "replicas": 1.0}, "replicas"),
    ],
)
async def test_a_volume_size_of_true_or_1e9_is_refused_not_coerced(
    kit: LabKit, body: dict[str, Any], field: str
) -> None:
    err = await refused(kit, "POST", "/v1/volumes", 422, json=body)
    assert err["error"] == "invalid_input" and err["field"] == field


@pytest.mark.parametrize(("field", "value"), [("vcpus", True), ("memory_mib", 256.0)])
async def test_vm_create_refuses_a_boolean_or_float_for_an_integer(
    kit: LabKit, field: str, value: object
) -> None:
    err = await refused(kit, "POST", "/v1/vms", 422, json={"name": "v9", field: value})
    assert err["field"] == field


async def test_creating_a_vm_from_a_template_that_does_not_exist_is_404(kit: LabKit) -> None:
    err = await refused(kit, "POST", "/v1/vms", 404, json={"name": "v9", "template": "nope"})
    assert err["error"] == "not_found" and err["template"] == "nope"


async def test_an_unauthenticated_malformed_body_gets_401_not_422(kit: LabKit) -> None:
    bad = {
        "content": b"{nope",
        "headers": {"authorization": "", "content-type": "application/json"},
    }
    for method, path in (("POST", "/v1/vms"), ("POST", "/v1/volumes"), ("PUT", "/v1/images/x")):
        err = await refused(kit, method, path, 401, **bad)
        assert err["error"] == "unauthorized"


@pytest.mark.parametrize(
    ("method", "path", "kw", "status", "code"),
    [
        ("POST", "/v1/vms", {"content": b"{nope"}, 400, "bad_request"),
        ("POST", "/v1/vms", {"content": b'{"name": "\xff"}'}, 400, "bad_request"),
        ("GET", "/v1/nowhere", {}, 404, "not_found"),
        ("PATCH", "/v1/vms/running1", {}, 405, "method_not_allowed"),
        ("POST", "/v1/vms", {"content": b" " * (2 << 20)}, 413, "too_large"),
    ],
)
async def test_http_level_errors_have_the_one_error_shape(
    kit: LabKit, method: str, path: str, kw: dict[str, Any], status: int, code: str
) -> None:
    err = await refused(
        kit, method, path, status, headers={"content-type": "application/json"}, **kw
    )
    assert err["error"] == code and err["message"]
