"""The AOC HA trio in a lab: three network namespaces on an HA network and a management network,
each node running what ``docs/design/center-ha.md`` gives its role (etcd member; Patroni with
PostgreSQL and the center on the data nodes; the HA agent on all three). Root only.

Naming (a pure function of the trio's short id, ``TrioPlan``)::

    HA network     bridge ae<id>h, host .254   node k: ha0   = <ha>.k
    management     bridge ae<id>a, host .254   node k: mgmt0 = <mgmt>.(200 + k)
    management IP  <mgmt>.200 on the active's mgmt0 (moved by the agents)

Layout of ``root``::

    topology.json  secrets.json  ca/  aoc<k>/{etcd/,pg/,tls/,run/,log/,center/,*.pid,*.log}

Lifecycle: ``create`` (networks, CA, configuration) → ``start`` (every process) →
``wait_ready`` → faults (``kill_node``: every process in the node's namespace ``SIGKILL``ed;
``cut``/``restore``: the node's HA link, or its management link too) → ``start_node`` (a killed
node comes back) → ``destroy`` (processes, namespaces, bridges; idempotent, after a crash too).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import pwd
import secrets as tokens
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from aecp.center.ha import bootstrapdb
from aecp.center.ha import patroni as pat
from aecp.center.ha.model import HAStatus, Role
from aecp.center.ha.topology import (
    AGENT_PORT,
    CENTER_PORT,
    PATRONI_PORT,
    HANode,
    Topology,
    check,
)
from aecp.common.errors import InvalidInput, NotFound, Unavailable
from aecp.common.pki import ClusterCA
from aecp.lab import etcd as labetcd
from aecp.lab.etcd import EtcdMember, EtcdTuning
from aecp.lab.process import Daemon, wait_gone
from aecp.network import rootops

Link = Literal["ha", "mgmt"]
LINKS: tuple[Link, ...] = ("ha", "mgmt")
ROLES = (Role.ACTIVE, Role.PASSIVE, Role.WITNESS)
INNER: dict[Link, str] = {"ha": "ha0", "mgmt": "mgmt0"}
HOST = 254
MGMT_BASE = 200


@dataclass(frozen=True)
class TrioPlan:
    """Names and addresses of one lab trio (pure)."""

    lab_id: str
    ha_cidr: str = "10.232.0.0/24"
    mgmt_cidr: str = "10.233.0.0/24"
    #: join this existing management bridge (the netns cluster lab's) instead of making one
    mgmt_bridge: str = ""

    def name(self, k: int) -> str:
        return f"aoc{k}"

    def namespace(self, k: int) -> str:
        return f"aecp-{self.lab_id}-c{k}"

    def bridge(self, link: Link) -> str:
        if link == "mgmt" and self.mgmt_bridge:
            return self.mgmt_bridge
        return f"ae{self.lab_id}{'h' if link == 'ha' else 'a'}"

    def owned_bridges(self) -> list[Link]:
        """The links whose bridge the trio makes (and removes)."""
        return ["ha"] if self.mgmt_bridge else ["ha", "mgmt"]

    def host_veth(self, k: int, link: Link) -> str:
        return f"ae{self.lab_id}c{k}{'h' if link == 'ha' else 'a'}"

    def subnet(self, link: Link) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.ha_cidr if link == "ha" else self.mgmt_cidr)

    def address(self, link: Link, k: int) -> str:
        offset = k if link == "ha" else MGMT_BASE + k
        return str(self.subnet(link).network_address + offset)

    def host_address(self, link: Link) -> str:
        return str(self.subnet(link).network_address + HOST)

    @property
    def management_ip(self) -> str:
        net = self.subnet("mgmt")
        return f"{net.network_address + MGMT_BASE}/{net.prefixlen}"


class Trio:
    """One lab trio under ``root`` (state on disk: usable from any process)."""

    def __init__(self, root: Path, plan: TrioPlan, *, python: str = sys.executable) -> None:
        self.root, self.plan, self.python = Path(root), plan, python
        self.bin = Path(python).parent
        self.ha_venv = ha_venv(Path(python))
        self._members: dict[int, EtcdMember] = {}  # kept: they hold the Popen to reap

    @classmethod
    def open(cls, root: Path) -> Trio:
        """The trio saved under ``root`` (``NotFound`` if there is none)."""
        try:
            data = json.loads((Path(root) / "trio.json").read_text())
        except FileNotFoundError:
            raise NotFound(
                f"no HA trio in {root} (start one with aecp lab up --center ha)"
            ) from None
        return cls(Path(root), TrioPlan(**data))

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "trio.json").write_text(json.dumps(self.plan.__dict__))

    # -- configuration ---------------------------------------------------------------------

    def topology(self) -> Topology:
        return Topology(
            cluster_id=f"aoc-{self.plan.lab_id}",
            ha_cidr=self.plan.ha_cidr,
            management_ip=self.plan.management_ip,
            nodes=[
                HANode(
                    name=self.plan.name(k),
                    role=role,
                    ha_ip=self.plan.address("ha", k),
                    data_dir=None if role is Role.WITNESS else self.base(k) / "pg",
                )
                for k, role in enumerate(ROLES, start=1)
            ],
        )

    def base(self, k: int) -> Path:
        return self.root / self.plan.name(k)

    def paths(self, k: int) -> pat.NodePaths:
        return pat.NodePaths(self.base(k))

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.json"

    def secrets(self) -> pat.Secrets:
        return pat.Secrets.from_dict(json.loads(self.secrets_file.read_text()))

    @property
    def management_address(self) -> str:
        return self.topology().management_address

    @property
    def center_url(self) -> str:
        """The center as users reach it: through the management IP."""
        return f"http://{self.management_address}:{CENTER_PORT}"

    def center_url_of(self, k: int) -> str:
        return f"http://{self.plan.address('ha', k)}:{CENTER_PORT}"

    # -- create / destroy ------------------------------------------------------------------

    async def create(self) -> None:
        """Networks, CA, secrets and every node's configuration (no process starts)."""
        topology = check(self.topology())
        await self._check_free(topology)
        self.save()
        await self._networks()
        (self.root / "topology.json").write_text(topology.model_dump_json(indent=2))
        if not self.secrets_file.exists():
            pat.write(self.secrets_file, pat.Secrets.generate().to_dict())
        ca = ClusterCA(self.root / "ca")
        if not ca.exists():
            ca = ClusterCA.create(self.root / "ca", topology.cluster_id)
        for k, node in enumerate(topology.nodes, start=1):
            self._prepare_node(k, node, ca)

    async def _check_free(self, topology: Topology) -> None:
        """``InvalidInput`` if the trio's subnets (those it makes a bridge for) or its
        management IP are in use on this host or in any of its namespaces already."""
        ours = [self.plan.subnet(link) for link in self.plan.owned_bridges()]
        wanted = ipaddress.IPv4Address(topology.management_address)
        spaces: list[str | None] = [None, *await rootops.netns_list()]
        for ns in spaces:
            for iface, cidr in await rootops.addr_list(netns=ns):
                found = ipaddress.ip_interface(cidr)
                if found.version != 4:
                    continue
                where = f"{iface} in {ns or 'the host'}"
                if found.ip == wanted:
                    raise InvalidInput(
                        "management_ip", f"{wanted} is in use already ({where} has it)"
                    )
                if ns is None and any(found.network.overlaps(sub) for sub in ours):
                    raise InvalidInput("cidr", f"{cidr} on {where} overlaps the trio's networks")

    async def _networks(self) -> None:
        for link in self.plan.owned_bridges():
            await rootops.bridge_add(self.plan.bridge(link))
            await rootops.addr_add(
                self.plan.bridge(link),
                f"{self.plan.host_address(link)}/{self.plan.subnet(link).prefixlen}",
            )
            await rootops.link_up(self.plan.bridge(link))
        for k in (1, 2, 3):
            ns = self.plan.namespace(k)
            await rootops.netns_add(ns)
            for link in LINKS:
                host, inner = self.plan.host_veth(k, link), INNER[link]
                await rootops.veth_add(host, inner, peer_netns=ns)
                await rootops.link_set_master(host, self.plan.bridge(link))
                await rootops.link_up(host)
                prefix = self.plan.subnet(link).prefixlen
                await rootops.addr_add(inner, f"{self.plan.address(link, k)}/{prefix}", netns=ns)
                await rootops.link_up(inner, netns=ns)

    def _prepare_node(self, k: int, node: HANode, ca: ClusterCA) -> None:
        paths = self.paths(k)
        paths.claim(self.topology().cluster_id)
        postgres = pwd.getpwnam("postgres")
        for d in (paths.base, paths.tls, paths.run, paths.logs, paths.logs / "patroni"):
            d.mkdir(parents=True, exist_ok=True)
        bundle = ca.node_bundle(node.name)
        if not bundle.cert_file.exists():
            bundle = ca.issue_node(node.name, [node.ha_ip])
        for src, dst in zip(bundle.files(), ("ca.crt", "node.crt", "node.key"), strict=True):
            shutil.copyfile(src, paths.tls / dst)
            os.chmod(paths.tls / dst, 0o600)
        if node.data_dir is None:
            return
        node.data_dir.mkdir(mode=0o700, exist_ok=True)
        for path in [paths.base, node.data_dir, paths.run, paths.logs, paths.logs / "patroni"]:
            os.chown(path, postgres.pw_uid, postgres.pw_gid)
        for f in paths.tls.iterdir():
            os.chown(f, postgres.pw_uid, postgres.pw_gid)
        os.chown(paths.tls, postgres.pw_uid, postgres.pw_gid)
        secrets = self.secrets()
        # one key for both centers: credentials one stored the other must open after a failover
        (self.base(k) / "center").mkdir(exist_ok=True)
        pat.write_text(self.base(k) / "center" / "secret.key", secrets.box_key + "\n")
        script = Path(bootstrapdb.__file__)
        post = f"{self.ha_venv / 'bin' / 'python'} {script} {self.secrets_file}"
        document = pat.config(self.topology(), node, paths, secrets, post_bootstrap=post)
        pat.write(paths.patroni_config, document)
        os.chown(paths.patroni_config, postgres.pw_uid, postgres.pw_gid)
        os.chown(self.secrets_file, postgres.pw_uid, postgres.pw_gid)
        (self.base(k) / "center").mkdir(exist_ok=True)

    async def destroy(self) -> None:
        """Stop every process of the trio and remove its namespaces and bridges."""
        for k in (1, 2, 3):
            self.kill_node(k)
        for k in (1, 2, 3):
            await rootops.netns_delete(self.plan.namespace(k))
            for link in LINKS:
                await rootops.link_delete(self.plan.host_veth(k, link))
        for link in self.plan.owned_bridges():
            await rootops.link_delete(self.plan.bridge(link))

    # -- processes -------------------------------------------------------------------------

    def _in_ns(self, k: int) -> list[str]:
        return rootops.in_netns(self.plan.namespace(k), [])

    def etcd(self, k: int) -> EtcdMember:
        if k in self._members:
            return self._members[k]
        node = self.topology().nodes[k - 1]
        self._members[k] = EtcdMember(
            node.name,
            f"{node.ha_ip}:2379",
            f"{node.ha_ip}:2380",
            self.paths(k).etcd_data,
            ClusterCA(self.root / "ca").node_bundle(node.name),
            tuning=EtcdTuning(),
            launch_prefix=self._in_ns(k),
        )
        return self._members[k]

    def patroni(self, k: int) -> Daemon:
        paths = self.paths(k)
        argv = [
            *self._in_ns(k),
            "setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
            str(self.ha_venv / "bin" / "patroni"), str(paths.patroni_config),
        ]  # fmt: skip
        return Daemon(argv, self.base(k) / "patroni.pid", self.base(k) / "patroni.log", "patroni")

    def agent(self, k: int) -> Daemon:
        argv = [
            *self._in_ns(k),
            self.python, "-m", "aecp.center.ha.agent",
            "--topology", str(self.root / "topology.json"), "--node", self.plan.name(k),
            "--base", str(self.base(k)), "--secrets", str(self.secrets_file),
        ]  # fmt: skip
        return Daemon(argv, self.base(k) / "agent.pid", self.base(k) / "agent.log", "ha.agent")

    def center(self, k: int) -> Daemon:
        node = self.topology().nodes[k - 1]
        url = pat.center_url(self.topology(), node, self.secrets())
        argv = [
            *self._in_ns(k),
            str(self.bin / "aecp"), "center", "run",
            "--data-dir", str(self.base(k) / "center"),
            "--address", "0.0.0.0", "--port", str(CENTER_PORT),
            "--database-url-file", str(self._write_db_url(k, url)),
            "--ha-patroni-url", f"http://{node.ha_ip}:8008",
            "--ha-management-ip", self.management_address,
            "--ha-status-url", f"http://{node.ha_ip}:{AGENT_PORT}/status",
            "--ha-status-token-file", str(self.root / "agent-token"),
        ]  # fmt: skip
        return Daemon(argv, self.base(k) / "center.pid", self.base(k) / "center.log", "center")

    def _write_db_url(self, k: int, url: str) -> Path:
        path = self.base(k) / "center" / "database-url"
        pat.write_text(path, url)
        pat.write_text(self.root / "agent-token", self.secrets().agent)
        return path

    def start_node(self, k: int) -> None:
        """Start every process of node k that is not running."""
        role = self.topology().nodes[k - 1].role
        member = self.etcd(k)
        if not member.is_running():
            member.start(self.topology().initial_cluster(), token=self.topology().cluster_id)
        if role is not Role.WITNESS:
            self.patroni(k).start(env={"HOME": str(self.base(k))})
        self.agent(k).start()
        if role is not Role.WITNESS:
            self.center(k).start()

    async def start(self, timeout: float = 60.0) -> None:
        """Start the trio: the active first, and once its PostgreSQL is the primary (it made the
        cluster) the passive and the witness, so the configured active is the first active."""
        self.start_node(1)
        for k in (2, 3):
            member = self.etcd(k)
            if not member.is_running():
                member.start(self.topology().initial_cluster(), token=self.topology().cluster_id)
        await self._wait_primary(1, timeout)
        self.start_node(2)
        self.start_node(3)

    async def _wait_primary(self, k: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        url = f"http://{self.plan.address('ha', k)}:{PATRONI_PORT}/primary"
        async with httpx.AsyncClient(trust_env=False) as http:
            while loop.time() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url, timeout=1.0)).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise Unavailable(f"{self.plan.name(k)} did not become the primary in {timeout:.0f} s")

    def node_pids(self, k: int) -> list[int]:
        """Every process in node k's namespace."""
        try:
            target = os.stat(f"/run/netns/{self.plan.namespace(k)}").st_ino
        except FileNotFoundError:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                        pids.append(int(entry))
                except OSError:
                    continue
        return pids

    def kill_node(self, k: int) -> list[int]:
        """``SIGKILL`` every process of node k (its host crashed); returns their pids."""
        pids = self.node_pids(k)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:  # reap the ones this process started
            if not labetcd.reap(pid):
                wait_gone(pid, 5.0)
        if k in self._members:
            self._members[k].kill()
        for pidfile in self.base(k).glob("*.pid"):
            pidfile.unlink(missing_ok=True)
        (self.paths(k).etcd_data.parent / f"{self.plan.name(k)}.pid").unlink(missing_ok=True)
        return pids

    async def force_promote(self, k: int) -> None:
        """Make node k's etcd member a cluster of one (``--force-new-cluster``): with the quorum
        it then has alone, its Patroni takes the leader key once the old lease runs out, if it
        is the synchronous standby named in ``/sync``. The caller has checked that the active
        and the witness are gone; the other two members must be rebuilt before they rejoin."""
        member = self.etcd(k)
        member.stop()
        member.start(
            self.topology().initial_cluster(),
            token=self.topology().cluster_id,
            extra=["--force-new-cluster"],
        )

    async def cut(self, k: int, links: tuple[Link, ...] = ("ha",)) -> None:
        for link in links:
            await rootops.link_down(self.plan.host_veth(k, link))

    async def restore(self, k: int, links: tuple[Link, ...] = LINKS) -> None:
        for link in links:
            await rootops.link_up(self.plan.host_veth(k, link))

    # -- readings --------------------------------------------------------------------------

    async def status(self, k: int, http: httpx.AsyncClient) -> HAStatus:
        """The trio's status as node k's agent sees it (``Unavailable`` if it does not answer)."""
        url = f"http://{self.plan.address('ha', k)}:{AGENT_PORT}/status"
        try:
            r = await http.get(url, headers=self.agent_auth(), timeout=2.0)
        except httpx.HTTPError as e:
            raise Unavailable(f"the agent of {self.plan.name(k)} does not answer: {e}") from None
        if r.status_code != 200:
            raise Unavailable(f"the agent of {self.plan.name(k)} answered {r.status_code}")
        return HAStatus.model_validate(r.json())

    def agent_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets().agent}"}

    async def holders(self) -> list[int]:
        """The nodes whose namespace holds the management IP now (read from the kernel)."""
        out = []
        address = self.management_address
        for k in (1, 2, 3):
            ns = self.plan.namespace(k)
            if not Path(f"/run/netns/{ns}").exists():
                continue
            found = await rootops.addr_list(netns=ns)
            if any(cidr.split("/")[0] == address for _, cidr in found):
                out.append(k)
        return out

    async def wait_ready(self, timeout: float = 120.0) -> HAStatus:
        """Wait until the trio has an active with a standby in sync, the management IP on the
        active, and the center answering through it; returns the status then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Any = None
        async with httpx.AsyncClient(trust_env=False) as http:
            while loop.time() < deadline:
                for k in (3, 1, 2):
                    try:
                        st = await self.status(k, http)
                    except Unavailable as e:
                        last = e
                        continue
                    last = st
                    ready = st.leader and st.rpo.kind == "in_sync" and len(st.ip_holders) == 1
                    if ready and await _center_answers(http, self.center_url):
                        return st
                    break
                await asyncio.sleep(0.2)
        raise Unavailable(f"the trio is not ready after {timeout:.0f} s; last reading: {last}")


async def _center_answers(http: httpx.AsyncClient, url: str) -> bool:
    try:
        r = await http.get(f"{url}/healthz", timeout=2.0)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def ha_venv(python: Path) -> Path:
    """Patroni's virtual environment (``make ha-venv``): ``.venv-ha`` beside the venv of
    ``python``; ``InvalidInput`` saying how to make it if it is missing."""
    venv = Path(python).parent.parent
    found = venv.parent / ".venv-ha"
    if not (found / "bin" / "patroni").exists():
        raise InvalidInput("patroni", f"{found}/bin/patroni is missing: run make ha-venv")
    return found


def new_plan(lab_id: str | None = None, **kw: Any) -> TrioPlan:
    """A plan with a fresh short id (3 hex digits keep interface names under 15 characters)."""
    if lab_id is not None and not lab_id.isalnum():
        raise InvalidInput("lab_id", "letters and digits only")
    return TrioPlan(lab_id or tokens.token_hex(2)[:3], **kw)
