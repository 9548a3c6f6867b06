"""A topology that loads is one the trio can run: every bad input of ``topology.parse`` /
``check`` / ``load`` is refused with ``InvalidInput`` naming the field, and the helpers derive
etcd's and Patroni's names and addresses from a good one."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from aecp.center.ha.model import Role
from aecp.center.ha.topology import HANode, Topology, check, load, parse
from aecp.common.errors import InvalidInput


def good() -> dict[str, Any]:
    """A valid trio as an operator writes it (a fresh copy each call)."""
    return {
        "cluster_id": "aoc-prod",
        "ha_cidr": "10.232.0.0/24",
        "management_ip": "10.233.0.200/24",
        "management_iface": "mgmt0",
        "nodes": [
            {"name": "aoc1", "role": "active", "ha_ip": "10.232.0.1", "data_dir": "/srv/pg"},
            {"name": "aoc2", "role": "passive", "ha_ip": "10.232.0.2", "data_dir": "/srv/pg"},
            {"name": "aoc3", "role": "witness", "ha_ip": "10.232.0.3"},
        ],
    }


def refused(doc: Any) -> InvalidInput:
    """The ``InvalidInput`` that ``parse(doc)`` raises (the test fails if it accepts)."""
    with pytest.raises(InvalidInput) as e:
        parse(doc)
    return e.value


def field_of(doc: Any) -> str:
    return str(refused(doc).fields["field"])


def with_node(index: int, **changes: Any) -> dict[str, Any]:
    doc = good()
    doc["nodes"][index].update(changes)
    return doc


def with_(**changes: Any) -> dict[str, Any]:
    doc = good()
    doc.update(changes)
    return doc


# --- a good topology ----------------------------------------------------------------------------


def test_a_good_topology_parses_with_its_values() -> None:
    t = parse(good())
    assert t.cluster_id == "aoc-prod"
    assert [(n.name, n.role, n.ha_ip) for n in t.nodes] == [
        ("aoc1", Role.ACTIVE, "10.232.0.1"),
        ("aoc2", Role.PASSIVE, "10.232.0.2"),
        ("aoc3", Role.WITNESS, "10.232.0.3"),
    ]
    assert t.nodes[0].data_dir == Path("/srv/pg") and t.nodes[2].data_dir is None


def test_the_management_iface_defaults_to_mgmt0() -> None:
    doc = good()
    del doc["management_iface"]
    assert parse(doc).management_iface == "mgmt0"


def test_the_node_order_does_not_matter() -> None:
    doc = good()
    doc["nodes"].reverse()
    assert parse(doc).by_role(Role.ACTIVE).name == "aoc1"


def test_load_reads_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(good()))
    assert load(path) == parse(good())


def test_a_topology_round_trips_through_its_own_json(tmp_path: Path) -> None:
    """What the lab writes (``model_dump_json``) is what ``load`` reads back."""
    path = tmp_path / "topology.json"
    path.write_text(parse(good()).model_dump_json(indent=2))
    assert load(path) == parse(good())


def test_check_accepts_and_returns_a_good_model() -> None:
    t = parse(good())
    assert check(t) is t


# --- the number of nodes and their roles --------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2])
def test_fewer_than_three_nodes(count: int) -> None:
    doc = good()
    doc["nodes"] = doc["nodes"][:count]
    err = refused(doc)
    assert err.fields["field"] == "nodes" and f"not {count}" in err.message


def test_more_than_three_nodes() -> None:
    doc = good()
    doc["nodes"].append({"name": "aoc4", "role": "witness", "ha_ip": "10.232.0.4"})
    err = refused(doc)
    assert err.fields["field"] == "nodes" and "not 4" in err.message


def test_nodes_must_be_a_list() -> None:
    assert field_of(with_(nodes={"aoc1": {}})) == "nodes"


@pytest.mark.parametrize(
    ("roles", "missing"),
    [
        (("active", "active", "witness"), "passive"),
        (("active", "passive", "passive"), "witness"),
        (("witness", "passive", "witness"), "active"),
    ],
)
def test_a_role_doubled_leaves_another_missing(roles: tuple[str, ...], missing: str) -> None:
    doc = good()
    for node, role in zip(doc["nodes"], roles, strict=True):
        node["role"] = role
        node["data_dir"] = None if role == "witness" else "/srv/pg"
    err = refused(doc)
    assert err.fields["field"] == "nodes"
    assert "one node must be the" in err.message


@pytest.mark.parametrize("role", [["active", "passive"], "active,passive", "primary", "", None])
def test_a_node_has_exactly_one_known_role(role: Any) -> None:
    """Two roles on one node (a list, a comma list) or a role the trio does not know."""
    assert field_of(with_node(0, role=role)) == "nodes.0.role"


def test_a_node_without_a_role() -> None:
    doc = good()
    del doc["nodes"][1]["role"]
    assert field_of(doc) == "nodes.1.role"


# --- names and addresses ------------------------------------------------------------------------


def test_two_nodes_with_one_name() -> None:
    err = refused(with_node(1, name="aoc1"))
    assert err.fields["field"] == "nodes.name" and "aoc1" in err.message


def test_two_nodes_with_one_ha_ip() -> None:
    err = refused(with_node(2, ha_ip="10.232.0.1"))
    assert err.fields["field"] == "nodes.ha_ip" and "10.232.0.1" in err.message


@pytest.mark.parametrize("name", ["AOC1", "1aoc", "aoc_1", "", "a" * 32, "aoc 1"])
def test_a_node_name_that_is_not_a_plain_name(name: str) -> None:
    assert field_of(with_node(0, name=name)) == "nodes.0.name"


@pytest.mark.parametrize(
    "ha_ip", ["10.232.0.256", "10.232.0", "aoc1.example", "fd00::1", "10.232.0.1/24", ""]
)
def test_an_ha_ip_that_is_not_an_ipv4_address(ha_ip: str) -> None:
    assert field_of(with_node(1, ha_ip=ha_ip)) == "nodes.1.ha_ip"


@pytest.mark.parametrize("ha_ip", ["10.232.1.2", "10.233.0.2", "192.168.0.2"])
def test_an_ha_ip_outside_the_ha_subnet(ha_ip: str) -> None:
    err = refused(with_node(1, ha_ip=ha_ip))
    assert err.fields["field"] == "nodes.aoc2.ha_ip"
    assert ha_ip in err.message and "10.232.0.0/24" in err.message


@pytest.mark.parametrize("cidr", ["10.232.0.1/24", "10.232.0.0/33", "10.232.0.0", "fd00::/64", ""])
def test_an_ha_cidr_that_is_not_an_ipv4_network(cidr: str) -> None:
    """A network given with host bits set ("10.232.0.1/24") is refused, not silently masked."""
    doc = with_(ha_cidr=cidr)
    if cidr == "10.232.0.0":  # a /32: its one address cannot hold three HA IPs
        assert field_of(doc) == "nodes.aoc1.ha_ip"
    else:
        assert field_of(doc) == "ha_cidr"


# --- the management IP --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "management_ip",
    [
        "10.232.0.200/24",  # a free address on the HA network
        "10.232.0.1/24",  # the active's HA IP
        "10.232.0.3/32",  # the witness's HA IP, as a host route
        "10.232.0.100/16",  # a management network that contains the HA network
        "10.232.0.100/25",  # a management network inside the HA network
    ],
)
def test_a_management_ip_on_the_ha_network(management_ip: str) -> None:
    err = refused(with_(management_ip=management_ip))
    assert err.fields["field"] == "management_ip" and "HA network" in err.message


@pytest.mark.parametrize("ha_ip", ["10.232.0.1", "10.232.0.2", "10.232.0.3"])
def test_a_management_ip_equal_to_an_ha_ip(ha_ip: str) -> None:
    """An operator who pastes an HA IP as the management IP, with the management prefix."""
    assert field_of(with_(management_ip=f"{ha_ip}/24")) == "management_ip"


def test_a_management_ip_without_its_prefix() -> None:
    err = refused(with_(management_ip="10.233.0.200"))
    assert err.fields["field"] == "management_ip" and "prefix" in err.message


@pytest.mark.parametrize(
    "management_ip", ["10.233.0.200/33", "10.233.0/24", "mgmt", "", "fd::1/64"]
)
def test_a_management_ip_that_is_not_address_and_prefix(management_ip: str) -> None:
    assert field_of(with_(management_ip=management_ip)) == "management_ip"


# --- data directories ---------------------------------------------------------------------------


def test_a_witness_given_a_data_dir() -> None:
    err = refused(with_node(2, data_dir="/srv/pg"))
    assert err.fields["field"] == "nodes.aoc3.data_dir" and "witness" in err.message


@pytest.mark.parametrize(("index", "name", "role"), [(0, "aoc1", "active"), (1, "aoc2", "passive")])
def test_a_data_node_without_a_data_dir(index: int, name: str, role: str) -> None:
    doc = good()
    del doc["nodes"][index]["data_dir"]
    err = refused(doc)
    assert err.fields["field"] == f"nodes.{name}.data_dir" and role in err.message


def test_a_data_node_with_a_null_data_dir() -> None:
    assert field_of(with_node(0, data_dir=None)) == "nodes.aoc1.data_dir"


# --- the cluster id -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cluster_id",
    ["", "ab", "Aoc-prod", "aoc_prod", "-aoc", "aoc-", "9aoc", "aoc prod", "a" * 33, "aoc-prod\n"],
)
def test_a_bad_cluster_id(cluster_id: str) -> None:
    assert field_of(with_(cluster_id=cluster_id)) == "cluster_id"


@pytest.mark.parametrize("cluster_id", ["abc", "a" * 32, "aoc-2-prod"])
def test_a_good_cluster_id(cluster_id: str) -> None:
    assert parse(with_(cluster_id=cluster_id)).cluster_id == cluster_id


def test_a_missing_cluster_id() -> None:
    doc = good()
    del doc["cluster_id"]
    assert field_of(doc) == "cluster_id"


# --- unknown fields and documents that are not a topology ---------------------------------------


def test_an_unknown_top_level_field() -> None:
    """A misspelt field is refused, not ignored ("managment_ip" would lose the real one)."""
    doc = good()
    doc["vip"] = "10.233.0.200/24"
    assert field_of(doc) == "vip"


def test_an_unknown_node_field() -> None:
    assert field_of(with_node(1, datadir="/srv/pg")) == "nodes.1.datadir"


@pytest.mark.parametrize("doc", [[], "aoc-prod", None, 3])
def test_a_document_that_is_not_an_object(doc: Any) -> None:
    assert field_of(doc) == "topology"


def test_load_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as e:
        load(tmp_path / "nope.json")
    assert e.value.fields["field"] == "topology" and "nope.json" in e.value.message


def test_load_of_a_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "topology.json"
    path.write_text("cluster_id: aoc-prod\n")
    with pytest.raises(InvalidInput) as e:
        load(path)
    assert e.value.fields["field"] == "topology"


def test_load_names_the_field_of_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(with_node(2, data_dir="/srv/pg")))
    with pytest.raises(InvalidInput) as e:
        load(path)
    assert e.value.fields["field"] == "nodes.aoc3.data_dir"


def test_check_refuses_a_model_built_in_code() -> None:
    """The lab builds its ``Topology`` directly: ``check`` holds it to the same rules."""
    nodes = [
        HANode(name="aoc1", role=Role.ACTIVE, ha_ip="10.232.0.1", data_dir=Path("/srv/pg")),
        HANode(name="aoc2", role=Role.ACTIVE, ha_ip="10.232.0.2", data_dir=Path("/srv/pg")),
        HANode(name="aoc3", role=Role.WITNESS, ha_ip="10.232.0.3"),
    ]
    t = Topology(
        cluster_id="aoc-prod", ha_cidr="10.232.0.0/24", management_ip="10.233.0.200/24", nodes=nodes
    )
    with pytest.raises(InvalidInput) as e:
        check(t)
    assert e.value.fields["field"] == "nodes"


def test_a_refusal_does_not_change_the_document() -> None:
    doc = with_node(2, data_dir="/srv/pg")
    before = copy.deepcopy(doc)
    refused(doc)
    assert doc == before


# --- helpers ------------------------------------------------------------------------------------


def test_leader_key_is_patronis_under_its_namespace_and_scope() -> None:
    assert parse(good()).leader_key == "/service/aoc-prod/leader"


def test_etcd_endpoints_are_every_members_client_url() -> None:
    assert parse(good()).etcd_endpoints() == [
        "10.232.0.1:2379",
        "10.232.0.2:2379",
        "10.232.0.3:2379",
    ]


def test_initial_cluster_names_every_member_with_its_https_peer_url() -> None:
    assert parse(good()).initial_cluster() == (
        "aoc1=https://10.232.0.1:2380,aoc2=https://10.232.0.2:2380,aoc3=https://10.232.0.3:2380"
    )


def test_management_address_is_the_ip_without_its_prefix() -> None:
    t = parse(good())
    assert t.management_address == "10.233.0.200" and t.management_ip == "10.233.0.200/24"


def test_data_nodes_are_the_active_and_the_passive() -> None:
    t = parse(good())
    assert [n.name for n in t.data_nodes] == ["aoc1", "aoc2"]
    assert all(n.data_dir is not None for n in t.data_nodes)


def test_node_and_by_role() -> None:
    t = parse(good())
    assert t.node("aoc2").role is Role.PASSIVE
    assert t.by_role(Role.WITNESS).name == "aoc3"
    with pytest.raises(InvalidInput) as e:
        t.node("aoc9")
    assert e.value.fields["field"] == "node" and "aoc-prod" in e.value.message


# --- inputs refused since the review ----------------------------------------------------------


@pytest.mark.parametrize("ha_ip", ["10.232.0.0", "10.232.0.255"])
def test_refused_an_ha_ip_that_is_the_network_or_broadcast_address(ha_ip: str) -> None:
    assert field_of(with_node(1, ha_ip=ha_ip)) == "nodes.aoc2.ha_ip"


@pytest.mark.parametrize(
    "management_ip",
    ["10.233.0.0/24", "10.233.0.255/24", "127.0.0.1/8", "0.0.0.0/8", "224.0.0.1/24"],
)
def test_refused_a_management_ip_that_no_host_can_use(management_ip: str) -> None:
    assert field_of(with_(management_ip=management_ip)) == "management_ip"


@pytest.mark.parametrize("data_dir", ["", "pg", "./pg"])
def test_refused_a_relative_data_dir(data_dir: str) -> None:
    assert field_of(with_node(0, data_dir=data_dir)) == "nodes.aoc1.data_dir"


def test_refused_a_node_name_the_ca_would_refuse() -> None:
    """``aoc-`` passes the topology but ``ClusterCA.issue_node`` refuses it (names.NAME_RE)."""
    assert field_of(with_node(0, name="aoc-")) == "nodes.0.name"


@pytest.mark.parametrize("iface", ["", "mgmt 0", "a-very-long-interface-name"])
def test_refused_a_management_iface_that_is_no_interface_name(iface: str) -> None:
    assert field_of(with_(management_iface=iface)) == "management_iface"
