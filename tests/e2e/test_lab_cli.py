"""The newcomer's path through the CLI: ``aecp lab up`` with 3 nodes, three VMs that spread over
the nodes and boot to their marker, the serial console, and ``aecp lab down`` leaving no
process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aecp.common.proc import pid_alive
from aecp.compute.images.tiny import BOOT_MARKER

pytestmark = pytest.mark.e2e


class Cli:
    def __init__(self, root: Path) -> None:
        self.env = {**os.environ, "AECP_LAB_DIR": str(root), "COLUMNS": "200"}
        self.env.pop("AECP_API", None)
        self.env.pop("AECP_TOKEN", None)

    def run(
        self, *args: str, ok: bool = True, stdin: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "aecp", *args],
            env=self.env,
            capture_output=True,
            text=True,
            input=stdin,
            timeout=timeout,
            check=False,
        )
        if ok:
            assert proc.returncode == 0, f"aecp {' '.join(args)}: {proc.stderr}{proc.stdout}"
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--output", "json").stdout)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    root = tmp_path_factory.mktemp("e2e") / "lab"
    c = Cli(root)
    c.run("lab", "up", "--nodes", "3", "--subnet", "127.0.70", "--node-memory", "2048")
    try:
        yield c
    finally:
        if (root / "lab.json").exists():
            c.run("lab", "down", ok=False)


def test_three_vms_spread_across_three_nodes_and_boot(cli: Cli) -> None:
    nodes = cli.json("node", "list")
    assert sorted(n["name"] for n in nodes) == ["node1", "node2", "node3"]
    assert all(n["state"] == "ready" for n in nodes)
    for i in (1, 2, 3):
        op = cli.json("vm", "create", f"vm{i}", "--image", "tiny", "--memory", "256")
        assert op["state"] == "succeeded"
    vms = cli.json("vm", "list")
    assert sorted(v["node"] for v in vms) == ["node1", "node2", "node3"]
    assert all(v["state"] == "running" for v in vms)
    for i in (1, 2, 3):
        wait_console(cli, f"vm{i}", f"{BOOT_MARKER} name=vm{i}")


def test_the_console_runs_commands_in_the_guest(cli: Cli) -> None:
    wait_console(cli, "vm1", "aecp:/# ")
    out = cli.run("vm", "console", "vm1", stdin="echo hello-$((6*7))\n").stdout
    assert "hello-42" in out


def test_the_cli_prints_the_reason_and_exits_non_zero_on_bad_input(cli: Cli) -> None:
    proc = cli.run("vm", "create", "vm1", ok=False)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    proc = cli.run("vm", "create", "x", "--memory", "-1", ok=False)
    assert proc.returncode == 1 and "memory_mib" in proc.stderr
    proc = cli.run("vm", "resume", "vm2", ok=False)
    assert proc.returncode == 1 and "not suspended" in proc.stderr


def test_lab_down_leaves_no_process_behind(cli: Cli) -> None:
    rows = cli.json("lab", "status")
    pids = [r[k] for r in rows for k in ("agent_pid", "etcd_pid") if r[k]]
    assert len(pids) == 6
    qemu = [
        int(line.split()[0])
        for line in subprocess.run(
            ["pgrep", "-af", "qemu-system"], capture_output=True, text=True, check=False
        ).stdout.splitlines()
        if "127.0.70." in line
    ]
    assert len(qemu) == 3
    cli.run("lab", "down")
    assert [p for p in pids + qemu if pid_alive(p)] == []


def wait_console(cli: Cli, vm: str, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    log = ""
    while time.monotonic() < deadline:
        log = cli.run("vm", "console", vm, "--log").stdout
        if text in log:
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared on {vm}'s console: {log[-500:]}")
