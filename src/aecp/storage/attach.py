"""Opening a volume for I/O on this node: the attach under a new epoch, the fence of every
older access point, the take-over of their unsettled undos (``storage.refused``)."""

from __future__ import annotations

import secrets

from aecp.storage.access import VolumeDevice
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool
from aecp.storage.refused import take_over
from aecp.store.base import Lease


async def open_volume(
    meta: MetaService,
    pool: ReplicaPool,
    node: str,
    name: str,
    lease: Lease,
    takeover: bool = False,
    purpose: str = "io",
) -> VolumeDevice:
    """Attach ``name`` here under a new epoch, fence older access points, return the device."""
    ap = secrets.token_hex(6)
    vol, epoch = await meta.attach(name, node, lease, takeover=takeover, purpose=purpose, ap=ap)
    dev = VolumeDevice(meta, pool, node, vol, epoch, ap)
    try:
        await dev.fence_replicas()
    except BaseException:
        await meta.detach(name, node, epoch, ap)
        raise
    await take_over(dev)  # undos an earlier access point left unsettled: their floor holds now
    return dev
