"""``aecp center run``: bring the database to the newest schema, make the preset roles and,
at first start, the ``root`` user (its random password written to a 0600 file whose path is
printed; the password itself is never printed or logged, standalone or in HA: the output lands
in journald or a lab's log, which others may read), then serve the API.

Standalone (no ``settings.ha``), the center does all of it at once and carries out tasks, syncs
inventories and evaluates alerts for as long as it runs. In an HA trio (``settings.ha``) its
database is the local PostgreSQL, run by Patroni: the center prepares the database only while
that is the primary (a standby is read-only); a center started beside a standby waits until
either its database becomes writable or the active has brought the schema to this version's
head, then serves reads. Its background work (``CenterLoops``) runs only while
``gate.Leadership`` says its database is the leader, and changes are refused (``503`` naming
the active) the rest of the time.
"""

from __future__ import annotations

import asyncio
import logging
import os

import httpx
import uvicorn
import uvloop
from fastapi import FastAPI
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session as DB
from sqlalchemy.orm import sessionmaker

from aecp.center import notify
from aecp.center.accounts import Accounts, create_root, ensure_presets
from aecp.center.alerts import Alerting, AlertSettings
from aecp.center.api.app import create_app
from aecp.center.db.engine import at_head, make_engine, start_lock, upgrade, writable
from aecp.center.db.models import Cluster
from aecp.center.ha import findings
from aecp.center.ha.gate import Leadership
from aecp.center.inventory import Syncer
from aecp.center.notify import Outbox
from aecp.center.registry import ClientFactory, Registry
from aecp.center.secrets import SecretBox
from aecp.center.settings import CenterSettings
from aecp.center.tasks import Runner
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import ConfigError
from aecp.common.tasks import cancel, spawn

log = logging.getLogger(__name__)


class StandbyDatabase(Exception):
    """The database is a standby (read-only): this center cannot prepare it."""


def bootstrap(
    settings: CenterSettings,
    clock: Clock = SYSTEM_CLOCK,
    cluster_client: ClientFactory = httpx.AsyncClient,
    alert_settings: AlertSettings | None = None,
) -> tuple[FastAPI, str | None]:
    """The app over an up-to-date database; the root password if it was made now. Two
    starts at once on one database take turns (a lock file in the data directory for SQLite,
    an advisory lock for PostgreSQL): the schema is upgraded once and one root is made.
    ``StandbyDatabase`` if the database is read-only (see ``start`` for a center that waits).
    ``app.state.alert_settings`` and ``app.state.outbox`` are what the alert loop and the
    notifier routes use; with ``settings.ha``, ``app.state.leadership`` gates the app."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = make_engine(settings.url)
    try:
        box = _secret_box(settings)
        password = _prepare(settings, engine, box, clock)
    except BaseException:
        engine.dispose()
        raise
    return _assemble(settings, engine, box, clock, cluster_client, alert_settings), password


async def start(
    settings: CenterSettings,
    clock: Clock = SYSTEM_CLOCK,
    cluster_client: ClientFactory = httpx.AsyncClient,
    alert_settings: AlertSettings | None = None,
) -> tuple[FastAPI, str | None]:
    """``bootstrap``, for a center whose database may be a standby or not up yet: every
    ``settings.ha.poll_s`` it tries again until the database is writable (then it is prepared
    as by ``bootstrap``) or has the newest schema (the active prepared it: this center serves
    reads). Without ``settings.ha`` it is ``bootstrap``."""
    if settings.ha is None:
        return await asyncio.to_thread(bootstrap, settings, clock, cluster_client, alert_settings)
    said = ""
    while True:
        got = await asyncio.to_thread(_attempt, settings, clock, cluster_client, alert_settings)
        if not isinstance(got, str):
            return got
        if got != said:
            log.warning("center: waiting: %s", got)
            said = got
        await clock.sleep(settings.ha.poll_s)


def _attempt(
    settings: CenterSettings,
    clock: Clock,
    cluster_client: ClientFactory,
    alert_settings: AlertSettings | None,
) -> tuple[FastAPI, str | None] | str:
    """One try of ``start``: the app and root's password, or why there is no app yet."""
    try:
        try:
            return bootstrap(settings, clock, cluster_client, alert_settings)
        except StandbyDatabase:
            app = _read_only_app(settings, clock, cluster_client, alert_settings)
            if app is None:
                return "its database is a standby whose schema is not this version's yet"
            log.info("center: its database is a standby at the newest schema: serving reads")
            return app, None
    except DBAPIError as exc:  # not up yet, or demoted while being prepared
        said = str(exc.orig).strip().splitlines()
        return f"its database does not answer or refused: {said[0] if said else exc.code}"


def _read_only_app(
    settings: CenterSettings,
    clock: Clock,
    cluster_client: ClientFactory,
    alert_settings: AlertSettings | None,
) -> FastAPI | None:
    """The app over a standby that has the newest schema; ``None`` if it has not yet."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = make_engine(settings.url)
    if not at_head(engine):
        engine.dispose()
        return None
    return _assemble(settings, engine, _secret_box(settings), clock, cluster_client, alert_settings)


def _secret_box(settings: CenterSettings) -> SecretBox:
    """The key the cluster credentials are sealed with. In HA both data nodes' centers must
    open what the other sealed: the key is never made here then, the deployment copies one."""
    path = settings.data_dir / "secret.key"
    if settings.ha is not None and not path.exists():
        raise ConfigError(
            [
                f"data_dir: {path} is missing: both data nodes' centers need the same key "
                "(the deploy step writes it from the box_key of the trio's secrets file: "
                "python -m aecp.center.ha.deploy node ...; or copy the other data node's)"
            ]
        )
    return SecretBox.at(path)


def _prepare(settings: CenterSettings, engine: Engine, box: SecretBox, clock: Clock) -> str | None:
    """Upgrade the schema, make the presets and root (once), seal old webhook URLs; the root
    password if root was made now. ``StandbyDatabase`` if the database is read-only."""
    if not writable(engine):
        raise StandbyDatabase(f"{engine.url.render_as_string()} is a standby")
    sessions = sessionmaker(engine, expire_on_commit=False)
    with start_lock(engine, settings.data_dir / "start.lock"):
        upgrade(settings.url)
        with sessions.begin() as db:
            ensure_presets(db, clock.wall())
            password = create_root(db, clock.wall())
            if sealed := notify.seal_webhook_urls(db, box):  # stored by an older center
                log.info("center: the URLs of %d webhooks are sealed now", sealed)
        if password is not None:
            path = settings.root_password_file
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # an older file keeps its mode otherwise
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            log.info("center: user root created; its password is in %s", path)
    return password


def _assemble(
    settings: CenterSettings,
    engine: Engine,
    box: SecretBox,
    clock: Clock,
    cluster_client: ClientFactory,
    alert_settings: AlertSettings | None,
) -> FastAPI:
    sessions = sessionmaker(engine, expire_on_commit=False)
    accounts = Accounts(settings.session_ttl_s, settings.lockout_after, settings.lockout_s, clock)
    registry = Registry(box, clock)
    app = create_app(sessions, accounts, clock, registry, cluster_client)
    alerting = alert_settings or AlertSettings(
        allow_private_webhooks=settings.allow_private_webhooks
    )
    app.state.alert_settings = alerting
    app.state.outbox = Outbox(sessions, box, clock, allow_private=alerting.allow_private_webhooks)
    app.state.secret_box = box
    if settings.ha is not None:
        loops = CenterLoops(app, settings)
        app.state.leadership = loops.leadership = Leadership(
            settings.ha, loops, clock, httpx.AsyncClient(trust_env=False), settings.port
        )
    return app


class CenterLoops:
    """The center's background work: the task runner (first the tasks a killed or demoted
    center left executing), the inventory syncer of every registered cluster, the alert loop
    and its delivery. ``start`` begins afresh after a ``stop`` (a new runner, syncer, outbox
    and alert loop: nothing carried over from the last term); ``stop`` cancels all of it."""

    def __init__(self, app: FastAPI, settings: CenterSettings) -> None:
        self.app, self.settings = app, settings
        self.leadership: Leadership | None = None  # in HA: its last status feeds the alerts
        self.terms = 0  # how often the work was started
        self._runner: asyncio.Task[None] | None = None
        self._alerting: Alerting | None = None

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        if self.running:
            return
        app, c = self.app, self.app.state.center
        if self.terms:  # the last term's runner would skip the tasks it had started
            app.state.runner = Runner(
                c.sessions, app.state.registry, app.state.cluster_client, c.clock
            )
            app.state.outbox = Outbox(
                c.sessions,
                app.state.secret_box,
                c.clock,
                allow_private=app.state.alert_settings.allow_private_webhooks,
            )
        self.terms += 1
        syncer = app.state.syncer = Syncer(app.state.inventory)
        for name in await asyncio.to_thread(_cluster_names, c.sessions):
            syncer.watch(name)
        runner: Runner = app.state.runner
        self._runner = spawn(runner.run(), name="task-runner")
        self._alerting = self._alerts()
        self._alerting.start()

    def _alerts(self) -> Alerting:
        c, state = self.app.state.center, self.app.state
        alerting = Alerting(
            c.sessions, self.settings.data_dir, state.outbox, c.clock, state.alert_settings
        )
        leadership = self.leadership
        if leadership is not None:
            alerting.external = findings.source(lambda: leadership.status)
            alerting.external_rules = findings.HA_RULE_NAMES
        return alerting

    async def stop(self) -> None:
        state = self.app.state
        await cancel(self._runner)
        self._runner = None
        await state.runner.close()
        syncer = getattr(state, "syncer", None)
        if syncer is not None:
            state.syncer = None  # routes that register a cluster leave it to the next term
            await syncer.close()
        if self._alerting is not None:
            await self._alerting.close()
            self._alerting = None


def _cluster_names(sessions: sessionmaker[DB]) -> list[str]:
    with sessions() as db:
        return list(db.scalars(select(Cluster.name)))


def run(settings: CenterSettings) -> None:
    if settings.ha is None:
        app, password = bootstrap(settings)
        _announce(settings, password)
        uvloop.run(serve(app, settings))  # 4-29% less CPU per request than asyncio's own loop
        return
    uvloop.run(_run_ha(settings))


async def _run_ha(settings: CenterSettings) -> None:
    app, password = await start(settings)
    _announce(settings, password)
    await serve(app, settings)


def _announce(settings: CenterSettings, password: str | None) -> None:
    """Say where root's password is when root was made now: the 0600 file's path only (this
    output goes to journald or a log file, so it never holds the password)."""
    if password is not None:
        print(f"user root created; its password is in {settings.root_password_file} (0600)")


async def serve(app: FastAPI, settings: CenterSettings, stop: asyncio.Event | None = None) -> None:
    """Serve the API until a signal (or ``stop``) ends it. Standalone, the background work
    (``CenterLoops``) runs throughout; in HA, ``app.state.leadership`` starts it while this
    center is the active."""
    leadership: Leadership | None = getattr(app.state, "leadership", None)
    loops = leadership.duties if leadership is not None else CenterLoops(app, settings)
    assert isinstance(loops, CenterLoops)
    watch = spawn(leadership.run(), name="ha-leadership") if leadership is not None else None
    if watch is None:
        await loops.start()
    config = uvicorn.Config(app, host=settings.address, port=settings.port, log_level="warning")
    server = uvicorn.Server(config)
    ender = spawn(_exit_on(stop, server), name="center-stop") if stop is not None else None
    try:
        await server.serve()
    finally:
        await cancel(ender, watch)
        await loops.stop()
        if leadership is not None:
            await leadership.http.aclose()
        shared = getattr(app.state, "shared_http", None)
        if shared is not None:
            await shared.aclose()


async def _exit_on(stop: asyncio.Event, server: uvicorn.Server) -> None:
    await stop.wait()
    server.should_exit = True
