"""The multi-cluster lab as ``make run`` starts it, made small: ``aecp lab up --clusters 2``
with one node each brings up the operation center and two clusters, registers them in data
centers dc1 and dc2, logs the CLI in to the center; the center reads both; ``aecp lab down``
stops every process it started and forgets the session."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aecp.common.proc import pid_alive
from aecp.lab.harness import Lab

pytestmark = pytest.mark.integration

SUBNET = "127.0.76"  # c1 on 127.0.76.1, c2 on 127.0.77.1
CENTER = "127.0.76.200"


class Cli:
    def __init__(self, root: Path, home: Path) -> None:
        self.root, self.home = root, home
        self.env = {
            **os.environ,
            "AECP_LAB_DIR": str(root),
            "XDG_CONFIG_HOME": str(home),
            "COLUMNS": "200",
        }
        for var in ("AECP_API", "AECP_TOKEN", "AECP_TOKEN_FILE"):
            self.env.pop(var, None)

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "aecp", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
        if ok:
            assert done.returncode == 0, f"aecp {' '.join(args)}: {done.stderr}{done.stdout}"
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--output", "json").stdout)


@pytest.fixture
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    base = tmp_path_factory.mktemp("site")  # short: the nodes' Unix sockets live under it
    c = Cli(base / "lab", base / "home")
    try:
        yield c
    finally:
        if (c.root / "site.json").exists():
            for log in c.root.rglob("*.log"):  # kept for failure analysis
                rel = str(log.relative_to(c.root)).replace("/", "_")
                (base / rel).write_bytes(log.read_bytes())
            c.run("lab", "down", ok=False)


def processes_under(root: Path) -> set[int]:
    """Every live process whose command line names a path under ``root``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(root) + "/" in argv:
            found.add(int(entry.name))
    return found


def until_synced(url: str, token: str, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    listed: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        r = httpx.get(url + "/v1/clusters", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        listed = r.json()
        if len(listed) == 2 and all(c["sync_state"] == "ok" for c in listed):
            return listed
        time.sleep(0.3)
    raise AssertionError(f"the center did not read both clusters: {listed}")


def test_two_clusters_registered_in_the_center_and_down_leaves_nothing(cli: Cli) -> None:
    up = cli.json(
        "lab",
        "up",
        "--clusters",
        "2",
        "--nodes",
        "1",
        "--subnet",
        SUBNET,
        "--center-address",
        CENTER,
        "--node-memory",
        "1024",
    )
    center = f"http://{CENTER}:8800"
    assert up["center"] == center and up["web_console"] == center + "/"
    password_file = Path(up["password_file"])
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert [(c["cluster"], c["datacenter"], c["api"]) for c in up["clusters"]] == [
        ("c1", "dc1", "http://127.0.76.1:8700"),
        ("c2", "dc2", "http://127.0.77.1:8700"),
    ]

    # the CLI is logged in to the center as root, as 'aecp login' leaves it
    session_file = cli.home / "aecp" / "center.json"
    assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
    session = json.loads(session_file.read_text())
    assert (session["url"], session["user"]) == (center, "root")
    listed = until_synced(center, session["token"])
    assert sorted((c["name"], c["datacenter"], c["endpoint"]) for c in listed) == [
        ("c1", "dc1", "http://127.0.76.1:8700"),
        ("c2", "dc2", "http://127.0.77.1:8700"),
    ]

    # the direct cluster mode and Lab.open find c1 at the lab's root
    cfg = json.loads((cli.root / "cli.json").read_text())
    assert cfg["api"] == ["http://127.0.76.1:8700"]
    assert Path(cfg["token_file"]) == cli.root / "c1" / "token"
    assert Lab.open(cli.root).spec.cluster_name == "c1"

    status = cli.json("lab", "status")
    pids = {status["center"]["pid"]} | {
        r[k] for r in status["nodes"] for k in ("agent_pid", "storage_pid", "etcd_pid")
    }
    assert None not in pids and len(pids) == 7  # the center; etcd, agent, storage twice
    assert pids == processes_under(cli.root)

    cli.run("lab", "down")
    assert [p for p in pids if pid_alive(p)] == []
    assert processes_under(cli.root) == set()
    assert not cli.root.exists()
    assert not session_file.exists()
