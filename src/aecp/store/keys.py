"""The key layout of the cluster store, in one place.

::

    /aecp/cluster                      ClusterInfo (name, created, API token digest)
    /aecp/nodes/<node>                 NodeRecord: address, API URL, capacity (persistent)
    /aecp/node-admin/<node>            NodeAdmin: what the administrator says of it (API only)
    /aecp/alive/<node>                 NodeHeartbeat: usage, accel (attached to the node's lease)
    /aecp/vms/<vm>/spec                VMSpec: desired state (written by the API)
    /aecp/vms/<vm>/placement           Placement: the node chosen by the scheduler
    /aecp/vms/<vm>/status              VMStatus: actual state (written by the node agent)
    /aecp/vm-jobs/<vm>                 VMJob: a disk change for the VM's agent (snapshot, ...)
    /aecp/images/<image>               ImageRecord
    /aecp/ops/<op-id>                  Operation: a long-running request and its progress
    /aecp/principals/<name>            PrincipalRecord: an API token's holder, role and digest
    /aecp/idempotency/<who>/<key hash> IdempotentAnswer: a mutating request's first answer
    /aecp/templates/<template>         TemplateRecord: frozen VM disks and the VM's shape
    /aecp/leaders/<role>               the holder of a controller role (attached to its lease)
    /aecp/events/<kind>/<name>/<stamp> ObjectEvent: a decision about an object (store.history)
    /aecp/abs/servers/<node>           StorageServer: a node's chunk/NBD addresses (on its lease)
    /aecp/abs/volumes/<volume>         VolumeRecord: size, factor, extent table, epoch
    /aecp/abs/extents/<extent>         ExtentRecord: valid replicas, generation, stale replicas
    /aecp/abs/attach/<volume>          AttachRecord: the access point serving it (on its lease)
    /aecp/abs/recovery/<extent>        RecoveryRecord: a recovery copy and its progress
    /aecp/abs/snapshots/<vol>/<snap>   SnapshotRecord: a frozen extent table
    /aecp/abs/exports/<volume>         ExportGrant: the client credential that may open it (NBD TLS)
    /aecp/abs/unsettled/<volume>       UnsettledRecord: refused writes whose undo is not settled
    /aecp/abs/handoffs/<volume>        Handoff: attach the volume on a node now (migration's source)
    /aecp/abs/handoffs-done/<volume>   HandoffDone: the attach it asked for, done or failed
    /aecp/vm-migrations/<vm>           MigrationMark: a live migration's started/phase (source)
    /aecp/vm-incoming/<vm>             Incoming: the destination's waiting QEMU (destination)
    /aecp/networks/<network>           NetworkRecord: a VM network (VLAN, subnet)
    /aecp/network-ips/<network>/<ip>   the VM NIC an address of the network is given to
"""

from __future__ import annotations

ROOT = "/aecp/"
CLUSTER = ROOT + "cluster"
NODES = ROOT + "nodes/"
# not under nodes/: agents before it was added read every key there as a node record
NODE_ADMIN = ROOT + "node-admin/"
ALIVE = ROOT + "alive/"
VMS = ROOT + "vms/"
# not under vms/: agents before it was added read every key there as a part of a VM
VM_JOBS = ROOT + "vm-jobs/"
IMAGES = ROOT + "images/"
OPS = ROOT + "ops/"
PRINCIPALS = ROOT + "principals/"
IDEMPOTENCY = ROOT + "idempotency/"
TEMPLATES = ROOT + "templates/"
LEADERS = ROOT + "leaders/"
EVENTS = ROOT + "events/"  # events/<kind>/<name>/<stamp>: what controllers decided about it
ABS_SERVERS = ROOT + "abs/servers/"
ABS_VOLUMES = ROOT + "abs/volumes/"
ABS_EXTENTS = ROOT + "abs/extents/"
ABS_ATTACH = ROOT + "abs/attach/"
ABS_RECOVERY = ROOT + "abs/recovery/"
ABS_SNAPSHOTS = ROOT + "abs/snapshots/"
ABS_EXPORTS = ROOT + "abs/exports/"
ABS_UNSETTLED = ROOT + "abs/unsettled/"
ABS_EPOCH = ROOT + "abs/epoch"  # the last attach epoch handed out, cluster-wide
ABS_HANDOFFS = ROOT + "abs/handoffs/"
ABS_HANDOFFS_DONE = ROOT + "abs/handoffs-done/"
VM_MIGRATIONS = ROOT + "vm-migrations/"
VM_INCOMING = ROOT + "vm-incoming/"
NETWORKS = ROOT + "networks/"
NETWORK_IPS = ROOT + "network-ips/"


def node(name: str) -> str:
    return NODES + name


def node_admin(name: str) -> str:
    """What the administrator says of node ``name`` (the API is its only writer)."""
    return NODE_ADMIN + name


def alive(name: str) -> str:
    return ALIVE + name


def vm_prefix(name: str) -> str:
    return f"{VMS}{name}/"


def vm_spec(name: str) -> str:
    return f"{VMS}{name}/spec"


def vm_placement(name: str) -> str:
    return f"{VMS}{name}/placement"


def vm_status(name: str) -> str:
    return f"{VMS}{name}/status"


def image(name: str) -> str:
    return IMAGES + name


def op(op_id: str) -> str:
    return OPS + op_id


def object_events(kind: str, name: str) -> str:
    """The prefix of the events of object ``name`` of ``kind`` (vm, node, ...)."""
    return f"{EVENTS}{kind}/{name}/"


def leader(role: str) -> str:
    return LEADERS + role


def idempotency(principal: str, key_sha256: str) -> str:
    return f"{IDEMPOTENCY}{principal}/{key_sha256}"


def principal(name: str) -> str:
    return PRINCIPALS + name


def vm_job(name: str) -> str:
    """The change of VM ``name``'s disks its node agent is asked to carry out (one at a time)."""
    return VM_JOBS + name


def split_vm_key(key: str) -> tuple[str, str] | None:
    """``/aecp/vms/<vm>/<part>`` → ``(vm, part)``; None for any other key."""
    if not key.startswith(VMS):
        return None
    rest = key[len(VMS) :].split("/")
    if len(rest) != 2 or not rest[0] or not rest[1]:
        return None
    return rest[0], rest[1]


def last_segment(key: str, prefix: str) -> str:
    """The name after ``prefix`` in ``key`` (``/aecp/nodes/n1`` → ``n1``)."""
    return key[len(prefix) :]


def abs_server(node: str) -> str:
    return ABS_SERVERS + node


def abs_volume(name: str) -> str:
    return ABS_VOLUMES + name


def abs_extent(extent_id: str) -> str:
    return ABS_EXTENTS + extent_id


def abs_attach(volume: str) -> str:
    return ABS_ATTACH + volume


def abs_recovery(extent_id: str, target: str) -> str:
    """A copy into the replica of ``extent_id`` on node ``target`` (several may run at once)."""
    return f"{ABS_RECOVERY}{extent_id}/{target}"


def abs_export(volume: str) -> str:
    return ABS_EXPORTS + volume


def abs_unsettled(volume: str) -> str:
    """The unsettled undos of ``volume``'s refused writes (one key: snapshots guard it)."""
    return ABS_UNSETTLED + volume


def abs_snapshots(volume: str) -> str:
    return f"{ABS_SNAPSHOTS}{volume}/"


def abs_snapshot(volume: str, snap: str) -> str:
    return f"{ABS_SNAPSHOTS}{volume}/{snap}"


def template(name: str) -> str:
    return TEMPLATES + name


def abs_handoff(volume: str) -> str:
    """A migration's request that ``volume`` be attached on the node it names, now."""
    return ABS_HANDOFFS + volume


def abs_handoff_done(volume: str) -> str:
    """The storage server's answer to ``abs_handoff(volume)``."""
    return ABS_HANDOFFS_DONE + volume


def vm_migration(name: str) -> str:
    """The phase of VM ``name``'s live migration (its source agent is the only writer)."""
    return VM_MIGRATIONS + name


def vm_incoming(name: str) -> str:
    """VM ``name``'s incoming QEMU on a migration's destination (that agent writes it)."""
    return VM_INCOMING + name


def network(name: str) -> str:
    return NETWORKS + name


def network_ips(name: str) -> str:
    return f"{NETWORK_IPS}{name}/"


def network_ip(name: str, ip: str) -> str:
    return f"{NETWORK_IPS}{name}/{ip}"
