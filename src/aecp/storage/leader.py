"""The ABS Meta leader: the controller of the ``abs-meta`` role (``store.controllers``).

One storage server at a time does the cluster-wide storage work that belongs to no node's
attached volumes; each pass (every ``storage.recovery_interval_s``):

- repairs the volumes nobody has attached that need it (an extent below its factor, or an
  undo of a refused write left unsettled: ``meta.unsettled``), attaching each for repair (a
  client attaching it takes over: the repair stops);
- repairs the frozen extents (named by snapshots or templates only, so by no volume);
  the replicas of a node in maintenance wait for its longer grace
  (``RecoveryPolicy.grace_for``), as in the volumes' own repairs;
- every ``collect_every`` seconds, collects the extent records nothing names (with their
  replicas).

``scrub_pass`` scrubs the volumes nobody has attached and the frozen extents; the storage
server runs it in its own loop, every ``storage.scrub_interval_s``, while it holds the role (a
scrub of the whole cluster must not hold up repairs). Each step's failure is logged and the
pass goes on with the next. The volumes attached on a node are repaired and scrubbed by that
node itself, leader or not (``node.storage_server``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError
from aecp.storage.access import VolumeDevice
from aecp.storage.attach import open_volume
from aecp.storage.blockdev import Fenced
from aecp.storage.collect import collect_unreferenced
from aecp.storage.frozen import FrozenRepairer
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool
from aecp.storage.progress import RecoveryBoard
from aecp.storage.recovery import RecoveryPolicy, Repairer
from aecp.store.base import Lease
from aecp.store.controllers import Decision

log = logging.getLogger(__name__)


async def idle_volumes(meta: MetaService, degraded_only: bool) -> list[str]:
    """The volumes nobody has attached: all, or (``degraded_only``) those with an extent below
    its factor or an undo of a refused write left unsettled (``meta.unsettled``)."""
    vols = await meta.volumes()
    exts = await meta.extents()
    servers = await meta.servers()  # a replica whose node left counts as missing
    unsettled = await meta.unsettled.volumes()
    out = []
    for v in vols:
        if await meta.attachment(v.name) is not None:
            continue
        live = [sum(n in servers for n in exts[x].replicas) for x in v.extents if x in exts]
        if not degraded_only or v.name in unsettled or any(n < v.replicas for n in live):
            out.append(v.name)
    return out


async def volume_work(
    dev: VolumeDevice, what: str, policy: RecoveryPolicy, board: RecoveryBoard
) -> list[str]:
    """One ``repair`` or ``scrub`` pass over an attached volume; its sentences, each naming
    the volume."""
    rep = Repairer(dev, policy, board)
    sentences = await (rep.run_pass() if what == "repair" else rep.scrub_pass())
    return [f"volume {dev.vol.name}: {s}" for s in sentences]


class MetaLeader:
    """The ``abs-meta`` controller; see the module docstring. ``lease``: this server's lease
    while it is held (idle volumes are attached under it)."""

    role = "abs-meta"

    def __init__(
        self,
        meta: MetaService,
        pool: ReplicaPool,
        node: str,
        board: RecoveryBoard,
        policy: Callable[[], RecoveryPolicy],
        lease: Callable[[], Lease | None],
        collect_every: float,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.meta, self.pool, self.node, self.board = meta, pool, node, board
        self.policy, self.lease = policy, lease
        self.collect_every, self.clock = collect_every, clock
        self._collected = clock.monotonic()

    async def run_pass(self, new_term: bool) -> list[Decision]:
        said: list[str] = []
        frozen = FrozenRepairer(self.meta, self.pool, await self._policy(), self.board)
        said += await self._volumes("repair", degraded_only=True)
        said += await _step("frozen extents", frozen.run_pass)
        now = self.clock.monotonic()
        if now - self._collected >= self.collect_every:
            self._collected = now
            said += await _step("collect", lambda: collect_unreferenced(self.meta, self.pool))
        return [Decision(s) for s in said]

    async def scrub_pass(self) -> list[str]:
        """Scrub the volumes nobody has attached, then the frozen extents; the sentences."""
        frozen = FrozenRepairer(self.meta, self.pool, await self._policy(), self.board)
        said = await self._volumes("scrub", degraded_only=False)
        return said + await _step("scrub frozen extents", frozen.scrub_pass)

    async def _policy(self) -> RecoveryPolicy:
        """The recovery policy with the nodes in maintenance now (their longer grace)."""
        return await self.policy().current(self.meta.store)

    async def _volumes(self, what: str, degraded_only: bool) -> list[str]:
        """``what`` on each idle volume in turn (one failing does not stop the others)."""
        said: list[str] = []
        try:
            names = await idle_volumes(self.meta, degraded_only)
        except AecpError as exc:
            log.warning("node %s: %s of idle volumes stopped: %s", self.node, what, exc)
            return said
        for name in names:
            said += await _step(f"volume {name}: {what}", functools.partial(self._idle, name, what))
        return said

    async def _idle(self, name: str, what: str) -> list[str]:
        lease = self.lease()
        if lease is None:
            return []
        try:
            dev = await open_volume(self.meta, self.pool, self.node, name, lease, purpose="repair")
        except AecpError as exc:
            log.info("volume %s: not attached for %s: %s", name, what, exc)
            return []
        try:
            said = await volume_work(dev, what, self.policy(), self.board)
            await dev.flush()
            return said
        except Fenced:
            log.info("volume %s: %s interrupted: a client attached it", name, what)
            return []
        finally:
            await dev.close()


async def _step(what: str, work: Callable[[], Awaitable[list[str]]]) -> list[str]:
    """``work``'s sentences; a failure is logged (a bug too) and yields none."""
    try:
        return await work()
    except AecpError as exc:
        log.warning("%s stopped: %s", what, exc)
    except Exception:  # a bug in one step must not stop recovery
        log.exception("%s failed", what)
    return []
