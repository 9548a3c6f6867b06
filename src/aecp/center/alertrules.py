"""The alert rules as shipped: levels (info < notice < critical), and for each rule what it
watches, its default level or thresholds, and the words of its alerts (cause, impact,
suggested action). ``center.alerts`` evaluates them."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Level(enum.StrEnum):
    INFO = "info"
    NOTICE = "notice"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return LEVEL_ORDER.index(self)


LEVEL_ORDER = (Level.INFO, Level.NOTICE, Level.CRITICAL)
Thresholds = tuple[tuple[Level, float], ...]  # (level, percent), by rank


# ---- the rules --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleSpec:
    """A rule as shipped: what it watches, its defaults, and the words of its alerts (format
    strings over ``cluster``, ``name``, ``value`` and ``detail``)."""

    name: str
    kind: str  # the kind of object it watches
    title: str
    cause: str
    impact: str
    action: str
    level: Level | None = None  # a state rule
    thresholds: Thresholds = ()  # a threshold rule, in percent
    per_cluster: bool = True
    one_shot: bool = False  # a resolved alert of the same cause is never opened again

    def words(
        self, cluster: str, name: str, value: float | None, detail: str
    ) -> tuple[str, str, str]:
        """The cause, impact and suggested action of an alert of this rule."""
        args = {"cluster": cluster, "name": name, "value": value or 0.0, "detail": detail}
        return self.cause.format(**args), self.impact.format(**args), self.action.format(**args)


_USE = ((Level.NOTICE, 80.0), (Level.CRITICAL, 90.0))
RULES: dict[str, RuleSpec] = {
    s.name: s
    for s in (
        RuleSpec(
            "cluster_unreachable",
            "cluster",
            "a cluster does not answer the center",
            "cluster {cluster} does not answer the center: {detail}",
            "the center shows the cluster's last copy, which may be out of date, and cannot "
            "change anything on it",
            "check the cluster's management network and API service, and that the token the "
            "center uses is still valid",
            level=Level.CRITICAL,
        ),
        RuleSpec(
            "node_unreachable",
            "node",
            "a node is unreachable",
            "node {name} of cluster {cluster} is unreachable (its heartbeat lapsed)",
            "its VMs are in state unknown (HA restarts theirs elsewhere) and the storage "
            "replicas it holds are missing until it returns or they are recovered",
            "check the node's power, its management and storage networks, and its agent",
            level=Level.CRITICAL,
        ),
        RuleSpec(
            "node_trouble",
            "node",
            "a node is in trouble",
            "node {name} of cluster {cluster} is in trouble: {detail}",
            "the node may not run or take VMs as it should",
            "read the node's agent log and its state in the cluster",
            level=Level.NOTICE,
        ),
        RuleSpec(
            "vm_unknown",
            "vm",
            "a VM's state is unknown",
            "the state of VM {name} of cluster {cluster} is unknown: {detail}",
            "whether the VM runs cannot be told, and it cannot be managed until its node answers",
            "check the VM's node",
            level=Level.NOTICE,
        ),
        RuleSpec(
            "vm_failed",
            "vm",
            "a VM failed",
            "VM {name} of cluster {cluster} failed: {detail}",
            "the VM does not run",
            "read the VM's message, fix the cause and start it again",
            level=Level.CRITICAL,
        ),
        RuleSpec(
            "volume_degraded",
            "volume",
            "a volume has fewer replicas than it should",
            "volume {name} of cluster {cluster} is degraded{detail}",
            "one more failure may make its data unreadable",
            "bring back the storage node that held the missing replicas, or check that "
            "recovery starts",
            level=Level.NOTICE,
        ),
        RuleSpec(
            "volume_recovering",
            "volume",
            "a volume is being recovered",
            "volume {name} of cluster {cluster} is being recovered{detail}",
            "recovery adds storage traffic: the cluster may be slower until it ends",
            "none needed; watch that it ends",
            level=Level.INFO,
        ),
        RuleSpec(
            "node_storage_use",
            "node",
            "a node's disk is filling up",
            "the disk of node {name} of cluster {cluster} is {value:.1f}% used",
            "new data and new VMs may not fit on it; a full disk fails writes",
            "free space, or add disks or nodes",
            thresholds=_USE,
        ),
        RuleSpec(
            "node_memory_use",
            "node",
            "a node's memory is nearly all given to VMs",
            "VMs hold {value:.1f}% of the memory node {name} of cluster {cluster} offers",
            "new VMs, and VMs moved off a failed node, may find no room on it",
            "move VMs to other nodes, stop some, or add memory",
            thresholds=_USE,
        ),
        RuleSpec(
            "task_failed",
            "task",
            "a task failed",
            "task {name} of cluster {cluster} failed: {detail}",
            "the change it carried was not made, or only in part",
            "read the task's error, fix the cause and run it again; acknowledge the alert "
            "once handled",
            level=Level.NOTICE,
            one_shot=True,
        ),
        RuleSpec(
            "aoc_disk_use",
            "center",
            "the center's disk is filling up",
            "the center's data directory is on a disk {value:.1f}% used",
            "a full disk stops the center: no sign-in, no audit, no alert",
            "free space on the center's disk, or grow it",
            thresholds=_USE,
            per_cluster=False,
        ),
    )
}
