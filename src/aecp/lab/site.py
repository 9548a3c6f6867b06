"""The multi-cluster lab: an operation center (AOC) and N clusters on this machine, cluster k
in data center ``dck`` on loopback subnet ``<subnet + k - 1>`` (c1 on 127.0.1, c2 on 127.0.2),
each cluster a whole ``Lab`` in its own subdirectory, every cluster registered in the center.

Like ``Lab``, every method works from a fresh process: the layout is in ``<root>/site.json``,
the center's pid in its pidfile, each cluster's in its own ``lab.json`` and pidfiles, so
``down`` stops exactly what ``up`` started.

Layout of ``root``::

    site.json  cli.json  center/{center.pid,center.log,data/}  c1/  c2/ ...

``cli.json`` points at c1 (the CLI's direct cluster mode, ``aecp.cli.client.discover``, and
``Lab.open(root)`` follow it); ``center/data`` is the center's data directory, with its
``root-password`` (0600) written at first start.
"""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field, model_validator

from aecp.common.errors import InvalidInput, NotFound, Unavailable
from aecp.common.proc import pid_alive
from aecp.lab.harness import Lab, LabSpec, Progress
from aecp.lab.process import Daemon

SITE_FILE = "site.json"
DEMO_VM: dict[str, Any] = {"name": "demo", "image": "tiny", "memory_mib": 256}


class SiteSpec(BaseModel):
    """How the site is laid out; saved in site.json."""

    clusters: int = Field(2, ge=1, le=9)
    #: every cluster's spec but its subnet and name (cluster k gets ``subnet`` + k - 1, ``ck``)
    cluster: LabSpec = Field(default_factory=LabSpec)
    center_address: str = "127.0.0.1"
    center_port: int = Field(8800, ge=1, le=65535)

    @model_validator(mode="after")
    def _subnets_fit(self) -> SiteSpec:
        last = int(self.cluster.subnet.split(".")[2]) + self.clusters - 1
        if last > 255:
            raise ValueError(f"{self.clusters} clusters from {self.cluster.subnet} pass 127.0.255")
        return self

    @property
    def cluster_names(self) -> list[str]:
        return [f"c{k}" for k in range(1, self.clusters + 1)]

    def index(self, cluster: str) -> int:
        if cluster not in self.cluster_names:
            names = ", ".join(self.cluster_names)
            raise InvalidInput("cluster", f"no cluster {cluster} in this lab ({names})")
        return int(cluster.removeprefix("c"))

    def datacenter(self, cluster: str) -> str:
        return f"dc{self.index(cluster)}"

    def cluster_spec(self, cluster: str) -> LabSpec:
        a, b, c = self.cluster.subnet.split(".")
        subnet = f"{a}.{b}.{int(c) + self.index(cluster) - 1}"
        return self.cluster.model_copy(update={"subnet": subnet, "cluster_name": cluster})


class Site:
    """One site under ``root``: the center and the clusters. Safe to use from a fresh process."""

    def __init__(self, root: Path, spec: SiteSpec) -> None:
        self.root = root
        self.spec = spec
        self.center_dir = root / "center"
        self.center_data = self.center_dir / "data"
        self.password_file = self.center_data / "root-password"
        self._labs: dict[str, Lab] = {}

    @staticmethod
    def exists(root: Path) -> bool:
        return (root / SITE_FILE).exists()

    @classmethod
    def open(cls, root: Path) -> Site:
        try:
            spec = SiteSpec.model_validate_json((root / SITE_FILE).read_text())
        except FileNotFoundError:
            raise NotFound(f"no multi-cluster lab at {root}") from None
        return cls(root, spec)

    # ---- naming ----------------------------------------------------------------------------
    @property
    def cluster_names(self) -> list[str]:
        return self.spec.cluster_names

    def lab(self, cluster: str) -> Lab:
        """The cluster's ``Lab`` (one object per cluster, so its etcd members stay tracked)."""
        if cluster not in self._labs:
            self._labs[cluster] = Lab(self.root / cluster, self.spec.cluster_spec(cluster))
        return self._labs[cluster]

    def labs(self) -> list[Lab]:
        return [self.lab(c) for c in self.cluster_names]

    @property
    def center_url(self) -> str:
        return f"http://{self.spec.center_address}:{self.spec.center_port}"

    def center(self) -> Daemon:
        argv = [
            sys.executable,
            "-m",
            "aecp",
            "center",
            "run",
            "--data-dir",
            str(self.center_data),
            "--address",
            self.spec.center_address,
            "--port",
            str(self.spec.center_port),
        ]
        return Daemon(
            argv,
            self.center_dir / "center.pid",
            self.center_dir / "center.log",
            marker=str(self.center_data),
        )

    # ---- up --------------------------------------------------------------------------------
    async def up(
        self, progress: Progress = lambda _: None, image: Path | None = None, demo: bool = False
    ) -> dict[str, Any]:
        """Start the center and every cluster (at the same time), register each cluster in its
        data center, wait until the center has read them all, optionally start a demo VM on
        each cluster. Returns the root user's center session (url, user, token, expires_at).

        Raises ``InvalidInput`` if a lab already exists at ``root`` or the center's address is
        taken. What was started stays recorded, so ``down`` stops it even after a failure.
        """
        if self.exists(self.root) or (self.root / "lab.json").exists():
            raise InvalidInput(
                "root", f"a lab already exists at {self.root}; run 'aecp lab down' first"
            )
        _check_free(self.spec.center_address, self.spec.center_port)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SITE_FILE).write_text(self.spec.model_dump_json(indent=2))
        self.center_dir.mkdir(mode=0o700, exist_ok=True)
        progress(f"starting the operation center on {self.center_url}")
        self.center().start()
        await asyncio.gather(*(self._cluster_up(c, progress, image) for c in self.cluster_names))
        c1 = self.lab(self.cluster_names[0])
        (self.root / "cli.json").write_text(
            json.dumps(
                {"api": c1.api_urls(), "token_file": str(c1.token_file), "lab_root": str(c1.root)},
                indent=2,
            )
        )
        await self.wait_center()
        session = await self.login()
        progress("registering the clusters in the center")
        await self.register(session["token"])
        await self.wait_synced(session["token"])
        progress("the center has read every cluster")
        if demo:
            progress("starting a demo VM on each cluster")
            await asyncio.gather(*(create_demo_vm(lab) for lab in self.labs()))
        return session

    async def _cluster_up(self, cluster: str, progress: Progress, image: Path | None) -> None:
        def say(msg: str) -> None:
            progress(f"{cluster}: {msg}")

        await self.lab(cluster).up(say, image=image)

    async def wait_center(self, timeout: float = 60) -> None:
        """Wait until the center answers ``/healthz`` (its database made, root created)."""
        daemon = self.center()
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                try:
                    r = await http.get(self.center_url + "/healthz")
                    if r.status_code == 200 and self.password_file.exists():
                        return
                except httpx.HTTPError:
                    pass
                if not daemon.is_running():
                    raise Unavailable(f"the center exited; see {daemon.log_file}")
                await asyncio.sleep(0.2)
        raise Unavailable(f"the center did not answer in {timeout:.0f}s; see {daemon.log_file}")

    async def login(self) -> dict[str, Any]:
        """A session of the center's root user (as ``aecp login`` keeps it)."""
        password = self.password_file.read_text().strip()
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(
                self.center_url + "/v1/login", json={"user": "root", "password": password}
            )
        if r.status_code != 200:
            raise Unavailable(f"logging in to the center failed: {r.text[:300]}")
        got = r.json()
        return {
            "url": self.center_url,
            "user": "root",
            "token": got["token"],
            "expires_at": got["expires_at"],
        }

    async def register(self, token: str) -> None:
        """Data center ``dck`` and cluster ``ck`` in it, with the cluster's lab admin token."""
        async with httpx.AsyncClient(
            timeout=60, headers={"authorization": f"Bearer {token}"}
        ) as http:
            for cluster in self.cluster_names:
                lab = self.lab(cluster)
                dc = self.spec.datacenter(cluster)
                r = await http.post(self.center_url + "/v1/datacenters", json={"name": dc})
                if r.status_code != 201:
                    raise Unavailable(f"adding data center {dc} failed: {r.text[:300]}")
                body = {
                    "name": cluster,
                    "datacenter": dc,
                    "endpoint": lab.api_url(lab.node_names[0]),
                    "token": lab.token(),
                }
                r = await http.post(self.center_url + "/v1/clusters", json=body)
                if r.status_code != 201:
                    raise Unavailable(f"registering cluster {cluster} failed: {r.text[:300]}")

    async def wait_synced(self, token: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait until the center shows every cluster with ``sync_state`` ok; returns them."""
        deadline = time.monotonic() + timeout
        listed: list[dict[str, Any]] = []
        async with httpx.AsyncClient(
            timeout=10, headers={"authorization": f"Bearer {token}"}
        ) as http:
            while time.monotonic() < deadline:
                r = await http.get(self.center_url + "/v1/clusters")
                if r.status_code == 200:
                    listed = r.json()
                    ok = {c["name"] for c in listed if c["sync_state"] == "ok"}
                    if ok >= set(self.cluster_names):
                        return listed
                await asyncio.sleep(0.3)
        states = {c["name"]: (c["sync_state"], c["sync_error"]) for c in listed}
        raise Unavailable(f"the center has not read every cluster after {timeout:.0f}s: {states}")

    # ---- faults ----------------------------------------------------------------------------
    def kill_node(self, cluster: str, node: str) -> list[int]:
        return self.lab(cluster).kill_node(node)

    def start_node(self, cluster: str, node: str) -> None:
        self.lab(cluster).start_node(node)

    # ---- status and down -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The center, each cluster (its data center, API, token file) and every node."""
        clusters = []
        nodes: list[dict[str, object]] = []
        for cluster in self.cluster_names:
            lab = self.lab(cluster)
            if not (lab.root / "lab.json").exists():
                continue
            dc = self.spec.datacenter(cluster)
            clusters.append(
                {
                    "cluster": cluster,
                    "datacenter": dc,
                    "api": lab.api_url(lab.node_names[0]),
                    "token_file": str(lab.token_file),
                    "nodes": lab.spec.nodes,
                }
            )
            nodes += [{"cluster": cluster, "datacenter": dc, **row} for row in lab.status()]
        return {
            "center": {
                "url": self.center_url,
                "pid": self.center().pid(),
                "data_dir": str(self.center_data),
                "password_file": str(self.password_file),
                "log": str(self.center().log_file),
            },
            "clusters": clusters,
            "nodes": nodes,
        }

    def processes(self) -> list[int]:
        """Every live process the site started: the center, then each cluster's."""
        pids = [p for p in [self.center().pid()] if p]
        for lab in self.labs():
            if (lab.root / "lab.json").exists():
                pids += lab.processes()
        return pids

    def down(self) -> list[int]:
        """Stop the center, then every cluster; remove the site's directory. Returns the pids
        stopped; raises ``Unavailable`` (keeping the directory) if any is still alive."""
        stopped = self.processes()
        self.center().stop()
        errors = []
        for lab in self.labs():
            if (lab.root / "lab.json").exists():
                try:
                    lab.down()
                except Unavailable as exc:
                    errors.append(exc.message)
        left = [p for p in stopped if pid_alive(p)]
        if errors or left:
            raise Unavailable(f"processes still alive after lab down: {left} {errors}")
        shutil.rmtree(self.root, ignore_errors=True)
        return stopped


async def create_demo_vm(lab: Lab, timeout: float = 300) -> dict[str, Any]:
    """Create and start VM ``demo`` (the tiny image, 256 MiB) through the cluster's own API and
    wait for its operation; returns the operation."""
    headers = {"authorization": f"Bearer {lab.token()}"}
    url = lab.api_urls()[0]
    async with httpx.AsyncClient(timeout=60, headers=headers) as http:
        r = await http.post(url + "/v1/vms", json=DEMO_VM)
        if r.status_code != 202:
            raise Unavailable(f"{lab.spec.cluster_name}: creating the demo VM: {r.text[:300]}")
        op_id = r.json()["operation"]["id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            op: dict[str, Any] = (await http.get(f"{url}/v1/operations/{op_id}")).json()
            if op["state"] == "succeeded":
                return op
            if op["state"] in ("failed", "cancelled"):
                raise Unavailable(
                    f"{lab.spec.cluster_name}: the demo VM {op['state']}: {op.get('error')}"
                )
            await asyncio.sleep(0.3)
    raise Unavailable(f"{lab.spec.cluster_name}: the demo VM not started after {timeout:.0f}s")


def _check_free(address: str, port: int) -> None:
    """Refuse an address:port something else listens on (it would answer for the center)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is fine
        try:
            s.bind((address, port))
        except OSError as exc:
            why = "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise InvalidInput(
                "center_port", f"{address}:{port} is {why}: choose another --center-port"
            ) from None
