"""The operation center as a user meets it: ``aecp center run`` as a real process over real
SQLite, driven through the CLI (``aecp login``, data centers, registering a real cluster,
the audit), killed with SIGKILL and started again with everything kept and no second root."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.labkit import LabKit, running_lab, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root: Path = tmp_path_factory.mktemp("center") / "lab"
    async with running_lab(root, subnet="127.0.73", nodes=1) as k:
        yield k


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CenterProcess:
    def __init__(self, data_dir: Path, home: Path) -> None:
        self.data_dir, self.home = data_dir, home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "aecp",
            "center",
            "run",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
        ]
        with (self.data_dir.parent / "center.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, (self.data_dir.parent / "center.log").read_text()
            time.sleep(0.2)
        raise AssertionError("the center did not answer")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    async def until_listed(self, kind: str, name: str) -> None:
        token = json.loads((self.home / "aecp" / "center.json").read_text())["token"]

        async def listed() -> bool:
            async with httpx.AsyncClient(timeout=10) as http:
                r = await http.get(
                    f"{self.url}/v1/inventory/{kind}", headers={"authorization": f"Bearer {token}"}
                )
            return name in [o["name"] for o in r.json()]

        await wait_for(listed, f"{kind} {name} in the center's copy", timeout=60)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "XDG_CONFIG_HOME": str(self.home)}
        done = subprocess.run(
            [sys.executable, "-m", "aecp", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check:
            assert done.returncode == 0, f"aecp {' '.join(args)}: {done.stderr}{done.stdout}"
        return done


@pytest.fixture
def center(tmp_path: Path) -> Iterator[CenterProcess]:
    c = CenterProcess(tmp_path / "aoc", tmp_path / "home")
    c.start()
    try:
        yield c
    finally:
        c.kill()


async def test_a_cluster_is_registered_through_the_cli_and_survives_a_kill(
    kit: LabKit, center: CenterProcess
) -> None:
    password_file = center.data_dir / "root-password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    center.cli("login", center.url, "--password-file", str(password_file))
    session = center.home / "aecp" / "center.json"
    assert stat.S_IMODE(session.stat().st_mode) == 0o600
    center.cli("center", "datacenter", "add", "dc1")
    wrong = center.cli(
        "center",
        "cluster",
        "add",
        "c2",
        "--endpoint",
        kit.url(),
        "--token-file",
        str(password_file),
        "--datacenter",
        "dc1",
        check=False,
    )
    assert wrong.returncode == 1 and "token" in wrong.stderr
    center.cli(
        "center",
        "cluster",
        "add",
        "c1",
        "--endpoint",
        kit.url(),
        "--token-file",
        str(kit.lab.token_file),
        "--datacenter",
        "dc1",
    )
    listed = json.loads(center.cli("center", "cluster", "list", "--output", "json").stdout)
    assert [(c["name"], c["datacenter"], c["endpoint"]) for c in listed] == [
        ("c1", "dc1", kit.url())
    ]
    # the center keeps a copy of the cluster, current from its change feed
    await center.until_listed("node", "node1")
    r = await kit.call("POST", "/v1/vms", json={"name": "seen", "image": "tiny", "start": False})
    assert r.status_code == 202, r.text
    await center.until_listed("vm", "seen")

    center.kill()  # kill -9, then a restart: everything kept, no second root
    first_password = password_file.read_text()
    center.start()
    assert password_file.read_text() == first_password
    listed = json.loads(center.cli("center", "cluster", "list", "--output", "json").stdout)
    assert [c["name"] for c in listed] == ["c1"]
    audit = json.loads(center.cli("center", "audit", "--output", "json").stdout)
    actions = [(a["action"], a["result"].split(":")[0]) for a in audit][::-1]
    assert actions == [
        ("session.login", "ok"),
        ("datacenter.create", "ok"),
        ("cluster.register", "invalid_input"),
        ("cluster.register", "ok"),
    ]
    center.cli("logout")
    assert not session.exists()
