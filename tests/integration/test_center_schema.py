"""Schemathesis over the center's OpenAPI document (a real center process, real SQLite): generated
requests, conforming and not, with a root session, get no 5xx and no status the document
does not declare, a 4xx changes nothing stored, and every change that succeeds leaves
exactly one audit record; a login with generated bodies never answers anything but 200,
401 or 422."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from tests.integration.test_center import CenterProcess

pytestmark = pytest.mark.integration
EXAMPLES = 15


def test_generated_requests_get_no_5xx_and_only_declared_statuses(tmp_path: Path) -> None:
    center = CenterProcess(tmp_path / "aoc", tmp_path / "home")
    center.start()
    try:
        _explore_all(center)
    finally:
        center.kill()


# what a refused request must leave as it was: every table but the audit (a refusal is
# recorded) and what the center's own loops write (alerts, notifications); a user's failed
# login count is the lock-out working, not a change
KEPT = {
    "roles": "*",
    "users": "name, role, password_hash, disabled",
    "sessions": "*",
    "datacenters": "*",
    "clusters": "*",
    "tasks": "*",
    "vm_owners": "*",
    "alert_rules": "*",
    "alert_rule_overrides": "*",
    "notifiers": "*",
}


def stored(center: CenterProcess) -> dict[str, list[Any]]:
    db = sqlite3.connect(f"file:{center.data_dir / 'center.db'}?mode=ro", uri=True)
    try:
        return {
            table: sorted(map(repr, db.execute(f"SELECT {columns} FROM {table}")))
            for table, columns in KEPT.items()
        }
    finally:
        db.close()


def audit_count(center: CenterProcess) -> int:
    db = sqlite3.connect(f"file:{center.data_dir / 'center.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM audit").fetchone()[0])
    finally:
        db.close()


def _explore_all(center: CenterProcess) -> None:
    password = (center.data_dir / "root-password").read_text().strip()
    session = requests.Session()
    token = session.post(
        center.url + "/v1/login", json={"user": "root", "password": password}, timeout=30
    ).json()
    auth = {"Authorization": f"Bearer {token['token']}"}
    schema = schemathesis.openapi.from_url(center.url + "/openapi.json")
    failures: dict[str, str] = {}
    ran = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path in ("/v1/logout",):
            continue  # it would end the session the run goes on with
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            def explore(case: Any) -> None:
                before, audited_before = stored(center), audit_count(center)
                response = case.call(base_url=center.url, session=session, headers=auth, timeout=30)
                case.validate_response(
                    response, checks=[not_a_server_error, status_code_conformance]
                )
                if 400 <= response.status_code < 500:
                    assert stored(center) == before, f"{response.status_code} changed state"
                if case.method != "GET" and 200 <= response.status_code < 300:
                    added = audit_count(center) - audited_before
                    assert added == 1, f"a change left {added} audit records, not one"

            try:
                explore()
                ran += 1
            except hypothesis.errors.Unsatisfiable:
                pass
            except (Exception, BaseExceptionGroup) as exc:
                failures[f"{op.label} ({mode.value})"] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert ran > 20
