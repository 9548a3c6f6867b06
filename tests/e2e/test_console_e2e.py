"""The web console in a real browser (Debian's chromium under Playwright) over a real center
process and two real clusters: log in, create a VM on the second cluster and watch its task
finish, see it boot on its serial console, power it off, kill a node and see its alert
appear, start the node again and see the alert resolve, all without reloading a page (the
live updates bring every change; a tab whose stream cannot be opened gets them by its slow
refresh)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from aecp.compute.images.tiny import BOOT_MARKER
from tests.integration.test_center import CenterProcess
from tests.labkit import LabKit, running_lab, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]
CHROMIUM = "/usr/bin/chromium"  # Debian's: Playwright never downloads a browser here
SECOND = 1000  # Playwright's timeouts are in milliseconds


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def labs(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, LabKit]]:
    """c1: one node; c2: three nodes (a node of it can die while its etcd keeps a quorum)."""
    base = tmp_path_factory.mktemp("console")
    async with (
        running_lab(base / "c1", subnet="127.0.86", nodes=1, cluster_name="c1") as c1,
        running_lab(base / "c2", subnet="127.0.87", nodes=3, cluster_name="c2") as c2,
    ):
        yield {"c1": c1, "c2": c2}


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CenterProcess]:
    base = tmp_path_factory.mktemp("aoc")
    c = CenterProcess(base / "aoc", base / "home")
    c.start()
    try:
        yield c
    finally:
        c.kill()


async def register(center: CenterProcess, labs: dict[str, LabKit]) -> str:
    """Data centers dc1, dc2 and clusters c1 (in dc1), c2 (in dc2), through the API; root's
    password."""
    password = (center.data_dir / "root-password").read_text().strip()
    async with httpx.AsyncClient(base_url=center.url, timeout=30) as http:
        r = await http.post("/v1/login", json={"user": "root", "password": password})
        auth = {"authorization": f"Bearer {r.json()['token']}"}
        for n, (name, kit) in enumerate(sorted(labs.items()), start=1):
            await http.post("/v1/datacenters", json={"name": f"dc{n}"}, headers=auth)
            body = {
                "name": name,
                "datacenter": f"dc{n}",
                "endpoint": kit.url(),
                "token": kit.lab.token(),
            }
            r = await http.post("/v1/clusters", json=body, headers=auth)
            assert r.status_code == 201, r.text

        async def nodes_read() -> bool:
            r = await http.get("/v1/inventory/node", headers=auth)
            return len(r.json()) == sum(len(k.lab.node_names) for k in labs.values())

        await wait_for(nodes_read, "every node in the center's copy", timeout=60)
    return password


async def test_a_vm_is_made_powered_off_and_a_dead_node_alerted_through_the_console(
    labs: dict[str, LabKit], center: CenterProcess
) -> None:
    from playwright.async_api import async_playwright, expect

    password = await register(center, labs)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await (await browser.new_context()).new_page()  # a context: tabs share it
            page.set_default_timeout(30 * SECOND)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await log_in(page, center.url, password)
            await create_and_power_off(page, expect)
            await kill_and_revive_a_node(page, expect, labs["c2"])
            assert errors == []  # the console's script never failed
        finally:
            await browser.close()


async def log_in(page: Any, url: str, password: str) -> None:
    await page.goto(url + "/ui/clusters/c2")
    assert "/login" in page.url  # no session yet: the login page, and back after it
    await page.fill("input[name=user]", "root")
    await page.fill("input[name=password]", password)
    await page.click("button[type=submit]")
    await page.wait_for_url(url + "/ui/clusters/c2")
    await page.wait_for_selector('tr[data-node="node3"]')
    cookies = {c["name"]: c for c in await page.context.cookies()}
    assert cookies["aoc_session"]["httpOnly"] and cookies["aoc_session"]["sameSite"] == "Strict"


async def create_and_power_off(page: Any, expect: Any) -> None:
    """On c2's page: the create form, then the task's page until it succeeds, then the VM's
    page: it boots (its console says so), Poweroff, and its state turns ``stopped``."""
    await page.fill("#create-vm input[name=name]", "web")
    await page.fill("#create-vm input[name=memory_mib]", "128")
    await page.click("#create-vm button[type=submit]")
    await page.wait_for_url("**/ui/tasks/*")
    await expect(page.locator("h1")).to_contain_text("vm.create of web")
    # the task's progress comes in through the live updates: no reload
    await expect(page.locator("#task-state")).to_have_text("succeeded", timeout=240 * SECOND)
    await expect(page.locator("#task-progress")).to_have_text("100%")

    await page.click('a[href="/ui/clusters/c2/vms/web"]')
    await expect(page.locator("#vm-state")).to_have_text("running", timeout=120 * SECOND)
    await expect(page.locator("#console-log")).to_contain_text(BOOT_MARKER, timeout=120 * SECOND)
    # a second tab whose stream cannot be opened (as when a browser's 6 connections to the
    # host are taken): it still follows the VM, by its slow periodic refresh
    blocked = await page.context.new_page()
    await blocked.route("**/ui/events*", lambda route: route.abort())
    await blocked.goto(page.url)
    await expect(blocked.locator("#vm-state")).to_have_text("running")
    await page.bring_to_front()
    await page.click("#power button:text-is('Poweroff')")
    await expect(page.locator(".flash.ok")).to_contain_text("poweroff of web asked")
    await expect(page.locator("#vm-state")).to_have_text("stopped", timeout=120 * SECOND)
    await expect(page.locator("#power button")).to_have_text(["Start"])
    await blocked.bring_to_front()
    await expect(blocked.locator("#vm-state")).to_have_text("stopped", timeout=120 * SECOND)
    await blocked.close()


async def kill_and_revive_a_node(page: Any, expect: Any, c2: LabKit) -> None:
    """node3 of c2 dies: the open alerts show it (live); it comes back: the alert goes, and
    the list of every alert shows it resolved."""
    await page.click('header a[href="/ui/alerts"]')
    row = page.locator(
        'tr[data-rule="node_unreachable"][data-object="node/node3"][data-state="open"]'
    )
    await expect(row).to_have_count(0)
    c2.lab.kill_node("node3")
    try:
        await expect(row).to_have_count(1, timeout=120 * SECOND)
        await expect(row).to_contain_text("unreachable")
        await page.click('header a[href="/"]')  # the dashboard shows it too, and the cluster
        await expect(page.locator("#alerts")).to_contain_text("node3")
        await expect(page.locator('tr[data-cluster="c2"] .health')).to_have_text("degraded")
        await page.click('header a[href="/ui/alerts"]')
    finally:
        c2.lab.start_node("node3")
    await expect(row).to_have_count(0, timeout=180 * SECOND)
    await page.goto(page.url.split("/ui/")[0] + "/ui/alerts?show=all")
    resolved = page.locator(
        'tr[data-rule="node_unreachable"][data-object="node/node3"][data-state="resolved"]'
    )
    await expect(resolved).to_have_count(1)
