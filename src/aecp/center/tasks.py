"""Tasks: every mutation through the center is one, carried out by the ``Runner``.

A task is one request to one cluster's API plus, when the cluster answers with an operation,
that operation followed to its end: ``pending`` → ``executing`` → ``succeeded`` | ``failed``
| ``cancelled``, with progress, steps (one sentence per decision), the error, the user, the
cluster and the times.

**At most once.** Every request a task sends carries the task's id as its
``Idempotency-Key``. A task is marked ``sent`` before its request leaves, so after a crash or
a lost answer the same request goes again with the same key: the cluster answers it from its
record (the same operation), says it is still being carried out (asked again later), or
says the outcome cannot be known (the task fails saying so, and nothing is sent with a new
key). A retried create never makes two VMs.

**Survives restarts.** Tasks live in the database. At start the runner takes up every
``executing`` task again (sending again with the same key, or following the operation it
recorded), then the ``pending`` ones.

**Order.** Tasks on one object of one cluster run one at a time, oldest first; tasks on
different objects run side by side (up to ``concurrency``). A ``pending`` task may be
cancelled; an ``executing`` one may not (its request may have reached the cluster).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, NoReturn

import httpx
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session as DB
from sqlalchemy.orm import sessionmaker

from aecp.center.db.models import Cluster, InventoryObject, Task, VMOwner
from aecp.center.registry import ClientFactory, Registry
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AlreadyExists, InvalidState, NotFound
from aecp.common.tasks import cancel, spawn

log = logging.getLogger(__name__)
CALL_TIMEOUT = 15.0  # s: one call to a cluster
FOLLOW_EVERY = 0.25  # s: between two reads of a followed operation
BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)  # s: between attempts while a cluster does not answer
SEND_PATIENCE = 600.0  # s: how long a request is retried while its cluster does not answer
# s: a request first sent longer ago than this is never sent again (the cluster keeps the
# answer to a key for 24 h: cluster/idempotency.py RETENTION), with a margin
KEY_LIFETIME = 20 * 3600.0
FOLLOW_PATIENCE = 3600.0  # s: how long an operation is followed while its cluster is silent
IDLE_POLL = 2.0  # s: the runner looks for work this often even if nobody wakes it
MAX_STEPS = 50


class TaskState(enum.StrEnum):
    PENDING = "pending"
    EXECUTING = "executing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


@dataclass(frozen=True)
class ClusterCall:
    """The request a task sends: ``path`` is the cluster API's (``/v1/vms/web/actions/start``)."""

    method: str
    path: str
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Owned:
    """A VM a task makes, to be owned by the task's user (``create``, ``clone``)."""

    cluster: str
    vm: str


def submit(
    db: DB,
    *,
    kind: str,
    cluster: str,
    target: str,
    user: str,
    call: ClusterCall,
    now: float,
    makes: Owned | None = None,
) -> Task:
    """Record a task (``pending``) in unit of work ``db``; the runner carries it out once
    the unit of work commits (wake it then). ``makes``: the VM this task creates
    (``AlreadyExists`` naming ``name`` if the center's copy of the cluster has one so
    named); its maker owns it once the cluster has accepted the request."""
    if db.get(Cluster, cluster) is None:
        raise NotFound(f"no cluster named {cluster!r} is registered", cluster=cluster)
    if makes is not None:
        known = db.get(InventoryObject, (makes.cluster, "vm", makes.vm))
        if known is not None:
            raise AlreadyExists(
                f"cluster {makes.cluster} has a VM named {makes.vm} already", field="name"
            )
    task = Task(
        id=uuid.uuid4().hex,
        kind=kind,
        cluster=cluster,
        target=target,
        user=user,
        method=call.method,
        path=call.path,
        body="" if call.body is None else json.dumps(call.body, sort_keys=True),
        state=TaskState.PENDING.value,
        progress=0,
        steps=json.dumps([{"at": now, "sentence": f"{user} asked for {kind} of {target}"}]),
        error="",
        cluster_operation="",
        sent=False,
        attempts=0,
        created_at=now,
        started_at=0.0,
        finished_at=0.0,
    )
    db.add(task)
    db.flush()
    return task


def get(db: DB, task_id: str) -> Task:
    task = db.scalars(select(Task).where(Task.id == task_id)).first()
    if task is None:
        raise NotFound(f"no task {task_id!r}", task=task_id)
    return task


def cancel_task(db: DB, task_id: str, who: str, now: float) -> Task:
    """Cancel a ``pending`` task. An ``executing`` one cannot be (its request may have
    reached the cluster); a finished one is refused too (``InvalidState``)."""
    task = get(db, task_id)
    state = TaskState(task.state)
    if state is TaskState.EXECUTING:
        raise InvalidState(
            f"task {task_id} is being carried out by cluster {task.cluster} (its request may "
            "have reached it): it cannot be cancelled now",
            state=state.value,
        )
    if state.done:
        raise InvalidState(f"task {task_id} has already ended ({state.value})", state=state.value)
    changed = db.execute(
        update(Task)
        .where(Task.id == task_id, Task.state == TaskState.PENDING.value)
        .values(state=TaskState.CANCELLED.value, finished_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if not changed:  # the runner took it meanwhile
        raise InvalidState(f"task {task_id} has just started: it cannot be cancelled now")
    db.refresh(task)
    _add_step(task, now, f"cancelled by {who} before it started")
    return task


def forget_user(db: DB, user: str, now: float) -> None:
    """A deleted user: its pending tasks are cancelled and its VMs have no owner any more
    (a later user of the same name inherits nothing)."""
    for task in db.scalars(
        select(Task).where(Task.user == user, Task.state == TaskState.PENDING.value)
    ):
        task.state, task.finished_at = TaskState.CANCELLED.value, now
        _add_step(task, now, f"cancelled: user {user} was deleted")
    db.execute(delete(VMOwner).where(VMOwner.user == user))


def steps(task: Task) -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = json.loads(task.steps or "[]")
    return loaded


def _add_step(task: Task, now: float, sentence: str) -> None:
    kept = steps(task)
    kept.append({"at": now, "sentence": sentence})
    task.steps = json.dumps(kept[-MAX_STEPS:])


MAKERS = ("vm.create", "vm.clone")  # tasks whose VM is owned by their user once accepted


def _owned_by_maker(db: DB, task: Task) -> None:
    """The cluster accepted a create or clone: the VM (which did not exist, or the cluster
    would have refused) is the task's user's."""
    if task.kind not in MAKERS:
        return
    name = str(json.loads(task.body or "{}").get("name", ""))
    owner = db.get(VMOwner, (task.cluster, name))
    if owner is None:
        db.add(VMOwner(cluster=task.cluster, vm=name, user=task.user))
    else:
        owner.user = task.user


class Ended(Exception):
    """A task reached its end (recorded already)."""


@dataclass
class Answer:
    status: int
    body: Any


class Runner:
    """Carries tasks out: one asyncio task per executing task, ``wake()`` after a submit."""

    def __init__(
        self,
        sessions: sessionmaker[DB],
        registry: Registry,
        client_factory: ClientFactory,
        clock: Clock = SYSTEM_CLOCK,
        concurrency: int = 8,
    ) -> None:
        self.sessions, self.registry = sessions, registry
        self.client_factory, self.clock = client_factory, clock
        self.concurrency = concurrency
        self.running: dict[str, asyncio.Task[None]] = {}
        self.seen: set[str] = set()  # every task started by this runner (never twice)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Look for work now; callable from any thread (routes run in a thread pool)."""
        loop = self._loop
        if loop is None:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Take up executing tasks (after a restart), then pending ones, forever."""
        self._loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()  # a wake during the pass makes another pass at once
            try:
                await self.pass_once()
            except Exception:  # the runner never stops: the next pass tries again
                log.exception("tasks: a pass of the runner failed")
            waiter = asyncio.ensure_future(self._wake.wait())
            sleeper = asyncio.ensure_future(self.clock.sleep(IDLE_POLL))
            try:
                await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                sleeper.cancel()

    async def close(self) -> None:
        for t in list(self.running.values()):
            await cancel(t)
        self.running.clear()

    async def pass_once(self) -> list[str]:
        """Start what may start now; returns the ids started."""
        ids = await asyncio.to_thread(self._claim)
        for task_id in ids:
            self.seen.add(task_id)
            self.running[task_id] = spawn(self._carry_out(task_id), name=f"task-{task_id}")
        return ids

    def _claim(self) -> list[str]:
        """Executing tasks not running here (taken up again), then the oldest pending task
        of each object that has none executing, up to the concurrency."""
        now = self.clock.wall()
        started: list[str] = []
        with self.sessions.begin() as db:
            live = list(
                db.scalars(
                    select(Task)
                    .where(Task.state.in_([TaskState.PENDING.value, TaskState.EXECUTING.value]))
                    .order_by(Task.seq)
                )
            )
            busy = {(t.cluster, t.target) for t in live if t.state == TaskState.EXECUTING.value}
            for t in live:
                if len(self.running) + len(started) >= self.concurrency:
                    break
                if t.id in self.seen:  # running here, or ended here since the read
                    continue
                if t.state == TaskState.EXECUTING.value:  # left by a center that stopped
                    db.refresh(t)
                    _add_step(t, now, "taken up again after a restart of the center")
                    started.append(t.id)
                    continue
                if (t.cluster, t.target) in busy:
                    continue
                busy.add((t.cluster, t.target))
                took = db.execute(
                    update(Task)
                    .where(Task.id == t.id, Task.state == TaskState.PENDING.value)
                    .values(state=TaskState.EXECUTING.value, started_at=now)
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]
                if took:
                    db.refresh(t)
                    _add_step(t, now, f"started: {t.method} {t.path} in cluster {t.cluster}")
                    started.append(t.id)
        return started

    async def _carry_out(self, task_id: str) -> None:
        try:
            task = await asyncio.to_thread(self._load, task_id)
            if task.state != TaskState.EXECUTING.value:
                return
            op_id = task.cluster_operation
            if not op_id:
                answer = await self._send(task)
                op_id = await asyncio.to_thread(self._answered, task_id, answer)
            if op_id:
                await self._follow(task_id, task.cluster, op_id)
        except Ended:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: the task ends, the runner goes on
            log.exception("tasks: task %s failed unexpectedly", task_id)
            await asyncio.to_thread(self._end, task_id, TaskState.FAILED, f"internal error: {exc}")
        finally:
            self.running.pop(task_id, None)
            self.wake()  # a task on the same object may start now

    def _load(self, task_id: str) -> Task:
        with self.sessions() as db:
            task = get(db, task_id)
            db.expunge(task)
            return task

    def _target(self, cluster: str) -> tuple[str, dict[str, str]] | None:
        with self.sessions() as db:
            c = db.get(Cluster, cluster)
            if c is None:
                return None
            return self.registry.address(c), {"authorization": f"Bearer {self.registry.token(c)}"}

    async def _send(self, task: Task) -> Answer:
        """Send the task's request until the cluster gives a definite answer (2xx or a
        refusal), with the task's id as the ``Idempotency-Key`` every time."""
        attempt = 0
        while True:
            target = await asyncio.to_thread(self._target, task.cluster)
            if target is None:
                await self._fail(task.id, f"cluster {task.cluster} is no longer registered")
            endpoint, auth = target
            first_sent = await asyncio.to_thread(self._mark_sent, task.id)
            if self.clock.wall() - first_sent > KEY_LIFETIME:
                await self._fail(
                    task.id,
                    f"first sent {self.clock.wall() - first_sent:.0f} s ago, longer than the "
                    "cluster keeps its answer: sending it again could do it twice; whether it "
                    f"took effect is unknown (look at {task.target})",
                )
            why = ""
            try:
                async with self.client_factory() as http:
                    r = await http.request(
                        task.method,
                        endpoint + task.path,
                        content=task.body.encode() if task.body else None,
                        headers={
                            **auth,
                            "Idempotency-Key": task.id,
                            **({"content-type": "application/json"} if task.body else {}),
                        },
                        timeout=CALL_TIMEOUT,
                    )
            except httpx.HTTPError as exc:
                why = f"cluster {task.cluster} did not answer ({type(exc).__name__})"
                await self._failover(task.cluster, exc)
            else:
                body = _json(r)
                if r.is_success:
                    return Answer(r.status_code, body)
                again = body.get("idempotency") if isinstance(body, dict) else None
                if r.status_code == 409 and again in ("in_progress", "retry"):
                    why = f"cluster {task.cluster} is still carrying the request out"
                elif r.status_code == 409 and again == "unknown":
                    await self._fail(
                        task.id,
                        f"cluster {task.cluster} cannot tell whether the request took effect "
                        f"({_message(body)}); look at {task.target} before asking again",
                    )
                elif r.status_code >= 500:
                    why = f"cluster {task.cluster} answered {r.status_code} ({_message(body)})"
                else:
                    await self._fail(
                        task.id, f"cluster {task.cluster} refused: {_message(body, r.status_code)}"
                    )
            waited = self.clock.wall() - first_sent
            if waited >= SEND_PATIENCE:
                await self._fail(
                    task.id,
                    f"{why}, for {waited:.0f} s: given up (whether the request took effect is "
                    f"unknown; look at {task.target})",
                )
            delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
            attempt += 1
            await asyncio.to_thread(self._step, task.id, f"{why}; sending again in {delay:g} s")
            await self.clock.sleep(delay)

    async def _failover(self, cluster: str, exc: httpx.HTTPError) -> None:
        """A cluster address that does not answer: the next call goes to another node of the
        cluster, if one answers as the same cluster (the key makes a resend safe there too:
        the cluster keeps it in its store, not in one node)."""
        if isinstance(exc, httpx.TransportError):
            await self.registry.failover(self.sessions, self.client_factory, cluster)

    def _mark_sent(self, task_id: str) -> float:
        """Say the request is about to leave (again); returns when it first left."""
        with self.sessions.begin() as db:
            task = get(db, task_id)
            task.sent = True
            task.attempts += 1
            if not task.first_sent_at:
                task.first_sent_at = self.clock.wall()
            return task.first_sent_at

    def _answered(self, task_id: str, answer: Answer) -> str:
        """Record the cluster's answer: the operation to follow, or the end of the task."""
        op = answer.body.get("operation") if isinstance(answer.body, dict) else None
        now = self.clock.wall()
        with self.sessions.begin() as db:
            task = get(db, task_id)
            _owned_by_maker(db, task)
            if isinstance(op, dict) and op.get("id"):
                task.cluster_operation = str(op["id"])
                task.progress = int(op.get("progress") or 0)
                _add_step(task, now, f"cluster {task.cluster} accepted it as operation {op['id']}")
                return task.cluster_operation
        self._end(task_id, TaskState.SUCCEEDED, "", f"cluster answered {answer.status}")
        return ""

    async def _follow(self, task_id: str, cluster: str, op_id: str) -> None:
        """Read the operation until it ends; its progress and message become the task's."""
        silent_since: float | None = None
        seen = ""
        while True:
            target = await asyncio.to_thread(self._target, cluster)
            if target is None:
                await self._fail(task_id, f"cluster {cluster} is no longer registered")
            endpoint, auth = target
            try:
                async with self.client_factory() as http:
                    r = await http.get(
                        f"{endpoint}/v1/operations/{op_id}", headers=auth, timeout=CALL_TIMEOUT
                    )
            except httpx.HTTPError as exc:
                r = None
                why = f"cluster {cluster} did not answer ({type(exc).__name__})"
                await self._failover(cluster, exc)
            if r is not None and r.status_code == 200:
                silent_since = None
                op = r.json()
                if op["message"] != seen or op["state"] != "running":
                    seen = op["message"]
                    await asyncio.to_thread(self._progress, task_id, op)
                if op["state"] != "running":
                    raise Ended
            elif r is not None and r.status_code == 404:
                await self._fail(
                    task_id,
                    f"cluster {cluster} no longer knows operation {op_id} (reaped): whether it "
                    "succeeded is unknown; look at the object",
                )
            else:
                if r is not None:
                    why = f"cluster {cluster} answered {r.status_code}"
                now = self.clock.monotonic()
                if silent_since is None:
                    silent_since = now
                    await asyncio.to_thread(self._step, task_id, f"{why}; still following")
                elif now - silent_since >= FOLLOW_PATIENCE:
                    await self._fail(
                        task_id, f"{why} for {now - silent_since:.0f} s: lost operation {op_id}"
                    )
                await self.clock.sleep(BACKOFF[-1] / 2)
                continue
            await self.clock.sleep(FOLLOW_EVERY)

    def _progress(self, task_id: str, op: dict[str, Any]) -> None:
        now = self.clock.wall()
        state = op["state"]
        with self.sessions.begin() as db:
            task = get(db, task_id)
            task.progress = max(task.progress, min(100, int(op.get("progress") or 0)))
            if op.get("message"):
                _add_step(task, now, str(op["message"]))
        if state == "succeeded":
            self._end(task_id, TaskState.SUCCEEDED, "", "done")
        elif state == "failed":
            self._end(task_id, TaskState.FAILED, str(op.get("error") or "failed"))
        elif state == "cancelled":
            self._end(task_id, TaskState.CANCELLED, "", "the cluster cancelled the operation")

    def _step(self, task_id: str, sentence: str) -> None:
        with self.sessions.begin() as db:
            _add_step(get(db, task_id), self.clock.wall(), sentence)

    async def _fail(self, task_id: str, error: str) -> NoReturn:
        await asyncio.to_thread(self._end, task_id, TaskState.FAILED, error)
        raise Ended

    def _end(self, task_id: str, state: TaskState, error: str, sentence: str = "") -> None:
        now = self.clock.wall()
        with self.sessions.begin() as db:
            task = get(db, task_id)
            if TaskState(task.state).done:
                return
            task.state, task.error, task.finished_at = state.value, error[:4000], now
            if state is TaskState.SUCCEEDED:
                task.progress = 100
            _add_step(task, now, sentence or error)
            if state is TaskState.SUCCEEDED and task.kind in ("vm.delete", "vm.template"):
                owner = db.get(VMOwner, (task.cluster, task.target))
                if owner is not None:
                    db.delete(owner)


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return {"message": r.text[:200]}


def _message(body: Any, status: int | None = None) -> str:
    msg = body.get("message") if isinstance(body, dict) else None
    text = str(msg) if msg else str(body)[:200]
    return f"{text} ({status})" if status else text
