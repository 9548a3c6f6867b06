"""The etcd gateway client reads the leader key and its lease as etcd 3.4's JSON gateway
answers them (base64 keys and values, int64 as strings, zero values left out), asks the
endpoints in order until one answers, and turns every failure into ``GatewayError``."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from aecp.center.ha.etcdgw import EtcdGateway, GatewayError, LeaderLease, leader_key
from aecp.common.errors import InvalidInput
from tests.pkikit import TestPKI

KEY = "/service/aoc-1f2e/leader"
LEASE = "7587869196411370506"  # as etcd writes an int64: a decimal string


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def range_answer(holder: str = "n1", lease: str | None = LEASE) -> dict[str, Any]:
    kv = {
        "key": b64(KEY),
        "create_revision": "41",
        "mod_revision": "41",
        "version": "1",
        "value": b64(holder),
    }
    if lease is not None:
        kv["lease"] = lease
    header = {"cluster_id": "14841639068965178418", "member_id": "10276657743932975437"}
    return {"header": {**header, "revision": "57", "raft_term": "2"}, "kvs": [kv], "count": "1"}


def ttl_answer(ttl: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"header": {"revision": "57"}, "ID": LEASE, "grantedTTL": "20"}
    if ttl is not None:
        body["TTL"] = ttl
    return body


Handler = Callable[[httpx.Request], httpx.Response]


class Etcd:
    """A scripted gateway: answers by path, records what it was asked."""

    def __init__(self, **answers: Any) -> None:
        self.answers = {"/v3/kv/range": range_answer(), "/v3/lease/timetolive": ttl_answer("19")}
        self.answers.update({f"/v3/{k.replace('_', '/')}": v for k, v in answers.items()})
        self.asked: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.asked.append((request.url.host, request.url.path, json.loads(request.content)))
        answer = self.answers[request.url.path]
        if isinstance(answer, httpx.Response):
            return answer
        return httpx.Response(200, json=answer)


def gateway(handler: Handler, *endpoints: str) -> EtcdGateway:
    return EtcdGateway(
        endpoints or ("10.232.0.1:2379", "10.232.0.2:2379"),
        Path("/nonexistent/ca.crt"),
        Path("/nonexistent/client.crt"),
        Path("/nonexistent/client.key"),
        transport=httpx.MockTransport(handler),
    )


def test_the_leader_key_is_patronis() -> None:
    assert leader_key("aoc-1f2e") == KEY


async def test_leader_reads_the_key_then_its_lease() -> None:
    etcd = Etcd()
    gw = gateway(etcd)
    assert await gw.leader(KEY) == LeaderLease(holder="n1", ttl_remaining_s=19.0, revision=41)
    assert etcd.asked == [
        ("10.232.0.1", "/v3/kv/range", {"key": b64(KEY), "serializable": False}),
        ("10.232.0.1", "/v3/lease/timetolive", {"ID": LEASE}),
    ]
    await gw.aclose()


async def test_a_missing_key_is_none_and_asks_for_no_lease() -> None:
    etcd = Etcd(kv_range={"header": {"revision": "57"}})  # no kvs, no count: zero values left out
    gw = gateway(etcd)
    assert await gw.leader(KEY) is None
    assert [path for _, path, _ in etcd.asked] == ["/v3/kv/range"]


async def test_a_lease_with_less_than_a_second_left_answers_ttl_zero() -> None:
    gw = gateway(Etcd(lease_timetolive=ttl_answer(None)))  # "TTL": "0" is left out
    lease = await gw.leader(KEY)
    assert lease is not None and lease.ttl_remaining_s == 0.0


async def test_an_expired_lease_is_an_error() -> None:
    with pytest.raises(GatewayError, match="is gone"):
        await gateway(Etcd(lease_timetolive=ttl_answer("-1"))).leader(KEY)


async def test_a_key_without_a_lease_is_an_error() -> None:
    with pytest.raises(GatewayError, match="has no lease"):
        await gateway(Etcd(kv_range=range_answer(lease=None))).leader(KEY)


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(503, json={"error": "etcdserver: no leader", "code": 14}),
        httpx.Response(200, text="<html>"),
        httpx.Response(200, json=["not", "an", "object"]),
    ],
)
async def test_a_bad_answer_is_an_error(answer: httpx.Response) -> None:
    with pytest.raises(GatewayError):
        await gateway(Etcd(kv_range=answer)).leader(KEY)


async def test_an_unreadable_key_value_is_an_error() -> None:
    body = range_answer()
    body["kvs"][0]["value"] = "not base64!"
    with pytest.raises(GatewayError, match="unreadable"):
        await gateway(Etcd(kv_range=body)).leader(KEY)


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ReadTimeout])
async def test_no_answer_is_an_error(error: type[httpx.TransportError]) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error("no answer", request=request)

    with pytest.raises(GatewayError, match="did not answer"):
        await gateway(fail).leader(KEY)


async def test_the_endpoints_are_asked_in_order_until_one_answers() -> None:
    hosts: list[str] = []

    def fail(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(GatewayError):
        await gateway(fail, "10.232.0.3:2379", "10.232.0.1:2379").leader(KEY)
    assert hosts == ["10.232.0.3", "10.232.0.1"]
    hosts.clear()

    def first_down(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host == "10.232.0.3":
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/v3/kv/range":
            return httpx.Response(
                200, json={"kvs": [{"value": base64.b64encode(b"n1").decode(), "lease": "7"}]}
            )
        return httpx.Response(200, json={"TTL": "19"})

    lease = await gateway(first_down, "10.232.0.3:2379", "10.232.0.1:2379").leader(KEY)
    assert lease is not None and lease.holder == "n1"
    assert hosts == ["10.232.0.3", "10.232.0.1", "10.232.0.1"]


def test_no_endpoint_is_refused() -> None:
    with pytest.raises(InvalidInput, match="no etcd endpoint"):
        EtcdGateway([], Path("ca"), Path("c"), Path("k"))


async def test_the_real_client_speaks_tls_with_a_client_certificate(tmp_path: Path) -> None:
    bundle = TestPKI(tmp_path).node("n1")
    gw = EtcdGateway(["127.0.0.1:1"], bundle.ca_file, bundle.cert_file, bundle.key_file)
    with pytest.raises(GatewayError, match="did not answer"):  # nothing listens on port 1
        await gw.leader(KEY)
    await gw.aclose()
