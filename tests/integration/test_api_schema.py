"""schemathesis over the real cluster API of a one-node lab (real etcd, ABS and QEMU): every
operation of the OpenAPI document gets a bounded number of generated requests, conforming to the
document and not. No answer may be a 5xx or a status the document does not declare, and every
answer must match the document (status, content type, schema); a request that breaks the
document must be refused, and a route that needs the token must refuse a request without it.

Destructive operations (DELETE, power actions, resize, rollback, snapshot, clone, convert) only
act on objects this test made: in conforming requests their name parameters are drawn from the
objects below (or a name no object has), never generated; in requests that break the document
they are generated, so they name nothing or an object a generated request made. A conforming VM
create or clone is sent with ``start: false``, so no generated request starts a QEMU: the only
QEMUs are those of the two VMs this test made, should a generated power action start them.
``AECP_SCHEMA_EXAMPLES`` sets the examples per operation and mode; ``AECP_SCHEMA_RANDOM=1``
draws new ones (the default is the same every run).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import pytest_asyncio
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.labkit import LabKit, console_command, running_lab

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# examples per operation and per mode (conforming, not conforming); ~35 operations
EXAMPLES = int(os.environ.get("AECP_SCHEMA_EXAMPLES", "20"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]
MISSING = "st-missing"  # a name no object has
# the objects the test makes, by the kind of object a path parameter names
POOLS = {
    "vm": ["st-vm", "st-stopped", MISSING],
    "vmsnap": ["st-vmsnap", MISSING],
    "volume": ["st-vol", MISSING],
    "volsnap": ["st-snap", MISSING],
    "image": ["st-img", MISSING],
    "template": [MISSING],
    "node": ["node1", MISSING],
    "principal": ["st-ops", MISSING],  # never the admin the test calls as
    "network": ["st-net", MISSING],
}
PROMPT = "aecp:/# "


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    root: Path = tmp_path_factory.mktemp("apischema") / "lab"
    async with running_lab(root, subnet="127.0.71", nodes=1) as k:
        await _make_objects(k)
        yield k


async def _make_objects(kit: LabKit) -> None:
    assert (await kit.create_vm("st-vm"))["state"] == "succeeded"
    assert (await kit.create_vm("st-stopped", start=False))["state"] == "succeeded"
    made = [
        ("POST", "/v1/vms/st-vm/snapshots", {"json": {"name": "st-vmsnap"}}),
        ("POST", "/v1/volumes", {"json": {"name": "st-vol", "size": "1M"}}),
        ("POST", "/v1/volumes/st-vol/snapshots", {"json": {"name": "st-snap"}}),
        ("PUT", "/v1/images/st-img", {"content": b"\0" * 65536}),
        ("POST", "/v1/tokens", {"json": {"name": "st-ops", "role": "operator"}}),
        (
            "POST",
            "/v1/networks",
            {"json": {"name": "st-net", "vlan": 3999, "subnet": "10.250.0.0/24"}},
        ),
    ]
    for method, path, kw in made:
        r = await kit.call(method, path, **kw)
        assert r.status_code in (201, 202), r.text
        if r.status_code == 202:  # carried out by the VM's node
            assert (await kit.wait_op(r.json()["operation"]["id"]))["state"] == "succeeded"


async def test_the_console_websocket_works_with_the_token_and_refuses_a_caller_without(
    kit: LabKit,
) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    await kit.wait_console("st-vm", PROMPT, timeout=120)
    await console_command(kit, "st-vm", "echo st-$((6*7))", "st-42")
    url = kit.url().replace("http://", "ws://") + "/v1/vms/st-vm/console"
    for headers in ({}, {"authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403


async def test_an_unauthenticated_upload_is_refused_before_its_body_is_stored(
    kit: LabKit,
) -> None:
    before = {p.name for p in kit.lab.images_dir.iterdir()}
    r = await kit.http.put(
        kit.url() + "/v1/images/sneaky", content=b"\0" * 4096, headers={"authorization": ""}
    )
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert {p.name for p in kit.lab.images_dir.iterdir()} == before


async def test_the_cli_still_sends_bodies_the_strict_api_accepts(kit: LabKit) -> None:
    env = {**os.environ, "AECP_API": kit.url(), "AECP_TOKEN": kit.lab.token()}
    commands = [
        ("volume", "create", "cli-vol", "--size", "1M", "--replicas", "1"),
        ("volume", "resize", "cli-vol", "--size", "2M"),
        ("volume", "snapshot", "create", "cli-vol", "s1"),
        ("vm", "create", "cli-vm", "--memory", "128", "--vcpus", "1", "--no-start", "--no-wait"),
        ("vm", "create", "cli-vm2", "--data-disk", "8", "--no-start", "--no-wait"),
        ("vm", "clone", "st-vm", "cli-clone", "--no-start", "--no-wait"),
        ("node", "cordon", "node1", "--reason", "cli check"),
        ("node", "uncordon", "node1"),
        ("node", "events", "node1"),
        ("vm", "events", "cli-vm"),
    ]
    for args in commands:
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "aecp", *args, "--output", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, f"aecp {' '.join(args)}: {proc.stderr}{proc.stdout}"
    assert (await kit.call("GET", "/v1/volumes/cli-vol")).json()["size"] == 2 << 20
    assert (await kit.vm("cli-vm"))["memory_mib"] == 128
    assert (await kit.vm("cli-vm2"))["data_disks_mib"] == [8]
    events = (await kit.call("GET", "/v1/nodes/node1/events")).json()
    assert [e["sentence"] for e in events[:2]] == [
        "uncordoned: VMs may be placed on it again",
        "cordoned: cli check",
    ]


async def next_feed_event(lines: AsyncIterator[str]) -> tuple[str, str, dict[str, Any]]:
    """The next server-sent event (event, id, data) of a stream, skipping comments."""
    fields: dict[str, str] = {}
    async for line in lines:
        if not line:
            if "event" in fields:
                return fields["event"], fields.get("id", ""), json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    raise AssertionError("the stream ended")


async def test_the_change_feed_streams_changes_and_resumes_after_the_last_one(
    kit: LabKit,
) -> None:
    async with kit.http.stream("GET", kit.url() + "/v1/events", timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-aecp-cluster-id"]
        lines = r.aiter_lines()
        event, _, sync = await next_feed_event(lines)
        assert event == "sync"
        made = await kit.call("POST", "/v1/volumes", json={"name": "feed-vol", "size": "1M"})
        assert made.status_code == 201, made.text
        while True:
            event, ident, data = await next_feed_event(lines)
            assert data["revision"] > sync["revision"] and ident.startswith(f"{data['revision']}.")
            if (event, data["name"]) == ("volume", "feed-vol"):
                break
    gone = await kit.call("DELETE", "/v1/volumes/feed-vol")
    assert gone.status_code in (200, 202, 204), gone.text
    # a new stream from the last event handled sees what happened while none was open
    async with kit.http.stream(
        "GET", kit.url() + "/v1/events", params={"since": ident}, timeout=60
    ) as r:
        lines = r.aiter_lines()
        assert (await next_feed_event(lines))[0] == "sync"
        while True:
            event, _, data = await next_feed_event(lines)
            if (event, data["name"], data["change"]) == ("volume", "feed-vol", "deleted"):
                break


@dataclass
class Run:
    """What the generated requests did: counts per operation and status, and the failures."""

    examples: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)


async def test_generated_requests_get_no_5xx_and_no_status_the_document_does_not_declare(
    kit: LabKit,
) -> None:
    schema = schemathesis.openapi.from_url(kit.url() + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    run = Run()
    started = time.monotonic()
    await asyncio.to_thread(_explore_all, operations, kit.url(), kit.lab.token(), run)
    elapsed = time.monotonic() - started
    print(
        f"schemathesis: {len(operations)} operations, {sum(run.examples.values())} examples "
        f"in {elapsed:.0f} s; statuses {dict(sorted(run.statuses.items()))}"
    )
    assert not run.failures, "\n\n".join(f"{k}:\n{v}" for k, v in run.failures.items())
    assert all(run.examples[op.label] > 0 for op in operations), run.examples


def _explore_all(operations: list[Any], base_url: str, token: str, run: Run) -> None:
    """Every operation, conforming cases then not (blocking: run in a thread)."""
    auth = {"Authorization": f"Bearer {token}"}  # as the document names it: probes drop it
    with requests.Session() as session:
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _explore(op, mode, session, base_url, auth, run)


def _explore(
    op: Any,
    mode: GenerationMode,
    session: requests.Session,
    base_url: str,
    auth: dict[str, str],
    run: Run,
) -> None:
    label = f"{op.label} ({mode.value})"

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=os.environ.get("AECP_SCHEMA_RANDOM") != "1",
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=_cases(op, mode))
    def explore(case: Case) -> None:
        run.examples[op.label] += 1
        response = case.call_and_validate(
            base_url=base_url, session=session, headers=auth, checks=CHECKS, timeout=30
        )
        run.statuses[(mode.value, response.status_code)] += 1

    try:
        explore()
    except hypothesis.errors.Unsatisfiable:  # nothing to break: an operation without parameters
        assert mode is GenerationMode.NEGATIVE, label
    except (Exception, BaseExceptionGroup) as exc:  # a failed check: report them all at the end
        run.failures[label] = str(exc)[:3000]


def _cases(op: Any, mode: GenerationMode) -> st.SearchStrategy[Case]:
    """Generated cases; a destructive operation's names come from the test's own objects."""
    generated = op.as_strategy(generation_mode=mode)
    params = [p.name for p in op.path_parameters if p.name in ("name", "snap")]
    if mode is GenerationMode.NEGATIVE or not params:  # a refused name names no object
        cases = generated
    else:
        pools = {p: st.sampled_from(POOLS[_kind(op.path, p)]) for p in params}
        ours = st.fixed_dictionaries(pools).flatmap(
            lambda names: op.as_strategy(generation_mode=mode, path_parameters=names)
        )
        cases = ours if _destructive(op) else st.one_of(generated, ours)
    if mode is GenerationMode.POSITIVE and op.method.upper() == "POST":
        cases = cases.map(_stopped)
    if mode is GenerationMode.POSITIVE and op.path == "/v1/events":
        cases = cases.map(_short_stream)
    return cases


def _short_stream(case: Case) -> Case:
    """The change feed is a stream: a conforming request ends it soon."""
    case.query = {**(case.query or {}), "timeout": 0.05}
    return case


def _destructive(op: Any) -> bool:
    return op.method.upper() in ("DELETE", "POST") and "{name}" in op.path


def _kind(path: str, param: str) -> str:
    """The kind of object ``param`` of ``path`` names, e.g. ``vmsnap`` for ``snap`` under VMs."""
    resource = path.split("/")[2]  # /v1/<resource>/...
    if param == "snap":
        return "vmsnap" if resource == "vms" else "volsnap"
    return {
        "vms": "vm",
        "volumes": "volume",
        "images": "image",
        "templates": "template",
        "nodes": "node",
        "tokens": "principal",
        "networks": "network",
    }[resource]


def _stopped(case: Case) -> Case:
    """A VM a conforming create or clone makes stays stopped: no QEMU from generated data."""
    if isinstance(case.body, dict) and case.operation.path in ("/v1/vms", "/v1/vms/{name}/clone"):
        case.body["start"] = False
    return case
