"""Roles: a role is a named set of action strings; a user has exactly one.

Actions are ``<object>.<verb>``; ``*`` is every action. The presets: ``ROOT`` (everything,
and the only role that may change a ROOT user), ``ADMIN`` (everything), ``READ_ONLY`` (every
read but the audit), ``AUDITOR`` (the audit, nothing else), ``VM_USER`` (the VMs it owns:
read, change, power, and the tasks it made). ``vm.all`` widens a role's VM actions from the
VMs the user made through the center to every VM (and its tasks from its own to all).
Custom roles name any of ``ACTIONS``; an unknown action is refused.
"""

from __future__ import annotations

from aecp.common.errors import InvalidInput

ACTIONS = frozenset(
    {
        "session.read",
        "user.read",
        "user.write",
        "role.read",
        "role.write",
        "audit.read",
        "cluster.read",
        "cluster.write",
        "vm.read",
        "vm.write",
        "vm.power",
        "vm.all",
        "volume.read",
        "volume.write",
        "task.read",
        "task.write",
        "alert.read",
        "alert.write",
    }
)
READS = frozenset(a for a in ACTIONS if a.endswith(".read"))

PRESETS: dict[str, frozenset[str]] = {
    "ROOT": frozenset({"*"}),
    "ADMIN": frozenset({"*"}),
    "READ_ONLY": (READS - {"audit.read"}) | {"vm.all"},
    "AUDITOR": frozenset({"audit.read", "session.read"}),
    "VM_USER": frozenset(
        {"session.read", "vm.read", "vm.write", "vm.power", "task.read", "task.write"}
    ),
}


def allows(actions: frozenset[str], action: str) -> bool:
    return "*" in actions or action in actions


def parse_actions(raw: list[str]) -> frozenset[str]:
    """The actions of a custom role; ``InvalidInput`` (field ``actions``) naming an unknown
    one."""
    unknown = sorted(set(raw) - ACTIONS)
    if unknown:
        raise InvalidInput(
            "actions",
            f"unknown actions: {', '.join(unknown)} (known: {', '.join(sorted(ACTIONS))})",
        )
    if not raw:
        raise InvalidInput("actions", "a role needs at least one action")
    return frozenset(raw)
