"""The all-in-one lab: N nodes on this machine, node k on loopback address ``<subnet>.k`` with its
own data directory; the first three also run an etcd member. With ``netns`` (root only) node k
runs in a network namespace of its own instead, with a management and a storage network
(``lab.netns``): its API on the management address, etcd, replicas, NBD and migration on the
storage address. Usable from the CLI
(``aecp lab ...``, one process per command: all state is in ``<root>/lab.json`` and pidfiles)
and from tests (the same class).

Layout of ``root``::

    lab.json  token  cli.json  images/  etcd/  pki/  nodes/<node>/{node.json,agent.log,...,data/}

In the netns lab the storage server reads ``nodes/<node>/storage.json``: ``node.json`` with the
storage address as the node's address (the storage server binds and registers that address).

``pki/`` is the cluster's certificate authority (``common.pki``): created by ``up`` with a
bundle per node (its etcd member, its processes' etcd client, replica and NBD credentials) and
one for the ``admin`` role (the lab's own tools: initialising the cluster, tests).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, Field, field_validator

from aecp.cluster.principals import first_admin
from aecp.common.errors import InvalidInput, NotFound, Unavailable
from aecp.common.pki import ClusterCA
from aecp.common.proc import pid_alive, read_pidfile
from aecp.conf import settings
from aecp.conf.settings import NodeSettings
from aecp.lab import netns
from aecp.lab.etcd import EtcdCluster, EtcdMember, loopback_sans
from aecp.lab.netns import NetnsPlan, Network
from aecp.lab.process import Daemon, kill_pidfiles
from aecp.model.cluster import ClusterInfo, new_cluster_id
from aecp.model.principal import FIRST_ADMIN, new_principal_token
from aecp.network import bridges, rootops
from aecp.network.rootops import in_netns
from aecp.store import keys
from aecp.store.etcd import EtcdStore

ETCD_MEMBERS = 3
NBD_PORT = 10809
Progress = Callable[[str], None]


def default_root() -> Path:
    env = os.environ.get("AECP_LAB_DIR")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "aecp" / "lab"


class LabSpec(BaseModel):
    """How the lab is laid out; saved in lab.json."""

    nodes: int = Field(3, ge=1, le=9)
    subnet: str = "127.0.1"
    api_port: int = 8700
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    lease_ttl: int = 5
    fence_margin: float = 1.0
    resync_interval: float = 2.0
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    etcd_mode: Literal["all", "local"] = "all"
    node_memory_mib: int | None = None
    node_cpus: int | None = None
    cluster_name: str = "lab"
    extent_mib: int = 64
    recovery_grace_s: float = 10.0
    #: space each storage server offers (None: its disk's, which the lab's nodes share, so
    #: the cluster's raw capacity counts that disk once per node)
    capacity_gib: int | None = Field(None, ge=1)
    storage: bool = True
    #: each node in a network namespace of its own, on a management and a storage network
    netns: bool = False
    #: the netns lab's short id (namespace, bridge and veth names); made by ``up``
    lab_id: str = Field("", pattern=r"^[a-z0-9]{0,6}$")
    mgmt_cidr: str = "10.231.0.0/24"
    storage_cidr: str = "10.231.1.0/24"

    @field_validator("mgmt_cidr", "storage_cidr")
    @classmethod
    def _lab_subnet(cls, v: str) -> str:
        net = ipaddress.IPv4Network(v)  # ValueError: not a network (or host bits set)
        if not 16 <= net.prefixlen <= 24:
            raise ValueError(f"{v}: the prefix length must be 16 to 24 (hosts .1-.9 and .254)")
        return str(net)

    @field_validator("subnet")
    @classmethod
    def _loopback_subnet(cls, v: str) -> str:
        parts = v.split(".")
        if (
            len(parts) != 3
            or parts[0] != "127"
            or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts)
        ):
            raise ValueError(f"{v!r} is not a loopback prefix like 127.0.1")
        return v

    def address(self, k: int) -> str:
        """Node k's address: its API's and the one the lab host reaches it on (the management
        address in the netns lab)."""
        if self.netns:
            return self.plan().address("mgmt", k)
        return f"{self.subnet}.{k}"

    def storage_address(self, k: int) -> str:
        """Node k's etcd, replica, NBD and migration address (``address`` on loopback)."""
        if self.netns:
            return self.plan().address("storage", k)
        return self.address(k)

    def plan(self) -> NetnsPlan:
        """The netns lab's names and addresses."""
        return NetnsPlan(self.lab_id, self.nodes, self.mgmt_cidr, self.storage_cidr)


class Lab:
    """One lab under ``root``. Methods are safe to call from a fresh process."""

    def __init__(self, root: Path, spec: LabSpec) -> None:
        self.root = root
        self.spec = spec
        self.images_dir = root / "images"
        self.token_file = root / "token"
        self.ca = ClusterCA(root / "pki")
        self._etcd: EtcdCluster | None = None

    @classmethod
    def open(cls, root: Path | None = None) -> Lab:
        """The lab at ``root``; where a multi-cluster lab (``lab.site``) lives, the cluster its
        ``cli.json`` names (``lab_root``: c1)."""
        root = root or default_root()
        if not (root / "lab.json").exists():
            root = _pointed_at(root)
        try:
            spec = LabSpec.model_validate_json((root / "lab.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"no lab at {root} (start one with: aecp lab up)") from None
        return cls(root, spec)

    # ---- naming ----------------------------------------------------------------------------
    @property
    def node_names(self) -> list[str]:
        return [f"node{k}" for k in range(1, self.spec.nodes + 1)]

    def index(self, name: str) -> int:
        if name not in self.node_names:
            raise InvalidInput("node", f"no node {name} in this lab ({', '.join(self.node_names)})")
        return int(name.removeprefix("node"))

    def node_dir(self, name: str) -> Path:
        return self.root / "nodes" / name

    def mgmt_address(self, name: str) -> str:
        """The node's management address (API; its loopback address outside the netns lab)."""
        return self.spec.address(self.index(name))

    def storage_address(self, name: str) -> str:
        """The node's storage address (etcd, replicas, NBD, migration)."""
        return self.spec.storage_address(self.index(name))

    def namespace(self, name: str) -> str | None:
        """The node's network namespace (None outside the netns lab)."""
        return self.spec.plan().namespace(self.index(name)) if self.spec.netns else None

    def _launch(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` as started for node ``name``: inside its namespace in the netns lab."""
        ns = self.namespace(name)
        return in_netns(ns, argv) if ns is not None else argv

    def api_url(self, name: str) -> str:
        return f"http://{self.spec.address(self.index(name))}:{self.spec.api_port}"

    def api_urls(self) -> list[str]:
        return [self.api_url(n) for n in self.node_names]

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def node_settings(self, name: str) -> NodeSettings:
        """The settings the node's processes run with (its ``node.json``)."""
        return settings.load(self.node_dir(name) / "node.json")

    def etcd_cluster(self) -> EtcdCluster:
        """The lab's etcd members (one object per lab, so members started here are tracked)."""
        if self._etcd is None:
            self._etcd = self._make_etcd_cluster()
        return self._etcd

    def _make_etcd_cluster(self) -> EtcdCluster:
        count = min(ETCD_MEMBERS, self.spec.nodes)
        hosts = [self.spec.storage_address(k) for k in range(1, count + 1)]
        nodes = self.node_names[:count]
        return EtcdCluster.on_loopback(
            self.root / "etcd",
            hosts,
            self.ca,
            nodes=nodes,
            client_port=self.spec.etcd_client_port,
            peer_port=self.spec.etcd_peer_port,
            launch_prefixes=[self._launch(n, []) for n in nodes],
        )

    def etcd_member(self, name: str) -> EtcdMember | None:
        k = self.index(name)
        return self.etcd_cluster().members[k - 1] if k <= ETCD_MEMBERS else None

    def agent(self, name: str) -> Daemon:
        d = self.node_dir(name)
        cfg = d / "node.json"
        argv = [sys.executable, "-m", "aecp", "node", "run", "--config", str(cfg)]
        return Daemon(self._launch(name, argv), d / "agent.pid", d / "agent.log", marker=str(cfg))

    def storage(self, name: str) -> Daemon:
        d = self.node_dir(name)
        cfg = d / ("storage.json" if self.spec.netns else "node.json")
        argv = [sys.executable, "-m", "aecp", "storage", "run", "--config", str(cfg)]
        return Daemon(
            self._launch(name, argv), d / "storage.pid", d / "storage.log", marker=str(cfg)
        )

    def daemons(self, name: str) -> list[Daemon]:
        """The node's processes other than QEMU and etcd: agent, then storage server."""
        return [self.agent(name)] + ([self.storage(name)] if self.spec.storage else [])

    def _stop_vm_networks(self, name: str) -> None:
        """Stop node ``name``'s DHCP servers of VM networks (they outlive its agent by design)
        and, outside the netns lab (whose namespaces take its links with them), remove its
        network bridges and their taps."""
        networks = self.node_dir(name) / "data" / "networks"
        pidfiles = sorted(networks.glob("*/dnsmasq.pid"))
        kill_pidfiles(pidfiles, {pf: str(pf) for pf in pidfiles})
        if not self.spec.netns and os.geteuid() == 0:
            names = _realised_bridges(networks)
            if names:
                netns.run_sync(lambda: _remove_bridges(names))

    def qemu_pidfiles(self, name: str) -> dict[Path, str]:
        run = self.node_dir(name) / "data" / "run"
        return {pf: f"guest={pf.parent.name}" for pf in run.glob("*/qemu.pid")}

    # ---- up --------------------------------------------------------------------------------
    async def up(self, progress: Progress = lambda _: None, image: Path | None = None) -> None:
        """Start etcd, initialise the cluster, start every node agent, wait until all are ready,
        then import ``image`` (the tiny guest image) as image ``tiny``.

        ``image`` is also the KVM probe's guest. Raises ``InvalidInput`` if a lab already exists
        at ``root``, or for a netns lab when not root. The netns lab's networks are made after
        ``lab.json`` is written, so ``down`` removes them whatever fails later.
        """
        if (self.root / "lab.json").exists() or (self.root / "site.json").exists():
            raise InvalidInput(
                "root", f"a lab already exists at {self.root}; run 'aecp lab down' first"
            )
        if self.spec.netns:
            netns.require_root()
            if not self.spec.lab_id:
                self.spec = self.spec.model_copy(update={"lab_id": secrets.token_hex(2)})
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "lab.json").write_text(self.spec.model_dump_json(indent=2))
        self.images_dir.mkdir(exist_ok=True)
        if self.spec.netns:
            progress("creating the namespaces, bridges and veths of the netns lab")
            await netns.create(self.spec.plan())
        progress("creating the cluster's certificate authority")
        self._issue_credentials()
        progress("starting etcd")
        cluster = self.etcd_cluster()
        await cluster.start()
        progress("initialising the cluster")
        await self._init_cluster(cluster.client_endpoints())
        for name in self.node_names:
            self._write_node_settings(name, image)
        progress(f"starting {self.spec.nodes} nodes (agent and storage server each)")
        for name in self.node_names:
            for d in self.daemons(name):
                d.start()
        await self.wait_ready(progress)
        if image is not None:
            progress("importing the tiny image")
            await self.import_image("tiny", image)

    def _issue_credentials(self) -> None:
        """The cluster CA, a bundle per node and one for the lab's own tools (``admin``)."""
        ClusterCA.create(self.ca.root, self.spec.cluster_name)
        for name in self.node_names:
            k = self.index(name)
            if self.spec.netns:  # etcd checks a peer's certificate against its source address
                sans = [self.spec.address(k), self.spec.storage_address(k)]
            else:
                sans = loopback_sans(self.spec.address(k))
            self.ca.issue_node(name, sans)
        self.ca.issue_client("admin")

    async def import_image(self, name: str, path: Path) -> None:
        """Upload ``path`` through the API as image ``name``."""
        headers = {"authorization": f"Bearer {self.token()}"}
        async with httpx.AsyncClient(timeout=120, headers=headers) as c:
            r = await c.put(
                f"{self.api_urls()[0]}/v1/images/{name}",
                params={"source": path.name},
                content=path.read_bytes(),
            )
        if r.status_code != 201:
            raise Unavailable(f"importing image {name} failed: {r.text[:300]}")

    async def _init_cluster(self, endpoints: list[str]) -> None:
        token, digest = new_principal_token(FIRST_ADMIN)
        self.token_file.touch(mode=0o600)
        self.token_file.write_text(token + "\n")
        now = time.time()
        info = ClusterInfo(name=self.spec.cluster_name, created_at=now, id=new_cluster_id())
        store = EtcdStore(endpoints, tls=self.etcd_cluster().client_tls)
        try:
            await store.put(keys.CLUSTER, info.dump())
            await store.put(keys.principal(FIRST_ADMIN), first_admin(digest, now).dump())
        finally:
            await store.close()
        (self.root / "cli.json").write_text(
            json.dumps({"api": self.api_urls(), "token_file": str(self.token_file)}, indent=2)
        )

    def _endpoints_for(self, name: str) -> list[str]:
        all_eps = self.etcd_cluster().client_endpoints()
        member = self.etcd_member(name)
        if self.spec.etcd_mode == "local" and member is not None:
            return [member.client_address]
        if member is not None:  # local member first, others for failover
            return [member.client_address] + [e for e in all_eps if e != member.client_address]
        return all_eps

    def _write_node_settings(self, name: str, probe_image: Path | None) -> None:
        d = self.node_dir(name)
        (d / "data").mkdir(parents=True, exist_ok=True)
        storage: dict[str, object] = {
            "extent_mib": self.spec.extent_mib,
            "recovery_grace_s": self.spec.recovery_grace_s,
            "recovery_interval_s": 1.0,
            "scrub_interval_s": 30.0,
        }
        if self.spec.capacity_gib is not None:
            storage["capacity_gib"] = self.spec.capacity_gib
        s: dict[str, object] = {
            "name": name,
            "address": self.spec.address(self.index(name)),
            "data_dir": str(d / "data"),
            "images_dir": str(self.images_dir),
            "store": {"endpoints": self._endpoints_for(name)},
            "agent": {
                "lease_ttl": self.spec.lease_ttl,
                "fence_margin": self.spec.fence_margin,
                "resync_interval": self.spec.resync_interval,
            },
            "compute": {
                "accel": self.spec.accel,
                "memory_mib": self.spec.node_memory_mib,
                "cpus": self.spec.node_cpus,
                "probe_image": str(probe_image) if probe_image else None,
            },
            "api": {"port": self.spec.api_port},
            "security": {"tls_dir": str(self.ca.node_bundle(name).dir)},
            "storage": storage,
        }
        if self.spec.netns:
            self._netns_settings(name, s, storage)
        (d / "node.json").write_text(json.dumps(s, indent=2))

    def _netns_settings(self, name: str, s: dict[str, object], storage: dict[str, object]) -> None:
        """The netns lab's additions to ``s`` (the node's settings); writes ``storage.json``,
        the storage server's: the same with the storage address as the node's address."""
        address = self.storage_address(name)
        storage["address"] = address
        compute = s["compute"]
        assert isinstance(compute, dict)
        compute["migration_address"] = address
        s["network"] = {"vm_uplink": netns.NODE_IFACE["vm"]}
        own = {**s, "address": address}
        (self.node_dir(name) / "storage.json").write_text(json.dumps(own, indent=2))

    async def wait_ready(self, progress: Progress = lambda _: None, timeout: float = 120) -> None:
        """Wait until every node answers its API and shows as ready."""
        deadline = time.monotonic() + timeout
        ready: set[str] = set()
        while time.monotonic() < deadline:
            ready = await self._ready_nodes()
            if ready >= set(self.node_names):
                progress("all nodes ready")
                return
            for name in self.node_names:
                for d in self.daemons(name):
                    if name not in ready and not d.is_running():
                        raise Unavailable(f"{name}: a daemon exited; see {d.log_file}")
            await asyncio.sleep(0.3)
        missing = sorted(set(self.node_names) - ready)
        raise Unavailable(f"nodes not ready after {timeout:.0f}s: {', '.join(missing)}")

    async def _ready_nodes(self) -> set[str]:
        """Nodes that are ready in the cluster's view AND answer on their own API."""
        headers = {"authorization": f"Bearer {self.token()}"}
        ready: set[str] = set()
        async with httpx.AsyncClient(timeout=3, headers=headers) as c:
            for name in self.node_names:
                try:
                    r = await c.get(self.api_url(name) + "/v1/nodes")
                except httpx.HTTPError:
                    continue
                if r.status_code != 200:
                    continue
                states = {n["name"]: n["state"] for n in r.json()}
                if states.get(name) == "ready" and await self._storage_ready(name):
                    ready.add(name)
        return ready

    async def _storage_ready(self, name: str) -> bool:
        """The node's NBD port accepts connections (or the lab runs no storage)."""
        if not self.spec.storage:
            return True
        try:
            _, writer = await asyncio.open_connection(self.storage_address(name), NBD_PORT)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    # ---- faults ----------------------------------------------------------------------------
    def kill_agent(self, name: str) -> None:
        """SIGKILL the node agent only (its VMs keep running)."""
        self.agent(name).kill()

    def start_agent(self, name: str) -> None:
        self.index(name)
        self.agent(name).start()

    def kill_etcd(self, name: str) -> None:
        member = self.etcd_member(name)
        if member is None:
            raise InvalidInput("node", f"{name} runs no etcd member")
        member.kill()

    def start_etcd(self, name: str) -> None:
        member = self.etcd_member(name)
        if member is None:
            raise InvalidInput("node", f"{name} runs no etcd member")
        member.start(self.etcd_cluster().initial_cluster())

    def kill_storage(self, name: str) -> None:
        """SIGKILL the node's storage server only."""
        self.storage(name).kill()

    def start_storage(self, name: str) -> None:
        self.index(name)
        self.storage(name).start()

    def kill_node(self, name: str) -> list[int]:
        """A power loss: SIGKILL the agent, storage server, VMs and etcd member."""
        for d in self.daemons(name):
            d.kill()
        pids = kill_pidfiles(list(self.qemu_pidfiles(name)), self.qemu_pidfiles(name))
        member = self.etcd_member(name)
        if member is not None:
            member.kill()
        return pids

    def start_node(self, name: str) -> None:
        """Boot a killed node again: its etcd member, then its agent."""
        member = self.etcd_member(name)
        if member is not None and not member.is_running():
            member.start(self.etcd_cluster().initial_cluster())
        for d in self.daemons(name):
            d.start()

    async def cut(self, name: str, network: Network) -> None:
        """Cut node ``name`` off one network of the netns lab (its veth's host end down)."""
        await netns.cut(self._plan_for(name), self.index(name), network)

    async def restore(self, name: str, network: Network) -> None:
        """Undo ``cut``."""
        await netns.restore(self._plan_for(name), self.index(name), network)

    def _plan_for(self, name: str) -> NetnsPlan:
        if not self.spec.netns:
            raise InvalidInput("netns", "only the netns lab (aecp lab up --netns) has networks")
        self.index(name)
        return self.spec.plan()

    # ---- status and down -------------------------------------------------------------------
    def status(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for name in self.node_names:
            member = self.etcd_member(name)
            rows.append(
                {
                    "node": name,
                    "address": self.spec.address(self.index(name)),
                    "api": self.api_url(name),
                    "agent_pid": self.agent(name).pid(),
                    "storage_pid": self.storage(name).pid() if self.spec.storage else None,
                    "etcd_pid": member.pid() if member else None,
                    "etcd": member.client_address if member else "",
                    "vms_running": len([p for p in self.qemu_pidfiles(name) if _live(p)]),
                }
            )
            if self.spec.netns:
                rows[-1]["storage_address"] = self.storage_address(name)
                rows[-1]["netns"] = self.namespace(name)
        return rows

    def processes(self) -> list[int]:
        """Every live process this lab started (agents, QEMU, etcd)."""
        pids = []
        for name in self.node_names:
            pids += [p for d in self.daemons(name) if (p := d.pid())]
            pids += [p for pf in self.qemu_pidfiles(name) if (p := _live(pf))]
        pids += [p for m in self.etcd_cluster().members if (p := m.pid())]
        return pids

    def down(self) -> list[int]:
        """Stop everything the lab started, remove the netns lab's namespaces, bridges and veths
        (those that exist: idempotent, also after a crash) and the lab's directory. Returns the
        pids stopped."""
        stopped = self.processes()
        try:
            for name in self.node_names:
                for d in self.daemons(name):
                    d.stop()
            for name in self.node_names:
                pf = self.qemu_pidfiles(name)
                kill_pidfiles(list(pf), pf)
                self._stop_vm_networks(name)
            self.etcd_cluster().stop()
        finally:
            if self.spec.netns and self.spec.lab_id:
                plan = self.spec.plan()
                netns.run_sync(lambda: netns.destroy(plan))
        left = [p for p in stopped if pid_alive(p)]
        if left:
            raise Unavailable(f"processes still alive after lab down: {left}")
        _rmtree(self.root)
        return stopped


def _realised_bridges(networks: Path) -> list[str]:
    out = []
    for rec in sorted(networks.glob("*/realised.json")):
        try:
            bridge = json.loads(rec.read_text()).get("bridge")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(bridge, str) and bridge:
            out.append(bridge)
    return out


async def _remove_bridges(names: list[str]) -> None:
    """Delete the VM network bridges ``names`` and the taps still on them (their QEMUs are
    gone). The loopback lab's nodes share the host's namespace, so only these, by name."""
    for tap in bridges.links_here("vt"):
        if bridges.master(tap) in names:
            await bridges.remove_tap(tap)
    for name in names:
        await rootops.link_delete(name)


def _pointed_at(root: Path) -> Path:
    """The lab ``root/cli.json`` names as ``lab_root``, else ``root`` itself."""
    try:
        cfg = json.loads((root / "cli.json").read_text())
    except (OSError, ValueError):
        return root
    pointed = cfg.get("lab_root") if isinstance(cfg, dict) else None
    return Path(pointed) if isinstance(pointed, str) and pointed else root


def _live(pidfile: Path) -> int | None:
    return read_pidfile(pidfile)


def _rmtree(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
