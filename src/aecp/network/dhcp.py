"""A VM network's DHCP server on one node: ``dnsmasq`` (Debian's ``dnsmasq-base``) bound to the
network's bridge, answering only the MACs the cluster gave an address (static leases from a
hosts file written from the store), DNS off. Every node runs one per network with the same
hosts file, so a VM gets the same address on whichever node it runs.

Why it works without the gateway address on the bridge: dnsmasq needs an IPv4 address on the
interface it serves, inside the range's subnet or with the range's netmask given. Each node's
bridge holds its own address of the subnet as a /32 (handed out by the cluster from the top of
the subnet: see ``model.network``), so nodes joined by the VLAN never answer ARP for the same
address, and the host gains no route into the VM subnet. Measured here (dnsmasq 2.90): DISCOVER
and unicast RENEW are both answered on a /32; with no address dnsmasq logs "DHCP packet
received on X which has no address" and answers nothing. With ``--bind-interfaces`` and one
``--interface`` its DHCP socket is bound to that interface, so one dnsmasq per bridge coexists
with the others in one namespace.

Lifecycle: started as a daemon with a pid file in the network's state directory (it outlives
the agent, like QEMU; the next agent finds it by the pid file and its command line); the hosts
file is replaced atomically and dnsmasq told by SIGHUP; ``stop`` is SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
from collections.abc import Iterable
from pathlib import Path

from aecp.common.proc import arun, kill, pid_cmdline, read_pidfile, wait_pid_exit
from aecp.model.network import AddressHolder, NetworkRecord

log = logging.getLogger(__name__)
DNSMASQ = "/usr/sbin/dnsmasq"
LEASE_TIME = "1h"


def hosts_text(holders: Iterable[tuple[str, AddressHolder]]) -> str:
    """The dnsmasq ``--dhcp-hostsfile`` content: one ``mac,ip`` line per VM NIC, by address."""
    lines = sorted(
        (ipaddress.IPv4Address(ip), f"{h.mac},{ip}\n") for ip, h in holders if h.kind == "vm"
    )
    return "".join(line for _, line in lines)


def dnsmasq_argv(rec: NetworkRecord, bridge: str, state_dir: Path) -> list[str]:
    """The argv of the DHCP server of ``rec`` on ``bridge`` (pure)."""
    net = rec.net
    return [
        DNSMASQ,
        "--conf-file=/dev/null",  # nothing from /etc/dnsmasq.conf
        f"--pid-file={state_dir / 'dnsmasq.pid'}",
        f"--log-facility={state_dir / 'dnsmasq.log'}",
        f"--interface={bridge}",
        "--bind-interfaces",
        "--except-interface=lo",
        "--port=0",  # no DNS
        "--user=root",  # it re-reads the hosts file on SIGHUP, in a root-only directory
        "--leasefile-ro",  # static leases only: nothing to keep
        "--dhcp-authoritative",
        f"--dhcp-range={net.network_address},static,{net.netmask},{LEASE_TIME}",
        f"--dhcp-hostsfile={state_dir / 'hosts'}",
        f"--dhcp-option=option:router,{rec.gateway}",
        "--dhcp-option=option:dns-server",  # none offered (not this server: DNS is off)
    ]


class DhcpServer:
    """The dnsmasq of one network on this node, its files in ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.pidfile = state_dir / "dnsmasq.pid"
        self.hosts = state_dir / "hosts"

    def pid(self) -> int | None:
        """The pid of this network's dnsmasq, if it runs."""
        pid = read_pidfile(self.pidfile)
        if pid is None:
            return None
        cmd = pid_cmdline(pid)
        return pid if cmd and cmd[0].endswith("dnsmasq") and _has(cmd, self.pidfile) else None

    async def ensure(self, argv: list[str], hosts: str) -> list[str]:
        """Run dnsmasq with ``argv`` serving ``hosts``: write the hosts file if it changed
        (then SIGHUP), start it if it is not running, restart it if its argv changed.
        Returns what was changed."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        done = []
        changed = self._write_hosts(hosts)
        pid = self.pid()
        if pid is not None and pid_cmdline(pid) != argv:
            await self.stop()
            pid = None
            done.append("DHCP server restarted (its arguments changed)")
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            await arun(argv, timeout=30)  # daemonizes once its sockets are bound
            done.append("DHCP server started")
        elif changed:
            kill(pid, signal.SIGHUP)
            done.append("DHCP hosts reloaded")
        return done

    def _write_hosts(self, text: str) -> bool:
        try:
            if self.hosts.read_text() == text:
                return False
        except OSError:
            pass
        tmp = self.hosts.with_suffix(".new")
        tmp.write_text(text)
        os.replace(tmp, self.hosts)
        return True

    async def stop(self) -> None:
        """Stop this network's dnsmasq (SIGTERM, SIGKILL after 5 s). Idempotent."""
        pid = self.pid()
        if pid is None:
            return
        kill(pid)
        if not await wait_pid_exit(pid, 5.0):
            kill(pid, signal.SIGKILL)
            await wait_pid_exit(pid, 5.0)
        self.pidfile.unlink(missing_ok=True)


def _has(cmd: list[str], pidfile: Path) -> bool:
    return f"--pid-file={pidfile}" in cmd
