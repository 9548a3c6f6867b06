"""Every plane of a 3-node lab is authenticated (issue 11 §1), renewable, and etcd's leader
elections are not the user's errors (§4).

What the outside probe found: etcd answered without credentials (the API token's hash was
read with ``etcdctl get /aecp/cluster``); the NBD port served a running VM's boot disk to
anyone; ``aecp volume export`` right after the etcd leader's node was killed answered
``etcdserver: leader changed``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509

from aecp.common.pki import ClusterCA
from tests.labkit import LabKit, running_lab, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
SUBNET = "127.0.102"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    root: Path = tmp_path_factory.mktemp("planes") / "lab"
    async with running_lab(root, subnet=SUBNET, extent_mib=4) as k:
        yield k


async def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def aecp(kit: LabKit, *args: str) -> tuple[int, str]:
    """The CLI, as a user of this lab runs it."""
    env = {"AECP_LAB_DIR": str(kit.lab.root)}
    return await run(sys.executable, "-m", "aecp", *args, env=env)


def etcdctl(endpoint: str, *tls: str) -> list[str]:
    return ["etcdctl", f"--endpoints={endpoint}", "--command-timeout=5s", *tls]


async def test_etcd_refuses_a_client_without_a_certificate_of_the_cluster(
    kit: LabKit, tmp_path: Path
) -> None:
    https = f"https://{SUBNET}.1:2379"
    admin = kit.lab.ca.client_bundle("admin")
    other = ClusterCA.create(tmp_path / "other", "other").issue_client("admin")
    attempts = {
        "no certificate": etcdctl(https, "--insecure-skip-tls-verify"),
        "plain http": etcdctl(f"http://{SUBNET}.1:2379"),
        "another cluster's": etcdctl(
            https, "--insecure-skip-tls-verify", f"--cert={other.cert_file}",
            f"--key={other.key_file}",
        ),
    }  # fmt: skip
    for what, argv in attempts.items():
        code, out = await run(*argv, "get", "/aecp/cluster")
        assert code != 0 and "token_sha256" not in out, what
    allowed = etcdctl(
        https, f"--cacert={admin.ca_file}", f"--cert={admin.cert_file}", f"--key={admin.key_file}"
    )
    code, out = await run(*allowed, "get", "/aecp/cluster")
    assert code == 0 and "token_sha256" in out


async def test_the_nbd_port_serves_no_volume_without_tls_not_even_a_vms_boot_disk(
    kit: LabKit,
) -> None:
    await kit.create_vm("guarded", node="node1", memory_mib=128)
    plain = f"nbd://{SUBNET}.1:10809"
    code, out = await run("nbdinfo", "--list", plain)
    assert code != 0 and "guarded-boot" not in out
    code, out = await run(
        "qemu-io", "-r", "-f", "raw", "-c", "read -v 0 32", plain + "/guarded-boot"
    )
    assert code != 0 and "read 32/32" not in out
    code, out = await run(
        "qemu-io", "-r", "-f", "raw", "-c", "read 0 32", kit.nbd_uri("guarded-boot")
    )
    assert code == 0 and "read 32/32" in out  # the node's own socket (root only) serves it
    sock = kit.lab.node_settings("node1").nbd_socket
    assert sock.stat().st_mode & 0o777 == 0o600 and sock.parent.stat().st_mode & 0o777 == 0o700


async def test_an_export_opens_its_volume_only_until_it_is_unexported(
    kit: LabKit, tmp_path: Path
) -> None:
    for name in ("shared", "private"):
        r = await kit.call("POST", "/v1/volumes", json={"name": name, "size": "16M"})
        assert r.status_code == 201, r.text
    creds = tmp_path / "creds"
    code, out = await aecp(kit, "volume", "export", "shared", "--dir", str(creds), "-o", "json")
    assert code == 0, out
    grant: dict[str, Any] = json.loads(out)
    assert sorted(p.name for p in creds.iterdir()) == [
        "ca-cert.pem", "client-cert.pem", "client-key.pem",
    ]  # fmt: skip
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in creds.iterdir())
    code, out = await run("nbdinfo", "--list", grant["libnbd_uri"].replace("/shared?", "/?"))
    assert code == 0 and 'export="shared"' in out and "private" not in out
    qemu = grant["qemu_args"].split()
    code, out = await run("qemu-io", *qemu, "-c", "write -P 7 0 1M", "-c", "read -P 7 0 1M")
    assert code == 0 and "verification failed" not in out.lower(), out
    private = [*qemu[:-1], qemu[-1].replace("export=shared", "export=private")]
    code, out = await run("qemu-io", *private, "-c", "read 0 512")
    assert code != 0 and "unknown export" in out

    code, out = await aecp(kit, "volume", "unexport", "shared")
    assert code == 0, out
    code, out = await run("nbdinfo", grant["libnbd_uri"])
    assert code != 0
    assert (await kit.call("GET", "/v1/volumes/shared/export")).status_code == 404


def served_serial(host: str, port: int, kit: LabKit) -> int:
    """The serial of the certificate the TLS server at host:port presents."""
    admin = kit.lab.ca.client_bundle("admin")
    ctx = ssl.create_default_context(cafile=admin.ca_file)
    ctx.load_cert_chain(admin.cert_file, admin.key_file)
    ctx.check_hostname = False
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_rotated_certificates_are_served_and_the_cluster_keeps_working(
    kit: LabKit,
) -> None:
    node1 = kit.lab.ca.node_bundle("node1")
    before = node1.load().cert.serial_number
    code, out = await aecp(kit, "cluster", "rotate-certs", "-o", "json")
    assert code == 0, out
    assert {row["name"] for row in json.loads(out)} == {"node1", "node2", "node3", "admin"}
    after = node1.load().cert.serial_number
    assert after != before
    assert served_serial(f"{SUBNET}.1", 2379, kit) == after  # etcd: its next connection

    kit.lab.kill_storage("node2")  # replica connections are made again, with new credentials
    kit.lab.start_storage("node2")
    await kit.lab.wait_ready()
    r = await kit.call("POST", "/v1/volumes", json={"name": "renewed", "size": "16M"})
    assert r.status_code == 201, r.text
    code, out = await run(
        "qemu-io", "-f", "raw", "-c", "write -P 9 0 8M", "-c", "read -P 9 0 8M",
        kit.nbd_uri("renewed", "node2"),
    )  # fmt: skip
    assert code == 0 and "verification failed" not in out.lower(), out

    async def switched() -> bool:  # the agent's etcd client, on a store call after the check
        return "TLS credentials changed" in kit.lab.agent("node1").log_file.read_text()

    await wait_for(switched, "node1's agent to switch its etcd client to the new credentials", 30)


async def etcd_leader(kit: LabKit, ask: list[str]) -> str:
    """The node whose etcd member leads the cluster, as the members of ``ask`` see it."""
    admin = kit.lab.ca.client_bundle("admin")
    members = [m for n in ask if (m := kit.lab.etcd_member(n)) is not None]
    endpoints = ",".join(f"https://{m.client_address}" for m in members)
    code, out = await run(
        *etcdctl(endpoints, f"--cacert={admin.ca_file}", f"--cert={admin.cert_file}",
                 f"--key={admin.key_file}"),
        "endpoint", "status", "-w", "json",
    )  # fmt: skip
    assert code == 0, out
    for status in json.loads(out):  # "leader" is left out while it is 0 (no leader yet)
        if status["Status"]["header"]["member_id"] == status["Status"].get("leader"):
            host = status["Endpoint"].removeprefix("https://").split(":")[0]
            return f"node{host.rsplit('.', 1)[1]}"
    raise AssertionError(f"no leader among {ask}: {out}")


async def test_killing_the_etcd_leaders_node_fails_no_api_call(kit: LabKit) -> None:
    """Leader elections are retried inside the store adapter: a loop of reads and writes
    through another node's API sees none of them."""
    leader = await etcd_leader(kit, kit.lab.node_names)
    others = [n for n in kit.lab.node_names if n != leader]
    via = others[0]
    failures: list[str] = []
    slowest = 0.0
    done = asyncio.Event()

    async def client_loop() -> int:
        nonlocal slowest
        rounds = 0
        while not done.is_set() or rounds < 30:
            name = f"loop-{rounds}"
            for method, path, body in (
                ("POST", "/v1/volumes", {"name": name, "size": "1M"}),
                ("GET", f"/v1/volumes/{name}", None),
                ("GET", "/v1/nodes", None),
                ("DELETE", f"/v1/volumes/{name}", None),
            ):
                started = time.monotonic()
                r = await kit.call(method, path, node=via, json=body)
                slowest = max(slowest, time.monotonic() - started)
                if r.status_code >= 400:
                    failures.append(f"{method} {path}: {r.status_code} {r.text[:200]}")
            rounds += 1
        return rounds

    loop = asyncio.create_task(client_loop())
    await asyncio.sleep(0)
    kit.lab.kill_node(leader)

    async def new_leader() -> bool:
        try:
            return await etcd_leader(kit, others) != leader
        except AssertionError:
            return False

    await wait_for(new_leader, "a new etcd leader")
    done.set()
    rounds = await loop
    print(f"{rounds} rounds through {via}; slowest call {slowest:.2f} s")
    assert failures == []
    kit.lab.start_node(leader)
    await kit.lab.wait_ready()
