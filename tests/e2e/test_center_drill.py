"""``aecp drill center-failover`` against a fresh AOC HA trio (root): the command kills the
active under writes, reports the RTO, no lost acknowledged write, and a timeline naming the
promotion and the management IP's move; the old active comes back as the passive."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from aecp.lab.centerha import Trio, TrioPlan

pytestmark = [pytest.mark.e2e]

HA_CIDR = "10.232.80.0/24"
MGMT_CIDR = "10.233.80.0/24"


@pytest.mark.timeout(600)
async def test_the_failover_drill_reports_rto_no_loss_and_the_decisions() -> None:
    assert os.geteuid() == 0, "the HA trio needs root (CI runs the e2e tests as root)"
    # PostgreSQL runs as user postgres: its directories must be reachable (pytest's are 0700)
    root = Path(tempfile.mkdtemp(prefix="aecp-drill-"))
    os.chmod(root, 0o755)
    trio = Trio(root / "trio", TrioPlan("t" + os.urandom(1).hex(), HA_CIDR, MGMT_CIDR))
    try:
        await trio.create()
        await trio.start()
        before = await trio.wait_ready(180)
        aecp = str(Path(sys.executable).parent / "aecp")
        args = ["drill", "center-failover", "--lab-dir", str(trio.root), "--writes-before", "20"]
        proc = await asyncio.create_subprocess_exec(
            aecp,
            *args,
            "--output=json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-2000:]
        report = json.loads(out)
    finally:
        await trio.destroy()
        shutil.rmtree(root, ignore_errors=True)

    assert report["lost"] == 0 and report["missing"] == []
    assert report["rto_s"] is not None and report["rto_s"] > 0
    assert report["old_active"] == before.leader == "aoc1"
    new = report["new_active"]
    assert new == "aoc2"
    assert report["epoch_after"] > report["epoch_before"]
    assert report["restored"] is True and report["ip_on_two"] == 0
    sentences = [(e["source"], e["sentence"]) for e in report["timeline"]]
    assert any(s == f"patroni {new}" and "promoted" in t for s, t in sentences), sentences
    assert ("sampler", f"the management IP is on {new}") in sentences
    assert any(s == f"agent {new}" and t.startswith("took the management IP") for s, t in sentences)
    times = [e["at"] for e in report["timeline"]]
    assert times == sorted(times)
