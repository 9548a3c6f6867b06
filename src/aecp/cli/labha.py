"""``aecp lab up --center ha`` and its ``down``: the operation center as an HA trio beside the
netns cluster lab, on the lab's management bridge, the cluster registered in it and this CLI
logged in to it through the management IP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from aecp.cli import centerctx
from aecp.common.errors import Unavailable
from aecp.lab.centerha import Trio, TrioPlan
from aecp.lab.harness import Lab

TRIO_DIR = "center-ha"


def trio_up(lab: Lab, ha_cidr: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Start the trio for ``lab`` (idempotent), register the cluster, log the CLI in; returns
    lines for the summary."""
    plan = lab.spec.plan()
    trio = Trio(
        lab.root / TRIO_DIR,
        TrioPlan(plan.lab_id, ha_cidr, plan.mgmt_cidr, mgmt_bridge=plan.bridge("mgmt")),
    )
    say("starting the operation center's HA trio (etcd, Patroni, PostgreSQL, agents, centers)")
    st = asyncio.run(_up(trio))
    session = asyncio.run(_register(trio, lab))
    path = centerctx.save(session)
    say(f"logged in to the center as root through the management IP (session in {path})")
    return {
        "center": trio.center_url,
        "center_active": st.leader,
        "center_rpo": st.rpo.text,
        "center_password_file": str(_password_file(trio)),
    }


async def _up(trio: Trio) -> Any:
    if not (trio.root / "trio.json").exists():
        await trio.create()
    await trio.start()
    return await trio.wait_ready(180)


def _password_file(trio: Trio) -> Path:
    return trio.base(1) / "center" / "root-password"


async def _register(trio: Trio, lab: Lab) -> dict[str, Any]:
    password = _password_file(trio).read_text().strip()
    url = trio.center_url
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{url}/v1/login", json={"user": "root", "password": password})
        if r.status_code != 200:
            raise Unavailable(f"logging in to the center failed: {r.text[:300]}")
        got = r.json()
        auth = {"authorization": f"Bearer {got['token']}"}
        known = await http.get(f"{url}/v1/clusters", headers=auth)
        if not any(c["name"] == "c1" for c in known.json()):
            await http.post(f"{url}/v1/datacenters", json={"name": "dc1"}, headers=auth)
            body = {
                "name": "c1",
                "datacenter": "dc1",
                "endpoint": lab.api_url(lab.node_names[0]),
                "token": lab.token(),
            }
            r = await http.post(f"{url}/v1/clusters", json=body, headers=auth)
            if r.status_code != 201:
                raise Unavailable(f"registering cluster c1 failed: {r.text[:300]}")
    return {"url": url, "user": "root", "token": got["token"], "expires_at": got["expires_at"]}


def trio_down(root: Path, forget: Callable[[str], None]) -> None:
    """Stop the trio of the lab at ``root``, if it has one."""
    if not (root / TRIO_DIR / "trio.json").exists():
        return
    trio = Trio.open(root / TRIO_DIR)
    asyncio.run(trio.destroy())
    forget(trio.center_url)
