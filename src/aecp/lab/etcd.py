"""etcd members as local processes, for the lab harness and the integration tests.

Owns: the etcd command line (a pure function of a member, its cluster and the lab tuning),
with TLS on the client and peer URLs and client certificates required on both (every member
presents its node's bundle from the cluster CA, ``common.pki``);
starting a member detached from us (own session, output in a log file, pid in a pidfile beside
its data dir) so it outlives the process that started it; stopping it (SIGTERM, then SIGKILL on
timeout), crashing it (SIGKILL), freezing it (SIGSTOP/SIGCONT); and bringing a cluster up and
waiting until every member answers a read.

Lifecycle of a member: stopped → ``start()`` → running → ``stop()`` / ``kill()`` → stopped. A
member whose data dir already holds etcd state restarts with ``--initial-cluster-state
existing`` and keeps its data. A member started by another process (for example an earlier
``aecp lab`` command) is found through its pidfile and can be stopped or killed from here.

Starting and stopping are plain synchronous subprocess calls; waiting for health is async.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aecp.common.errors import InvalidState, StoreUnavailable
from aecp.common.pki import Bundle, ClusterCA
from aecp.common.proc import CommandFailed, pid_alive, pid_cmdline, read_pidfile
from aecp.store.etcd import DEFAULT_TIMEOUT, EtcdStore

ETCD_BINARY = "/usr/bin/etcd"

ClusterState = Literal["new", "existing"]
# every member started by this process, kept until it is reaped: a member object may be dropped
# while its etcd runs on (a command that started it and returned), and its Popen must not be
# collected with it while the process lives
_STARTED: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class EtcdTuning:
    """etcd settings for a lab on one machine: fast elections, small snapshots and quota."""

    heartbeat_ms: int = 100
    election_ms: int = 1000
    snapshot_count: int = 10_000
    quota_backend_bytes: int = 512 * 1024 * 1024
    compaction_retention_revisions: int = 100_000
    log_level: str = "warn"


def reap(pid: int, timeout: float = 5.0) -> bool:
    """Wait for ``pid`` if it is an etcd member this process started (True once reaped);
    False for any other pid."""
    proc = _STARTED.get(pid)
    if proc is None:
        return False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    _STARTED.pop(pid, None)
    return True


def etcd_argv(
    member: EtcdMember,
    *,
    initial_cluster: str,
    token: str,
    state: ClusterState,
    tuning: EtcdTuning,
    binary: str = ETCD_BINARY,
) -> list[str]:
    """The etcd command line for ``member`` (pure: no file or process is touched)."""
    tls = member.tls
    return [
        binary,
        "--name", member.name,
        "--data-dir", str(member.data_dir),
        "--listen-client-urls", member.client_url,
        "--advertise-client-urls", member.client_url,
        "--listen-peer-urls", member.peer_url,
        "--initial-advertise-peer-urls", member.peer_url,
        "--initial-cluster", initial_cluster,
        "--initial-cluster-token", token,
        "--initial-cluster-state", state,
        "--heartbeat-interval", str(tuning.heartbeat_ms),
        "--election-timeout", str(tuning.election_ms),
        "--snapshot-count", str(tuning.snapshot_count),
        "--quota-backend-bytes", str(tuning.quota_backend_bytes),
        "--auto-compaction-mode", "revision",
        "--auto-compaction-retention", str(tuning.compaction_retention_revisions),
        "--logger", "zap",
        "--log-level", tuning.log_level,
        "--cert-file", str(tls.cert_file),
        "--key-file", str(tls.key_file),
        "--trusted-ca-file", str(tls.ca_file),
        "--client-cert-auth",
        "--peer-cert-file", str(tls.cert_file),
        "--peer-key-file", str(tls.key_file),
        "--peer-trusted-ca-file", str(tls.ca_file),
        "--peer-client-cert-auth",
    ]  # fmt: skip


class EtcdMember:
    """One etcd process: its name, addresses (``host:port``), data dir, log file, pidfile and
    TLS bundle (its node's: the certificate names the member's address and
    ``pki.ETCD_SERVER_NAME``). ``launch_prefix`` is put in front of the etcd command line
    (``ip netns exec NS``, which execs etcd in place: the pid stays etcd's).

    The pidfile (``<name>.pid``) and, by default, the log file (``<name>.log``) live in the data
    dir's parent.
    """

    def __init__(
        self,
        name: str,
        client_address: str,
        peer_address: str,
        data_dir: Path,
        tls: Bundle,
        log_file: Path | None = None,
        *,
        tuning: EtcdTuning | None = None,
        binary: str = ETCD_BINARY,
        launch_prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.client_address = client_address
        self.peer_address = peer_address
        self.data_dir = Path(data_dir)
        self.tls = tls
        self.log_file = log_file or self.data_dir.parent / f"{name}.log"
        self.pidfile = self.data_dir.parent / f"{name}.pid"
        self.tuning = tuning or EtcdTuning()
        self.binary = binary
        self.launch_prefix = list(launch_prefix)  # e.g. ``ip netns exec NS`` (the netns lab)
        self.argv: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"EtcdMember({self.name} at {self.client_address})"

    @property
    def client_url(self) -> str:
        return f"https://{self.client_address}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.peer_address}"

    def initial_cluster_state(self) -> ClusterState:
        """``existing`` once the data dir holds etcd state (a restart), else ``new``."""
        return "existing" if (self.data_dir / "member").is_dir() else "new"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(
        self, initial_cluster: str, *, token: str = "aecp-lab", extra: Sequence[str] = ()
    ) -> None:
        """Launch etcd detached (own session), output appended to the log file, pid written to
        the pidfile; ``extra`` flags go at the end (``--force-new-cluster``). Raises
        ``InvalidState`` if this member is already running. Returns at once: use
        ``EtcdCluster.wait_healthy`` to know when it serves."""
        if self.is_running():
            raise InvalidState(f"etcd member {self.name} is already running", member=self.name)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.argv = (
            self.launch_prefix
            + etcd_argv(
                self,
                initial_cluster=initial_cluster,
                token=token,
                state=self.initial_cluster_state(),
                tuning=self.tuning,
                binary=self.binary,
            )
            + list(extra)
        )
        with self.log_file.open("ab") as log:
            log.write(f"--- {time.strftime('%F %T')} starting: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _STARTED[self._proc.pid] = self._proc
        self.pidfile.write_text(f"{self._proc.pid}\n")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd: SIGTERM (and SIGCONT, in case it is frozen), then SIGKILL if it is still
        alive after ``timeout`` seconds. Always removes the pidfile. No error if not running."""
        if self._signal(signal.SIGTERM):
            self._signal(signal.SIGCONT)
            if not self._wait_exit(timeout):
                self._signal(signal.SIGKILL)
                self._wait_exit(timeout)
        self._forget()

    def kill(self) -> None:
        """Crash etcd: SIGKILL, no chance to clean up (its data dir stays as it was)."""
        if self._signal(signal.SIGKILL):
            self._wait_exit(10.0)
        self._forget()

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): it keeps its sockets open but answers nothing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause`` (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def is_running(self) -> bool:
        return self.pid() is not None

    def pid(self) -> int | None:
        """The pid of this member's etcd if it is alive: ours, or the one its pidfile names
        (only if that process is an etcd on this data dir)."""
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        pid = read_pidfile(self.pidfile)
        if pid is not None and str(self.data_dir) in pid_cmdline(pid):
            return pid
        return None

    def exit_code(self) -> int | None:
        """The exit code if we started this member and it has exited, else None."""
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def launch_failure(self) -> CommandFailed:
        """The error describing a member that exited when it should have been serving."""
        code = self.exit_code()
        return CommandFailed(
            self.argv or [self.binary], -1 if code is None else code, self.log_tail()
        )

    # -- helpers -------------------------------------------------------------------------------

    def _signal(self, sig: signal.Signals) -> bool:
        """Send ``sig`` to the running etcd; False if there is none."""
        pid = self.pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            if self._proc is not None:
                self._proc.send_signal(sig)
            else:
                os.kill(pid, sig)
        return True

    def _wait_exit(self, timeout: float) -> bool:
        proc = self._proc or _STARTED.get(read_pidfile(self.pidfile) or -1)
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            _STARTED.pop(proc.pid, None)
            return True
        pid = read_pidfile(self.pidfile)
        deadline = time.monotonic() + timeout
        while pid is not None and pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _forget(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._proc = None
        self.pidfile.unlink(missing_ok=True)


class EtcdCluster:
    """A set of members forming one etcd cluster (``--initial-cluster`` lists them all), and the
    bundle its clients present (``client_tls``)."""

    def __init__(
        self, members: Sequence[EtcdMember], *, client_tls: Bundle, token: str = "aecp-lab"
    ) -> None:
        if not members:
            raise ValueError("an etcd cluster needs at least one member")
        self.members = list(members)
        self.client_tls = client_tls
        self.token = token

    @classmethod
    def on_loopback(
        cls,
        base_dir: Path,
        hosts: Sequence[str],
        ca: ClusterCA,
        *,
        nodes: Sequence[str] | None = None,
        client_role: str = "admin",
        client_port: int = 2379,
        peer_port: int = 2380,
        token: str = "aecp-lab",
        tuning: EtcdTuning | None = None,
        launch_prefixes: Sequence[Sequence[str]] | None = None,
    ) -> EtcdCluster:
        """Members ``etcd1..N`` on the given loopback addresses (one address each), with data
        dirs, logs and pidfiles under ``base_dir``. Member i presents the bundle of node
        ``nodes[i]`` (default ``etcd<i>``) and clients the ``client_role`` bundle, each issued
        by ``ca`` if missing. ``launch_prefixes[i]`` (the netns lab: ``ip netns exec NS``)
        starts member i inside its node's network namespace, on that namespace's address."""
        names = list(nodes or [f"etcd{i}" for i in range(1, len(hosts) + 1)])
        prefixes = list(launch_prefixes or [[] for _ in hosts])
        members = [
            EtcdMember(
                f"etcd{i}",
                f"{host}:{client_port}",
                f"{host}:{peer_port}",
                Path(base_dir) / f"etcd{i}.data",
                _issued(ca.node_bundle(node)) or ca.issue_node(node, loopback_sans(host)),
                tuning=tuning,
                launch_prefix=prefix,
            )
            for i, (host, node, prefix) in enumerate(
                zip(hosts, names, prefixes, strict=True), start=1
            )
        ]
        client = _issued(ca.client_bundle(client_role)) or ca.issue_client(client_role)
        return cls(members, client_tls=client, token=token)

    def member(self, name: str) -> EtcdMember:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def client_endpoints(self) -> list[str]:
        """Every member's client address (``host:port``), in member order."""
        return [m.client_address for m in self.members]

    def client(
        self, endpoints: Sequence[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> EtcdStore:
        """A store on this cluster (every member, or ``endpoints``); the caller closes it."""
        endpoints = list(endpoints or self.client_endpoints())
        return EtcdStore(endpoints, tls=self.client_tls, timeout=timeout)

    def launch(self) -> list[EtcdMember]:
        """Start every member that is not running (synchronous); returns those started."""
        started = [m for m in self.members if not m.is_running()]
        for m in started:
            m.start(self.initial_cluster(), token=self.token)
        return started

    async def start(self, timeout: float = 30.0) -> None:
        """Start every member that is not running, then wait until each one answers a read.
        Idempotent. Raises ``CommandFailed`` (with the log tail) if a member exits meanwhile,
        ``StoreUnavailable`` if the cluster is not healthy within ``timeout`` seconds."""
        self.launch()
        await self.wait_healthy(timeout)

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every member answers a linearizable read (so a quorum and a leader exist)."""
        deadline = asyncio.get_running_loop().time() + timeout
        for m in self.members:
            await _wait_member_ready(m, self.client_tls, deadline)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every member (soft, then hard), even if stopping one of them fails."""
        errors: list[BaseException] = []
        for m in self.members:
            try:
                m.stop(timeout)
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def kill(self) -> None:
        """Crash every member (SIGKILL)."""
        for m in self.members:
            m.kill()


def loopback_sans(address: str) -> list[str]:
    """The IP addresses a loopback node's certificate names: its own and 127.0.0.1. etcd checks
    a peer's (and a client's) certificate against the address it connects *from*, and on
    loopback every connection comes from 127.0.0.1 whatever address it is aimed at."""
    return [address, "127.0.0.1"] if address != "127.0.0.1" else [address]


def _issued(bundle: Bundle) -> Bundle | None:
    """``bundle`` if it was issued already."""
    return bundle if bundle.cert_file.exists() else None


async def _wait_member_ready(member: EtcdMember, tls: Bundle, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    store = EtcdStore([member.client_address], tls=tls, timeout=1.0)
    try:
        while True:
            if not member.is_running():
                raise member.launch_failure()
            remaining = deadline - loop.time()
            try:
                await store.wait_ready(max(0.2, min(1.0, remaining)))
                return
            except StoreUnavailable:
                if loop.time() >= deadline:
                    raise
    finally:
        await store.close()
