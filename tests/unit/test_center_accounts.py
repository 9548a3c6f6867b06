"""The center's users, roles, sessions and audit, over a real SQLite database made by the
migrations: the schema matches the models; root at first start; login with one answer for
every refusal and a lock-out; sessions that end when their user is disabled; every route 401
without a session and 403 for a role that lacks its action; every mutation and login audited
once, secrets redacted."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from aecp.center.db.engine import make_engine, upgrade
from aecp.center.db.models import Base
from aecp.center.main import bootstrap
from aecp.center.settings import CenterSettings
from aecp.common.clock import FakeClock

STRONG = "Correct-Horse-9"


class Center:
    def __init__(self, client: httpx.AsyncClient, root: str, settings: CenterSettings) -> None:
        self.client, self.root_password, self.settings = client, root, settings

    async def login(self, user: str, password: str) -> httpx.Response:
        return await self.client.post("/v1/login", json={"user": user, "password": password})

    async def token(self, user: str, password: str) -> str:
        r = await self.login(user, password)
        assert r.status_code == 200, r.text
        token: str = r.json()["token"]
        return token

    async def call(self, method: str, path: str, token: str, **kw: Any) -> httpx.Response:
        return await self.client.request(
            method, path, headers={"authorization": f"Bearer {token}"}, **kw
        )

    async def user(self, root: str, name: str, role: str) -> str:
        body = {"name": name, "role": role, "password": STRONG}
        r = await self.call("POST", "/v1/users", root, json=body)
        assert r.status_code == 201, r.text
        return await self.token(name, STRONG)


@pytest.fixture
async def center(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Center]:
    settings = CenterSettings(data_dir=tmp_path / "center", lockout_after=3, lockout_s=600)
    app, password = bootstrap(settings, clock)
    assert password is not None
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://aoc") as client:
        yield Center(client, password, settings)


def test_the_migrations_make_exactly_the_schema_of_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    upgrade(url)  # at head already: nothing to do
    with make_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


async def test_root_is_made_once_with_its_password_in_a_0600_file(
    center: Center, clock: FakeClock
) -> None:
    path = center.settings.root_password_file
    assert path.read_text().strip() == center.root_password
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    _, again = bootstrap(center.settings, clock)
    assert again is None  # a restart makes no second root
    root = await center.token("root", center.root_password)
    me = (await center.call("GET", "/v1/session", root)).json()
    assert me["user"] == "root" and me["role"] == "ROOT"


async def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(center: Center) -> None:
    wrong = await center.login("root", "not-the-password")
    unknown = await center.login("nobody", "not-the-password")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()


async def test_repeated_failures_lock_the_user_out_until_the_lock_out_ends(
    center: Center, clock: FakeClock
) -> None:
    for _ in range(3):
        assert (await center.login("root", "wrong-password-1")).status_code == 401
    locked = await center.login("root", center.root_password)  # the right one, locked out
    assert locked.status_code == 401
    await clock.advance(601)
    assert (await center.login("root", center.root_password)).status_code == 200


async def test_a_disabled_or_deleted_users_sessions_stop_working_at_once(center: Center) -> None:
    root = await center.token("root", center.root_password)
    alice = await center.user(root, "alice", "ADMIN")
    bob = await center.user(root, "bob", "READ_ONLY")
    assert (await center.call("GET", "/v1/session", alice)).status_code == 200
    r = await center.call("PATCH", "/v1/users/alice", root, json={"disabled": True})
    assert r.status_code == 200, r.text
    assert (await center.call("GET", "/v1/session", alice)).status_code == 401
    assert (await center.login("alice", STRONG)).status_code == 401
    assert (await center.call("DELETE", "/v1/users/bob", root)).status_code == 204
    assert (await center.call("GET", "/v1/session", bob)).status_code == 401
    assert (await center.call("POST", "/v1/logout", root)).status_code == 204
    assert (await center.call("GET", "/v1/session", root)).status_code == 401


async def test_every_route_is_401_without_a_session_and_403_to_a_role_that_lacks_it(
    center: Center,
) -> None:
    root = await center.token("root", center.root_password)
    auditor = await center.user(root, "aud", "AUDITOR")
    reader = await center.user(root, "ro", "READ_ONLY")
    doc = (await center.client.get("/openapi.json")).json()
    walked = 0
    for path, ops in doc["paths"].items():
        for method in ops:
            if path in ("/v1/login", "/healthz"):
                continue
            url = path.replace("{name}", "nobody")
            r = await center.client.request(method.upper(), url, json={})
            assert r.status_code == 401, f"{method} {path}: {r.status_code}"
            if path == "/v1/logout":
                continue  # it would end the sessions the walk goes on with
            for token, allowed in ((auditor, ("/v1/audit", "/v1/session", "/v1/logout")),
                                   (reader, ())):  # fmt: skip
                r = await center.call(method.upper(), url, token, json={})
                mutating = method != "get"
                refused = path not in allowed and (token == auditor or mutating)
                if path in ("/v1/session", "/v1/logout"):
                    refused = False
                if path == "/v1/audit":
                    refused = token != auditor
                assert (r.status_code == 403) == refused, f"{method} {path}: {r.text}"
            walked += 1
    assert walked >= 9


async def test_a_weak_password_or_an_unknown_action_is_refused_and_changes_nothing(
    center: Center,
) -> None:
    root = await center.token("root", center.root_password)
    before = (await center.call("GET", "/v1/users", root)).json()
    r = await center.call(
        "POST", "/v1/users", root, json={"name": "eve", "role": "ADMIN", "password": "short"}
    )
    assert r.status_code == 422 and r.json()["field"] == "password", r.text
    r = await center.call("POST", "/v1/roles", root, json={"name": "ops", "actions": ["vm.fly"]})
    assert r.status_code == 422 and r.json()["field"] == "actions", r.text
    assert "vm.fly" in r.json()["message"]
    assert (await center.call("GET", "/v1/users", root)).json() == before
    names = [x["name"] for x in (await center.call("GET", "/v1/roles", root)).json()]
    assert "ops" not in names


async def test_every_mutation_and_login_is_audited_once_without_secrets(center: Center) -> None:
    await center.login("root", "wrong-password-1")
    root = await center.token("root", center.root_password)
    await center.user(root, "carol", "VM_USER")  # a mutation, then carol's login
    await center.call("POST", "/v1/roles", root, json={"name": "viewers", "actions": ["vm.read"]})
    await center.call("DELETE", "/v1/roles/ADMIN", root)  # refused: a preset
    records = (await center.call("GET", "/v1/audit", root)).json()
    seen = [(a["user"], a["action"], a["target"], a["result"].split(":")[0]) for a in records]
    assert seen[::-1] == [
        ("root", "session.login", "root", "unauthorized"),
        ("root", "session.login", "root", "ok"),
        ("root", "user.create", "carol", "ok"),
        ("carol", "session.login", "carol", "ok"),
        ("root", "role.create", "viewers", "ok"),
        ("root", "role.delete", "ADMIN", "conflict"),
    ]
    dumped = json.dumps(records)
    assert STRONG not in dumped and center.root_password not in dumped
    assert json.loads(records[-3]["params"])["password"] == "[redacted]"


def test_the_systemd_unit_starts_the_center_with_options_the_cli_takes() -> None:
    import configparser
    import shlex

    import typer.main

    from aecp.cli.main import app

    unit = Path(__file__).parents[2] / "deploy" / "systemd" / "aecp-center.service"
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(unit)
    argv = shlex.split(parser["Service"]["ExecStart"])
    assert argv[:3] == ["/opt/aecp/bin/aecp", "center", "run"]
    group = typer.main.get_command(app)
    run = group.commands["center"].commands["run"]  # type: ignore[attr-defined]
    ctx = run.make_context("run", argv[3:])
    assert ctx.params["data_dir"] == Path("/var/lib/aecp/center")
    assert (ctx.params["address"], ctx.params["port"]) == ("0.0.0.0", 8800)


# ---- found by review: each failed before its fix -------------------------------------------


async def test_a_user_manager_cannot_grant_more_than_its_own_role_nor_change_its_own(
    center: Center,
) -> None:
    root = await center.token("root", center.root_password)
    actions = ["user.read", "user.write", "session.read"]
    r = await center.call("POST", "/v1/roles", root, json={"name": "helpdesk", "actions": actions})
    assert r.status_code == 201, r.text
    hd = await center.user(root, "hd", "helpdesk")
    await center.user(root, "boss", "ADMIN")
    refused = [
        await center.call("PATCH", "/v1/users/hd", hd, json={"role": "ADMIN"}),
        await center.call(
            "POST", "/v1/users", hd, json={"name": "x", "role": "ADMIN", "password": STRONG}
        ),
        await center.call("PATCH", "/v1/users/boss", hd, json={"password": "Another-Pass-77"}),
    ]
    assert [r.status_code for r in refused] == [403, 403, 403], [r.text for r in refused]
    me = (await center.call("GET", "/v1/session", hd)).json()
    assert me["role"] == "helpdesk"
    records = (await center.call("GET", "/v1/audit", root, params={"user": "hd"})).json()
    assert [a["result"].split(":")[0] for a in records if a["action"] != "session.login"] == [
        "forbidden"
    ] * 3


async def test_a_password_reset_ends_the_users_sessions_and_lifts_its_lock_out(
    center: Center,
) -> None:
    root = await center.token("root", center.root_password)
    bob = await center.user(root, "bob", "READ_ONLY")
    for _ in range(3):
        await center.login("bob", "wrong-password-1")
    assert (await center.login("bob", STRONG)).status_code == 401  # locked out
    r = await center.call("PATCH", "/v1/users/bob", root, json={"password": "Fresh-Pass-123"})
    assert r.status_code == 200, r.text
    assert (await center.call("GET", "/v1/session", bob)).status_code == 401
    assert (await center.login("bob", "Fresh-Pass-123")).status_code == 200


async def test_any_role_can_log_out_and_the_logout_is_audited(center: Center) -> None:
    root = await center.token("root", center.root_password)
    await center.call("POST", "/v1/roles", root, json={"name": "viewer", "actions": ["vm.read"]})
    viewer = await center.user(root, "vi", "viewer")
    assert (await center.call("POST", "/v1/logout", viewer)).status_code == 204
    assert (await center.call("GET", "/v1/roles", viewer)).status_code == 401
    records = (await center.call("GET", "/v1/audit", root, params={"user": "vi"})).json()
    assert "session.logout" in [a["action"] for a in records]


def test_two_starts_at_once_upgrade_the_schema_once_and_make_one_root(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Without the start lock, one of them failed on a table the other had just made."""
    import concurrent.futures

    settings = CenterSettings(data_dir=tmp_path / "both")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: bootstrap(settings, clock)[1], range(2)))
    assert sum(p is not None for p in results) == 1
