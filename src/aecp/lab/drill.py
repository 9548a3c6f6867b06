"""The AOC failover drill (``aecp drill center-failover``, ``benchmarks/center_ha.py``): kill the
active of a whole lab trio under a continuous stream of writes through the management IP and
report what the client saw and what the trio decided.

What it does, in order (``run_drill``):

1. checks the trio is whole: a leader, the RPO ``in sync``, the management IP on the leader and
   automatic failover on (``InvalidState`` otherwise: a drill on a degraded trio proves nothing);
2. starts a ``Writer`` (prefix ``drill-<unix time>``: a data center and its audit record per
   write) and a sampler reading, every 50 ms, which namespaces hold the management IP;
3. after ``writes_before`` acknowledged writes, ``SIGKILL``s every process of the active's node
   (``Trio.kill_node``: its host crashed);
4. waits until a write is acknowledged again (at most ``failover_timeout``), stops writing and
   reads every acknowledged write back (``Writer.verify``);
5. with ``restore``, restarts the killed node and waits until it is back as the passive, in sync;
6. deletes the data centers its writes made (their audit records stay);
7. assembles the timeline: the kill, the last acknowledged write before it and the first after
   it, the management IP's holders as sampled, the agents' mover decisions (``GET /local``),
   and the decisive lines of the data nodes' Patroni logs after the kill.

The RTO is the client's: last acknowledged write before the kill to the first acknowledged
write after it. ``lost`` counts acknowledged writes missing afterwards (data center or audit
record): it must be 0.

The assembly (``ack_bounds``, ``holder_events``, ``decision_events``, ``patroni_events``,
``merge``) and the rendering (``DrillReport.summary``, ``DrillReport.rows``) are pure functions
of recorded inputs; only ``run_drill`` and its helpers touch the trio.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from aecp.center.ha.model import HAStatus, RPOKind
from aecp.center.ha.topology import AGENT_PORT
from aecp.common.errors import InvalidState, Unavailable
from aecp.lab.centerha import Trio
from aecp.lab.hawriter import Ack, Writer

SAMPLE_EVERY_S = 0.05
"""How often the sampler reads which namespaces hold the management IP."""

# -- the timeline (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One line of the timeline: when (Unix s), who said or saw it, and one sentence."""

    at: float
    source: str
    sentence: str


def merge(*streams: Iterable[Event]) -> list[Event]:
    """All events of ``streams`` in time order; events at the same instant keep the order of
    their streams (the drill's own first), then their order within a stream."""
    tagged = [(e.at, i, j, e) for i, s in enumerate(streams) for j, e in enumerate(s)]
    return [e for *_, e in sorted(tagged, key=lambda t: (t[0], t[1], t[2]))]


def ack_bounds(acked: Sequence[Ack], fault_at: float) -> tuple[Ack | None, Ack | None]:
    """The last acknowledged write at or before ``fault_at`` and the first one after it."""
    before = [a for a in acked if a.at <= fault_at]
    after = [a for a in acked if a.at > fault_at]
    return (
        max(before, key=lambda a: a.at) if before else None,
        min(after, key=lambda a: a.at) if after else None,
    )


def rto_of(acked: Sequence[Ack], fault_at: float) -> float | None:
    """The client's RTO: last ack before ``fault_at`` to the first after (None if either is
    missing: nothing was acknowledged before, or nothing yet after)."""
    before, after = ack_bounds(acked, fault_at)
    return None if before is None or after is None else after.at - before.at


def lost_writes(missing: Iterable[str]) -> list[str]:
    """The acknowledged writes ``Writer.verify`` found missing, each once: a write whose data
    center and audit record are both missing is one lost write, not two."""
    seen: dict[str, None] = {}
    for m in missing:
        seen.setdefault(m.removeprefix("audit:"), None)
    return list(seen)


def writer_events(
    acked: Sequence[Ack], failures: Sequence[tuple[float, str]], fault_at: float
) -> list[Event]:
    """The writer's side of the failover: the last acknowledged write before ``fault_at``, the
    first failed write after it, and the first acknowledged write after it (with how many
    attempts failed in between)."""
    before, after = ack_bounds(acked, fault_at)
    events = []
    if before is not None:
        events.append(
            Event(before.at, "writer", f"last write acknowledged before the kill ({before.name})")
        )
    failed = [f for f in failures if f[0] > fault_at]
    if failed:
        at, why = failed[0]
        events.append(Event(at, "writer", f"first write not acknowledged after the kill ({why})"))
    if after is not None:
        n = sum(1 for f in failed if f[0] < after.at)
        events.append(
            Event(
                after.at,
                "writer",
                f"first write acknowledged after the kill ({after.name}), after {n} failed "
                "attempts: the center answers through the management IP again",
            )
        )
    return events


def _holders_text(holders: Sequence[str]) -> str:
    if not holders:
        return "the management IP is on no node"
    if len(holders) == 1:
        return f"the management IP is on {holders[0]}"
    return f"the management IP is on {len(holders)} nodes at once: {', '.join(holders)}"


def holder_events(samples: Sequence[tuple[float, Sequence[str]]]) -> list[Event]:
    """The sampled holders of the management IP as events: the first sample, then each change
    (holders are node names, compared as sets)."""
    events: list[Event] = []
    last: frozenset[str] | None = None
    for at, holders in samples:
        now = frozenset(holders)
        if now != last:
            events.append(Event(at, "sampler", _holders_text(sorted(now))))
            last = now
    return events


def ip_moved_at(
    samples: Sequence[tuple[float, Sequence[str]]], to: str, after: float
) -> float | None:
    """The first sample after ``after`` in which ``to`` alone holds the management IP."""
    for at, holders in samples:
        if at > after and list(holders) == [to]:
            return at
    return None


def decision_events(node: str, decisions: Iterable[str], since: float) -> list[Event]:
    """A mover's decisions (``GET /local``: ``"<ISO UTC time> <sentence>"``) after ``since``;
    lines without a readable time are skipped."""
    events = []
    for line in decisions:
        stamp, _, sentence = line.partition(" ")
        try:
            at = datetime.datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            continue
        if at > since and sentence:
            events.append(Event(at, f"agent {node}", sentence))
    return events


PATRONI_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+): (.*)$")
"""A Patroni log line: local time ``YYYY-mm-dd HH:MM:SS,mmm``, level, message."""
DECISIVE = re.compile(
    r"promot|session lock|leader lock|pg_rewind|rewind state|synchronous standby|"
    r"synchronous privilege|failover|demot|bootstrap|starting as a secondary|"
    r"following a different leader|not (the )?healthiest",
    re.IGNORECASE,
)
"""Patroni messages that are decisions or their outcome (kept once each time they appear)."""
LOOP = ("no action. I am", "Lock owner:")
"""The HA loop's messages, logged every loop_wait: kept only where they change."""


def patroni_time(stamp: str, millis: str) -> float | None:
    """A Patroni log stamp (local time) as Unix seconds; None if unreadable."""
    try:
        return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
    except (ValueError, OverflowError):
        return None


def patroni_events(node: str, lines: Iterable[str], since: float) -> list[Event]:
    """The decisive lines of ``node``'s Patroni log after ``since``.

    Kept: every line whose message says a decision (``DECISIVE``: promoted, acquired the
    session lock, rewind, synchronous standby, ...); of the HA loop's repeated lines (``LOOP``:
    ``no action. I am (...)``, ``Lock owner: ...``), per kind, the first after ``since`` (the
    state at the kill) and each one that differs from the one before it, and for ``no action``
    also the last of a run before a change (how long the node kept waiting). Lines without a
    time stamp (multi-line dumps) are skipped."""
    events: list[Event] = []
    previous: dict[str, tuple[float, str, bool]] = {}  # kind -> (at, message, kept)
    source = f"patroni {node}"
    for line in lines:
        m = PATRONI_LINE.match(line)
        if m is None:
            continue
        at = patroni_time(m.group(1), m.group(2))
        if at is None:
            continue
        message = m.group(4).strip()
        kind = next((k for k in LOOP if message.startswith(k)), None)
        if kind is None:
            if at > since and DECISIVE.search(message):
                events.append(Event(at, source, message))
            continue
        before = previous.get(kind)
        keep = at > since and (before is None or before[1] != message or before[0] <= since)
        if keep and kind == LOOP[0] and before is not None and before[1] != message:
            b_at, b_message, b_kept = before
            if b_at > since and not b_kept:
                events.append(Event(b_at, source, b_message))
        if keep:
            events.append(Event(at, source, message))
        previous[kind] = (at, message, keep)
    return sorted(events, key=lambda e: e.at)


# -- the report (pure) -------------------------------------------------------------------------


@dataclass
class DrillReport:
    """What one drill found. Times are Unix seconds; ``rto_s`` is None when no write was
    acknowledged after the kill within the drill's patience."""

    old_active: str
    new_active: str | None
    epoch_before: int | None
    epoch_after: int | None
    killed_at: float
    rto_s: float | None
    ip_moved_s: float | None  # from the kill to the IP on the new active (sampled)
    acknowledged: int
    ambiguous: int  # writes that failed or timed out: may or may not have committed
    lost: int  # acknowledged writes missing afterwards: must be 0
    missing: list[str] = field(default_factory=list)
    ip_on_two: int = 0  # samples in which two nodes held the management IP: must be 0
    etcd_leader_before: str | None = None  # the node whose etcd member led etcd at the start
    restored: bool | None = None  # None: not asked; else whether the old active came back
    timeline: list[Event] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """A write was acknowledged after the kill, none was lost, the IP never on two."""
        return self.rto_s is not None and self.lost == 0 and self.ip_on_two == 0

    def to_dict(self) -> dict[str, Any]:
        """Raw values (``--output json``)."""
        return asdict(self) | {"passed": self.passed}

    def summary(self) -> dict[str, str]:
        """The figures for people."""
        restored = {None: "not asked", True: "yes, in sync", False: "NO"}[self.restored]
        return {
            "RTO (client)": _secs(self.rto_s, "no write acknowledged after the kill"),
            "management IP moved": _secs(self.ip_moved_s, "not seen"),
            "acknowledged writes": str(self.acknowledged),
            "ambiguous writes": str(self.ambiguous),
            "lost acknowledged writes": str(self.lost),
            "IP on two nodes (samples)": str(self.ip_on_two),
            "killed": f"{self.old_active} at {iso(self.killed_at)}",
            "new active": self.new_active or "none seen",
            "epoch": f"{_num(self.epoch_before)} -> {_num(self.epoch_after)}",
            "etcd leader before": self.etcd_leader_before or "unknown",
            "old active back as passive": restored,
            "result": "PASS" if self.passed else "FAIL",
        }

    def rows(self) -> list[dict[str, str]]:
        """The timeline for people: ISO time, seconds from the kill, source, sentence."""
        return [
            {
                "time": iso(e.at),
                "since_kill": since(e.at - self.killed_at),
                "source": e.source,
                "what": e.sentence,
            }
            for e in self.timeline
        ]


TIMELINE_COLUMNS = ["time", "since_kill", "source", "what"]


def iso(ts: float) -> str:
    """``2026-12-07T21:35:00.123Z``."""
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def since(dt: float) -> str:
    """Seconds from the kill, signed, one decimal (``+20.4 s``; ``0.0 s`` within 50 ms)."""
    return "0.0 s" if abs(dt) < 0.05 else f"{dt:+.1f} s"


def _secs(v: float | None, none: str) -> str:
    return none if v is None else f"{v:.1f} s"


def _num(v: int | None) -> str:
    return "-" if v is None else str(v)


# -- running it (the trio) ---------------------------------------------------------------------


class HolderSampler:
    """Which nodes hold the management IP, every ``SAMPLE_EVERY_S``, as names, in a task."""

    def __init__(self, trio: Trio) -> None:
        self.trio = trio
        self.samples: list[tuple[float, list[str]]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            holders = await self.trio.holders()
            self.samples.append((time.time(), [self.trio.plan.name(k) for k in holders]))
            await asyncio.sleep(SAMPLE_EVERY_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def root_password(trio: Trio) -> str:
    """The center's root password (written by the first active's center)."""
    return (trio.base(1) / "center" / "root-password").read_text().strip()


async def read_status(trio: Trio, http: httpx.AsyncClient, skip: int = 0) -> HAStatus:
    """The trio's status from the first agent that answers (the witness's first), node
    ``skip`` left out; ``Unavailable`` if none does."""
    errors = []
    for k in (3, 1, 2):
        if k == skip:
            continue
        try:
            return await trio.status(k, http)
        except Unavailable as e:
            errors.append(str(e))
    raise Unavailable("; ".join(errors))


def whole(st: HAStatus) -> str:
    """Why ``st`` is not a whole trio ("" if it is)."""
    if st.leader is None:
        return "there is no active"
    if st.rpo.kind is not RPOKind.IN_SYNC:
        return f"the RPO is {st.rpo.text}"
    if st.ip_holders != [st.leader]:
        return f"the management IP is on {st.ip_holders or 'no node'}, not on {st.leader}"
    if not st.automatic_failover:
        return f"automatic failover is off ({st.failover_note})"
    return ""


async def wait_whole(
    trio: Trio, leader: str | None, timeout: float, skip: int = 0
) -> HAStatus | None:
    """Poll until the trio is whole (with ``leader`` the active, if given); the status then,
    or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(Unavailable):
                st = await read_status(trio, http, skip)
                if not whole(st) and (leader is None or st.leader == leader):
                    return st
            await asyncio.sleep(0.5)
    return None


async def wait_new_leader(
    trio: Trio, old: str, epoch_before: int | None, skip: int, timeout: float
) -> tuple[float, HAStatus] | None:
    """Poll, asking the agents other than node ``skip``'s, until one names a leader other than
    ``old`` with an epoch past ``epoch_before`` (Patroni reports the new timeline a moment after
    the promotion); the time and status then. After ``timeout``, the last reading that named a
    new leader (its epoch may not have moved yet), or None."""
    deadline = time.monotonic() + timeout
    seen: tuple[float, HAStatus] | None = None
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(Unavailable):
                st = await read_status(trio, http, skip)
                if st.leader is not None and st.leader != old:
                    seen = (time.time(), st)
                    if (st.epoch or 0) > (epoch_before or 0):
                        return seen
            await asyncio.sleep(0.5)
    return seen


async def agent_decisions(trio: Trio, since: float) -> list[Event]:
    """Every answering agent's mover decisions after ``since`` (the killed node's, if it was
    restarted, are those of its new life)."""
    events: list[Event] = []
    async with httpx.AsyncClient() as http:
        for k, node in enumerate(trio.topology().nodes, start=1):
            url = f"http://{node.ha_ip}:{AGENT_PORT}/local"
            try:
                r = await http.get(url, headers=trio.agent_auth(), timeout=2.0)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                decisions = r.json().get("decisions", [])
                events += decision_events(trio.plan.name(k), decisions, since)
    return events


def etcd_leader_of(status: dict[str, Any], members: dict[str, Any]) -> str | None:
    """The name of etcd's leader from the JSON gateway's ``/v3/maintenance/status`` and
    ``/v3/cluster/member/list`` answers (None if they do not say)."""
    leader = str(status.get("leader", ""))
    names = {str(m.get("ID")): m.get("name") for m in members.get("members", [])}
    name = names.get(leader)
    return str(name) if name else None


async def etcd_leader(trio: Trio) -> str | None:
    """Which node's etcd member leads etcd now (asked of the witness's member with its client
    certificate); None if it does not answer. It matters to the RTO: a new etcd leader renews
    every lease for a full ``ttl`` when it is elected, so killing the etcd leader's node
    postpones the expiry of the dead active's lease by the etcd election."""
    k = len(trio.topology().nodes)
    tls = trio.paths(k).tls
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    context.load_cert_chain(str(tls / "node.crt"), str(tls / "node.key"))
    url = f"https://{trio.plan.address('ha', k)}:2379"
    try:
        async with httpx.AsyncClient(verify=context, timeout=2.0) as http:
            st = await http.post(f"{url}/v3/maintenance/status", json={})
            members = await http.post(f"{url}/v3/cluster/member/list", json={})
        return etcd_leader_of(st.json(), members.json())
    except (httpx.HTTPError, ValueError):
        return None


def patroni_log(trio: Trio, k: int) -> Path:
    return trio.base(k) / "log" / "patroni" / "patroni.log"


def patroni_decisions(trio: Trio, since: float) -> list[Event]:
    """The decisive lines of both data nodes' Patroni logs after ``since``."""
    events: list[Event] = []
    for k, node in enumerate(trio.topology().nodes, start=1):
        if node.data_dir is None:
            continue
        log = patroni_log(trio, k)
        if log.exists():
            lines = log.read_text(errors="replace").splitlines()
            events += patroni_events(trio.plan.name(k), lines, since)
    return events


async def _until(check: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)
    return True


async def _verify(writer: Writer, timeout: float) -> list[str]:
    """``Writer.verify``, asked again while the center cannot be read (a new active may need a
    moment), up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await writer.verify()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def remove_writes(writer: Writer) -> int:
    """Delete the data centers the drill's writes made (acknowledged or ambiguous), so that a
    lab's center is not left with them; their audit records stay (they are the trail). Best
    effort: returns how many were deleted."""
    names = [a.name for a in writer.acked] + [f.split(":", 1)[0] for _, f in writer.failures]
    deleted = 0
    async with httpx.AsyncClient() as http:
        try:
            r = await http.post(
                f"{writer.url}/v1/login",
                json={"user": writer.user, "password": writer.password},
                timeout=10,
            )
            r.raise_for_status()
            auth = {"Authorization": f"Bearer {r.json()['token']}"}
            for name in dict.fromkeys(names):
                r = await http.delete(
                    f"{writer.url}/v1/datacenters/{name}", headers=auth, timeout=10
                )
                deleted += r.status_code == 204
        except httpx.HTTPError:
            pass
    return deleted


def _ignore(_: str) -> None:
    return None


async def run_drill(
    trio: Trio,
    *,
    writes_before: int = 50,
    restore: bool = True,
    failover_timeout: float = 120.0,
    restore_timeout: float = 240.0,
    say: Callable[[str], None] = _ignore,
) -> DrillReport:
    """Kill the active of ``trio`` under writes and report (see the module docstring).

    Raises ``InvalidState`` if the trio is not whole at the start, ``Unavailable`` if no
    agent answers or ``writes_before`` writes are not acknowledged within a minute. A
    failover that does not happen within ``failover_timeout`` is not an exception: the report
    says so (``rto_s`` None, ``passed`` False)."""
    async with httpx.AsyncClient() as http:
        st = await read_status(trio, http)
    why = whole(st)
    if why:
        raise InvalidState(f"the trio is not whole, no drill: {why}")
    old = st.leader
    assert old is not None
    names = [n.name for n in trio.topology().nodes]
    k = names.index(old) + 1
    etcd_before = await etcd_leader(trio)
    start = time.time()
    drill: list[Event] = [
        Event(
            start,
            "drill",
            f"the trio is whole: {old} active (epoch {_num(st.epoch)}), the RPO in sync, "
            f"the management IP on {old}; etcd's leader is the member on "
            f"{etcd_before or 'an unknown node'}",
        )
    ]
    say(f"the trio is whole: {old} is the active; writing through {trio.center_url}")
    writer = Writer(trio.center_url, "root", root_password(trio), prefix=f"drill-{int(start)}")
    stop = asyncio.Event()
    sampler = HolderSampler(trio)
    sampler.start()
    task = asyncio.create_task(writer.run(stop))
    kill_started = killed_at = 0.0
    resumed = False
    try:
        if not await _until(lambda: len(writer.acked) >= writes_before, 60.0):
            raise Unavailable(
                f"only {len(writer.acked)} of {writes_before} writes acknowledged in 60 s"
            )
        say(f"{len(writer.acked)} writes acknowledged; killing {old}, the active")
        kill_started = time.time()
        pids = await asyncio.to_thread(trio.kill_node, k)
        killed_at = time.time()  # every process is gone: any ack after this is the new active's
        drill.append(
            Event(
                kill_started,
                "drill",
                f"killed {old}, the active: SIGKILL to the {len(pids)} processes in its "
                "namespace (its host crashed)",
            )
        )
        resumed = await _until(
            lambda: any(a.at > killed_at for a in writer.acked), failover_timeout, 0.1
        )
        if resumed:
            say("writes are acknowledged again")
        else:
            say(f"no write acknowledged in {failover_timeout:.0f} s after the kill")
            drill.append(
                Event(
                    time.time(),
                    "drill",
                    f"no write acknowledged {failover_timeout:.0f} s after the kill: gave up",
                )
            )
    finally:
        stop.set()
        await task
        await sampler.stop()
    found = await wait_new_leader(trio, old, st.epoch, k, 30.0 if resumed else 5.0)
    new, epoch_after = None, None
    if found is not None:
        at, after = found
        new, epoch_after = after.leader, after.epoch
        drill.append(Event(at, "drill", f"{new} is the active (epoch {_num(epoch_after)})"))
    missing = await _verify(writer, 60.0) if resumed else []
    lost = lost_writes(missing)
    say(f"read back {len(writer.acked)} acknowledged writes: {len(lost)} lost")
    restored: bool | None = None
    if restore:
        say(f"restarting {old}; waiting until it is back as the passive, in sync")
        drill.append(Event(time.time(), "drill", f"restarted every process of {old}"))
        await asyncio.to_thread(trio.start_node, k)
        back = await wait_whole(trio, new, restore_timeout)
        restored = back is not None
        if back is not None:
            drill.append(
                Event(
                    time.time(),
                    "drill",
                    f"{old} is back as the passive, in sync; the management IP stays on "
                    f"{back.leader}",
                )
            )
        else:
            drill.append(
                Event(time.time(), "drill", f"{old} not back in sync in {restore_timeout:.0f} s")
            )
    if resumed:
        say(f"removed the drill's {await remove_writes(writer)} data centers (audit records stay)")
    moved = ip_moved_at(sampler.samples, new, killed_at) if new else None
    timeline = merge(
        drill,
        writer_events(writer.acked, writer.failures, killed_at),
        holder_events(sampler.samples),
        await agent_decisions(trio, kill_started),
        patroni_decisions(trio, kill_started),
    )
    return DrillReport(
        old_active=old,
        new_active=new,
        epoch_before=st.epoch,
        epoch_after=epoch_after,
        etcd_leader_before=etcd_before,
        killed_at=kill_started,
        rto_s=rto_of(writer.acked, killed_at),
        ip_moved_s=None if moved is None else moved - kill_started,
        acknowledged=len(writer.acked),
        ambiguous=len(writer.failures),
        lost=len(lost),
        missing=missing,
        ip_on_two=sum(1 for _, h in sampler.samples if len(h) > 1),
        restored=restored,
        timeline=timeline,
    )
