"""Screenshots of the web console's main pages, for docs/screenshots/.

Starts two labs (c1: one node, c2: three nodes), an operation center over them, and drives
the console in Debian's chromium (Playwright, ``executable_path``: no browser is downloaded):
creates VMs, powers one, kills node3 of c2 so an alert is open, and takes the dashboard, a
cluster, a VM, the tasks, the alerts and the audit. Everything it started is stopped at the
end. Takes a few minutes on two cores.

    .venv/bin/python scripts/console_screenshots.py [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Page, async_playwright, expect

from aecp.compute.images.tiny import BOOT_MARKER, ensure_tiny_image
from aecp.lab.harness import Lab, LabSpec

CHROMIUM = "/usr/bin/chromium"
SECOND = 1000  # ms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


class Center:
    """``aecp center run`` as a process of its own."""

    def __init__(self, base: Path) -> None:
        self.data_dir = base / "aoc"
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "aecp", "center", "run", "--data-dir", str(self.data_dir)]
        argv += ["--port", self.url.rsplit(":", 1)[1]]
        self.log = (base / "center.log").open("ab")
        self.proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
            argv, stdout=self.log, stderr=subprocess.STDOUT
        )

    async def ready(self) -> str:
        async def answers() -> bool:
            assert self.proc.poll() is None, "the center exited: see center.log"
            try:
                async with httpx.AsyncClient(timeout=1) as http:
                    return (await http.get(self.url + "/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await until(answers, "the center")
        return (self.data_dir / "root-password").read_text().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def register(center: Center, password: str, labs: dict[str, Lab]) -> dict[str, str]:
    """dc1 holds c1, dc2 holds c2; a VM ``db`` on c1 through the API. Root's API auth."""
    async with httpx.AsyncClient(base_url=center.url, timeout=30) as http:
        r = await http.post("/v1/login", json={"user": "root", "password": password})
        auth = {"authorization": f"Bearer {r.json()['token']}"}
        for n, (name, lab) in enumerate(sorted(labs.items()), start=1):
            await http.post("/v1/datacenters", json={"name": f"dc{n}"}, headers=auth)
            body = {"name": name, "datacenter": f"dc{n}", "endpoint": lab.api_url("node1")}
            r = await http.post("/v1/clusters", json={**body, "token": lab.token()}, headers=auth)
            r.raise_for_status()
        vm = {"name": "db", "image": "tiny", "memory_mib": 128}
        (await http.post("/v1/clusters/c1/vms", json=vm, headers=auth)).raise_for_status()
        for name in ("alice", "bob"):
            user = {"name": name, "role": "VM_USER", "password": "demo-Passw0rd-long"}
            await http.post("/v1/users", json=user, headers=auth)

        async def all_nodes() -> bool:
            r = await http.get("/v1/inventory/node", headers=auth)
            return len(r.json()) == sum(len(lab.node_names) for lab in labs.values())

        await until(all_nodes, "every node in the center's copy")
    return auth


async def shoot(page: Page, out: Path, name: str) -> None:
    await page.wait_for_timeout(500)  # let a live refresh land
    await page.screenshot(path=str(out / f"{name}.png"), full_page=True)
    print(f"  {out / name}.png")


async def drive(center: Center, password: str, labs: dict[str, Lab], out: Path) -> None:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1360, "height": 860})
            page.set_default_timeout(60 * SECOND)
            await page.goto(center.url + "/")
            await page.fill("input[name=user]", "root")
            await page.fill("input[name=password]", password)
            await page.click("button[type=submit]")
            await page.goto(center.url + "/ui/clusters/c2")
            for name in ("web", "app"):
                await page.fill("#create-vm input[name=name]", name)
                await page.fill("#create-vm input[name=memory_mib]", "128")
                await page.click("#create-vm button[type=submit]")
                await page.wait_for_url("**/ui/tasks/*")
                await expect(page.locator("#task-state")).to_have_text(
                    "succeeded", timeout=300 * SECOND
                )
                await page.goto(center.url + "/ui/clusters/c2")
            await page.goto(center.url + "/ui/clusters/c2/vms/web")
            await expect(page.locator("#console-log")).to_contain_text(
                BOOT_MARKER, timeout=180 * SECOND
            )
            await shoot(page, out, "vm")
            await page.goto(center.url + "/ui/clusters/c2/vms/app")
            await page.click("#power button:text-is('Poweroff')")
            await expect(page.locator("#vm-state")).to_have_text("stopped", timeout=120 * SECOND)

            labs["c2"].kill_node("node3")
            await page.goto(center.url + "/ui/alerts")
            row = page.locator(
                'tr[data-rule="node_unreachable"][data-object="node/node3"][data-state="open"]'
            )
            await expect(row).to_have_count(1, timeout=120 * SECOND)
            await shoot(page, out, "alerts")
            await page.goto(center.url + "/")
            await expect(page.locator('tr[data-cluster="c2"] .health')).to_have_text("degraded")
            await shoot(page, out, "dashboard")
            await page.goto(center.url + "/ui/clusters/c2")
            await shoot(page, out, "cluster")
            await page.goto(center.url + "/ui/tasks")
            await shoot(page, out, "tasks")
            await page.goto(center.url + "/ui/audit")
            await shoot(page, out, "audit")
            await page.goto(center.url + "/ui/users")
            await shoot(page, out, "users")
        finally:
            await browser.close()


async def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="aecp-shots-"))
    labs = {
        "c1": Lab(base / "c1", LabSpec(nodes=1, subnet="127.0.96", cluster_name="c1",
                                       lease_ttl=3, node_memory_mib=2048)),
        "c2": Lab(base / "c2", LabSpec(nodes=3, subnet="127.0.97", cluster_name="c2",
                                       lease_ttl=3, node_memory_mib=2048)),
    }  # fmt: skip
    center: Center | None = None
    try:
        image = ensure_tiny_image()
        for name, lab in labs.items():
            print(f"starting lab {name}")
            await lab.up(image=image)
        center = Center(base)
        password = await center.ready()
        await register(center, password, labs)
        print("driving the console")
        await drive(center, password, labs, out)
    finally:
        if center is not None:
            center.stop()
        for lab in labs.values():
            if (lab.root / "lab.json").exists():
                lab.down()
        print(f"logs under {base}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args: Any = parser.parse_args()
    asyncio.run(main(args.out))
