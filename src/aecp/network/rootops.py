"""Root actions in one place: every ``ip``, ``bridge`` and ``nft`` command AECP runs.

Modelled on Nova's ``privsep``: each action is a tiny function that validates its inputs, builds
an argv list (never a shell string) and hands it to the one chokepoint, ``run_root``. Inputs are
checked before anything runs: a bad interface name, VLAN id or CIDR raises ``InvalidInput`` and no
command is started. Unit tests replace ``run_root`` with a function that fails, so a test that
would really touch the host's network breaks instead.

Every action that other components call from the event loop is ``async`` and takes an optional
``netns``: the command then runs inside that network namespace (``ip -n NS ...`` for ``ip``,
``ip netns exec NS ...`` for the other tools). Deleting is idempotent: a missing link or
namespace is not an error.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from aecp.common.errors import InvalidInput
from aecp.common.proc import CommandFailed, Result, arun

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_NSNAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_NOT_FOUND = ("Cannot find device", "does not exist", "No such file or directory")
_ADDR_GONE = "Cannot assign requested address"  # ``ip addr del`` of an address the link lacks


async def run_root(argv: Sequence[str], *, input_data: bytes | None = None) -> Result:
    """The chokepoint: run one root action's argv, raising ``CommandFailed`` on a non-zero exit."""
    return await arun(list(argv), input_data=input_data, timeout=30)


# --- validation ---------------------------------------------------------------------------------


def check_ifname(name: str, field: str = "interface") -> str:
    """``name`` if it is a valid Linux interface name (1-15 of ``[A-Za-z0-9_.-]``, not . or ..)."""
    if not isinstance(name, str) or not _IFNAME.match(name) or name in (".", ".."):
        raise InvalidInput(field, f"{name!r} is not an interface name (1-15 of A-Za-z0-9_.-)")
    return name


def check_netns(name: str, field: str = "netns") -> str:
    """``name`` if it is a valid network namespace name (1-64 of ``[A-Za-z0-9_.-]``)."""
    if not isinstance(name, str) or not _NSNAME.match(name) or name in (".", ".."):
        raise InvalidInput(field, f"{name!r} is not a namespace name (1-64 of A-Za-z0-9_.-)")
    return name


def check_vlan(vid: int, field: str = "vlan") -> int:
    """``vid`` if it is a VLAN id in 1-4094."""
    if isinstance(vid, bool) or not isinstance(vid, int) or not 1 <= vid <= 4094:
        raise InvalidInput(field, f"{vid!r} is not a VLAN id in 1-4094")
    return vid


def check_iface_cidr(cidr: str, field: str = "address") -> str:
    """``cidr`` as an interface address with prefix (``10.0.0.1/24``), normalised."""
    try:
        iface = ipaddress.ip_interface(cidr)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(field, f"{cidr!r} is not an address with prefix: {exc}") from None
    if "/" not in str(cidr):
        raise InvalidInput(field, f"{cidr!r} has no prefix length")
    return iface.with_prefixlen


# --- argv builders ------------------------------------------------------------------------------


def _ip(netns: str | None, *args: str) -> list[str]:
    """``ip [-n NS] ARGS``."""
    if netns is None:
        return ["ip", *args]
    return ["ip", "-n", check_netns(netns), *args]


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed to run inside network namespace ``netns``."""
    if isinstance(argv, str):
        raise TypeError("argv must be a list, not a shell string")
    return ["ip", "netns", "exec", check_netns(netns), *argv]


def _missing(exc: CommandFailed) -> bool:
    return any(text in exc.output for text in _NOT_FOUND)


# --- namespaces ---------------------------------------------------------------------------------


async def netns_add(name: str) -> None:
    """Create network namespace ``name`` and bring its loopback up."""
    await run_root(["ip", "netns", "add", check_netns(name)])
    await run_root(_ip(name, "link", "set", "lo", "up"))


async def netns_delete(name: str) -> None:
    """Delete network namespace ``name``; a missing one is not an error."""
    try:
        await run_root(["ip", "netns", "delete", check_netns(name)])
    except CommandFailed as exc:
        if not _missing(exc):
            raise


async def netns_list() -> list[str]:
    """Names of the network namespaces that exist (``ip netns list``)."""
    res = await run_root(["ip", "netns", "list"])
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


# --- links --------------------------------------------------------------------------------------


async def bridge_add(name: str, *, netns: str | None = None) -> None:
    """Create bridge ``name`` (down; call ``link_up``)."""
    await run_root(_ip(netns, "link", "add", check_ifname(name), "type", "bridge"))


async def veth_add(
    name: str, peer: str, *, peer_netns: str | None = None, netns: str | None = None
) -> None:
    """Create the veth pair ``name``/``peer``; ``peer`` goes into ``peer_netns`` when given."""
    argv = _ip(netns, "link", "add", check_ifname(name), "type", "veth", "peer", "name")
    argv.append(check_ifname(peer, "peer"))
    if peer_netns is not None:
        argv += ["netns", check_netns(peer_netns, "peer_netns")]
    await run_root(argv)


async def tap_add(name: str, *, netns: str | None = None) -> None:
    """Create a persistent tap device ``name`` (QEMU opens it with ``ifname=``)."""
    await run_root(_ip(netns, "tuntap", "add", "dev", check_ifname(name), "mode", "tap"))


async def vlan_add(parent: str, name: str, vid: int, *, netns: str | None = None) -> None:
    """Create VLAN link ``name`` tagging ``vid`` on ``parent``."""
    argv = _ip(netns, "link", "add", "link", check_ifname(parent, "parent"))
    argv += ["name", check_ifname(name), "type", "vlan", "id", str(check_vlan(vid))]
    await run_root(argv)


async def link_set_netns(name: str, target: str, *, netns: str | None = None) -> None:
    """Move link ``name`` into network namespace ``target``."""
    await run_root(_ip(netns, "link", "set", check_ifname(name), "netns", check_netns(target)))


async def link_set_master(name: str, master: str, *, netns: str | None = None) -> None:
    """Attach link ``name`` to bridge ``master``."""
    argv = _ip(netns, "link", "set", check_ifname(name), "master", check_ifname(master, "master"))
    await run_root(argv)


async def link_up(name: str, *, netns: str | None = None) -> None:
    """Set link ``name`` up."""
    await run_root(_ip(netns, "link", "set", check_ifname(name), "up"))


async def link_down(name: str, *, netns: str | None = None) -> None:
    """Set link ``name`` down."""
    await run_root(_ip(netns, "link", "set", check_ifname(name), "down"))


async def link_delete(name: str, *, netns: str | None = None) -> None:
    """Delete link ``name`` (a veth takes its peer with it); a missing link is not an error."""
    try:
        await run_root(_ip(netns, "link", "delete", check_ifname(name)))
    except CommandFailed as exc:
        if not _missing(exc):
            raise


async def link_exists(name: str, *, netns: str | None = None) -> bool:
    """True if link ``name`` exists (in ``netns`` when given)."""
    try:
        await run_root(_ip(netns, "link", "show", "dev", check_ifname(name)))
    except CommandFailed as exc:
        if _missing(exc):
            return False
        raise
    return True


async def addr_add(name: str, cidr: str, *, netns: str | None = None) -> None:
    """Add address ``cidr`` (``10.0.0.1/24``) to link ``name``."""
    cidr = check_iface_cidr(cidr)
    await run_root(_ip(netns, "addr", "add", cidr, "dev", check_ifname(name)))


async def addr_lease(name: str, cidr: str, lifetime_s: int, *, netns: str | None = None) -> None:
    """Put address ``cidr`` on link ``name`` for ``lifetime_s`` seconds, or renew it for that
    long if it is there (``ip addr replace ... valid_lft``): the kernel removes it when the
    time runs out, even if whoever renews it is dead."""
    cidr = check_iface_cidr(cidr)
    if not 1 <= lifetime_s <= 3600:
        raise InvalidInput("lifetime_s", f"{lifetime_s} is outside 1-3600 s")
    life = str(lifetime_s)
    await run_root(
        _ip(netns, "addr", "replace", cidr, "dev", check_ifname(name),
            "valid_lft", life, "preferred_lft", life)
    )  # fmt: skip


async def addr_del(name: str, cidr: str, *, netns: str | None = None) -> None:
    """Remove address ``cidr`` from link ``name``; a missing address or link is not an error."""
    cidr = check_iface_cidr(cidr)
    try:
        await run_root(_ip(netns, "addr", "del", cidr, "dev", check_ifname(name)))
    except CommandFailed as exc:
        if not (_missing(exc) or _ADDR_GONE in exc.output):
            raise


async def addr_list(*, netns: str | None = None) -> list[tuple[str, str]]:
    """Every address as ``(interface, cidr)`` (``ip -o addr show``)."""
    res = await run_root(_ip(netns, "-o", "addr", "show"))
    out = []
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("inet", "inet6"):
            out.append((parts[1].split("@")[0], parts[3]))
    return out


# --- nftables -----------------------------------------------------------------------------------


async def nft_apply(ruleset: str, *, netns: str | None = None) -> None:
    """Load ``ruleset`` (nft syntax, built by a pure function) atomically with ``nft -f -``."""
    argv = ["nft", "-f", "-"]
    if netns is not None:
        argv = in_netns(netns, argv)
    await run_root(argv, input_data=ruleset.encode())
