"""The root actions build the argv they should, and refuse bad input before anything runs.

Every test runs with ``rootops.run_root`` replaced: by default with a function that fails the
test, so no command can really run; tests that expect commands get a recorder instead."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from aecp.common.errors import InvalidInput
from aecp.common.proc import CommandFailed, Result
from aecp.lab import netns
from aecp.network import rootops


class Recorder:
    """Stands in for ``run_root``: records each argv and answers with canned results."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.inputs: list[bytes | None] = []
        self.stdout = ""
        self.fail_with: str | None = None

    async def __call__(self, argv: Sequence[str], *, input_data: bytes | None = None) -> Result:
        self.calls.append(list(argv))
        self.inputs.append(input_data)
        if self.fail_with is not None:
            raise CommandFailed(argv, 1, self.fail_with)
        return Result(0, self.stdout, "")


@pytest.fixture(autouse=True)
def no_real_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(argv: Sequence[str], *, input_data: bytes | None = None) -> Result:
        raise AssertionError(f"a unit test tried to run a root command: {argv}")

    monkeypatch.setattr(rootops, "run_root", refuse)


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(rootops, "run_root", recorder)
    return recorder


async def test_the_chokepoint_is_replaced_so_a_command_would_fail_the_test() -> None:
    with pytest.raises(AssertionError, match="tried to run a root command"):
        await rootops.link_up("eth0")


async def test_netns_add_creates_the_namespace_and_brings_its_loopback_up(rec: Recorder) -> None:
    await rootops.netns_add("aecp-ab12-n1")
    assert rec.calls == [
        ["ip", "netns", "add", "aecp-ab12-n1"],
        ["ip", "-n", "aecp-ab12-n1", "link", "set", "lo", "up"],
    ]


async def test_netns_delete_of_a_missing_namespace_is_not_an_error(rec: Recorder) -> None:
    rec.fail_with = 'Cannot remove namespace file "/run/netns/x": No such file or directory'
    await rootops.netns_delete("x")
    assert rec.calls == [["ip", "netns", "delete", "x"]]


async def test_netns_delete_reports_other_failures(rec: Recorder) -> None:
    rec.fail_with = "Operation not permitted"
    with pytest.raises(CommandFailed):
        await rootops.netns_delete("x")


async def test_netns_list_reads_the_names(rec: Recorder) -> None:
    rec.stdout = "aecp-1-n2 (id: 1)\naecp-1-n1 (id: 0)\nplain\n"
    assert await rootops.netns_list() == ["aecp-1-n2", "aecp-1-n1", "plain"]
    assert rec.calls == [["ip", "netns", "list"]]


def test_in_netns_prefixes_ip_netns_exec() -> None:
    assert rootops.in_netns("ns1", ["etcd", "--name", "n1"]) == [
        "ip",
        "netns",
        "exec",
        "ns1",
        "etcd",
        "--name",
        "n1",
    ]


def test_in_netns_refuses_a_shell_string() -> None:
    with pytest.raises(TypeError):
        rootops.in_netns("ns1", "etcd --name n1")


async def test_bridge_add_in_the_root_namespace_and_in_another(rec: Recorder) -> None:
    await rootops.bridge_add("br-mgmt")
    await rootops.bridge_add("br0", netns="ns1")
    assert rec.calls == [
        ["ip", "link", "add", "br-mgmt", "type", "bridge"],
        ["ip", "-n", "ns1", "link", "add", "br0", "type", "bridge"],
    ]


async def test_veth_add_can_put_its_peer_into_a_namespace(rec: Recorder) -> None:
    await rootops.veth_add("h1", "p1")
    await rootops.veth_add("h2", "p2", peer_netns="ns1")
    assert rec.calls == [
        ["ip", "link", "add", "h1", "type", "veth", "peer", "name", "p1"],
        ["ip", "link", "add", "h2", "type", "veth", "peer", "name", "p2", "netns", "ns1"],
    ]


async def test_tap_add_makes_a_persistent_tap(rec: Recorder) -> None:
    await rootops.tap_add("tap-vm1", netns="ns1")
    assert rec.calls == [["ip", "-n", "ns1", "tuntap", "add", "dev", "tap-vm1", "mode", "tap"]]


async def test_vlan_add_tags_the_id_on_the_parent(rec: Recorder) -> None:
    await rootops.vlan_add("vmup", "vmup.42", 42)
    assert rec.calls == [
        ["ip", "link", "add", "link", "vmup", "name", "vmup.42", "type", "vlan", "id", "42"]
    ]


async def test_link_actions_build_ip_link_set(rec: Recorder) -> None:
    await rootops.link_set_netns("p1", "ns1")
    await rootops.link_set_master("tap1", "br0", netns="ns1")
    await rootops.link_up("br0")
    await rootops.link_down("h1")
    assert rec.calls == [
        ["ip", "link", "set", "p1", "netns", "ns1"],
        ["ip", "-n", "ns1", "link", "set", "tap1", "master", "br0"],
        ["ip", "link", "set", "br0", "up"],
        ["ip", "link", "set", "h1", "down"],
    ]


async def test_link_delete_of_a_missing_link_is_not_an_error(rec: Recorder) -> None:
    await rootops.link_delete("h1")
    rec.fail_with = 'Cannot find device "h1"'
    await rootops.link_delete("h1", netns="ns1")
    assert rec.calls == [
        ["ip", "link", "delete", "h1"],
        ["ip", "-n", "ns1", "link", "delete", "h1"],
    ]


async def test_link_exists_tells_a_missing_link_from_a_present_one(rec: Recorder) -> None:
    assert await rootops.link_exists("br0") is True
    rec.fail_with = 'Device "br0" does not exist.'
    assert await rootops.link_exists("br0", netns="ns1") is False
    assert rec.calls == [
        ["ip", "link", "show", "dev", "br0"],
        ["ip", "-n", "ns1", "link", "show", "dev", "br0"],
    ]


async def test_addr_add_normalises_the_address(rec: Recorder) -> None:
    await rootops.addr_add("mgmt0", "10.231.0.1/24", netns="ns1")
    assert rec.calls == [["ip", "-n", "ns1", "addr", "add", "10.231.0.1/24", "dev", "mgmt0"]]


async def test_addr_del_removes_the_address_and_a_missing_one_is_not_an_error(
    rec: Recorder,
) -> None:
    await rootops.addr_del("mgmt0", "10.232.0.100/24")
    rec.fail_with = "RTNETLINK answers: Cannot assign requested address"
    await rootops.addr_del("mgmt0", "10.232.0.100/24", netns="ns1")
    rec.fail_with = 'Cannot find device "mgmt0"'
    await rootops.addr_del("mgmt0", "10.232.0.100/24")
    assert rec.calls == [
        ["ip", "addr", "del", "10.232.0.100/24", "dev", "mgmt0"],
        ["ip", "-n", "ns1", "addr", "del", "10.232.0.100/24", "dev", "mgmt0"],
        ["ip", "addr", "del", "10.232.0.100/24", "dev", "mgmt0"],
    ]


async def test_addr_lease_replaces_with_a_lifetime(rec: Recorder) -> None:
    await rootops.addr_lease("mgmt0", "10.233.0.200/24", 3)
    await rootops.addr_lease("mgmt0", "10.233.0.200/24", 3, netns="ns1")
    tail = ["10.233.0.200/24", "dev", "mgmt0", "valid_lft", "3", "preferred_lft", "3"]
    assert rec.calls == [
        ["ip", "addr", "replace", *tail],
        ["ip", "-n", "ns1", "addr", "replace", *tail],
    ]
    with pytest.raises(InvalidInput):
        await rootops.addr_lease("mgmt0", "10.233.0.200/24", 0)


async def test_addr_del_reports_other_failures(rec: Recorder) -> None:
    rec.fail_with = "RTNETLINK answers: Operation not permitted"
    with pytest.raises(CommandFailed):
        await rootops.addr_del("mgmt0", "10.232.0.100/24")


async def test_nft_apply_feeds_the_ruleset_on_stdin(rec: Recorder) -> None:
    await rootops.nft_apply("table inet t {\n}\n")
    await rootops.nft_apply("flush ruleset\n", netns="ns1")
    assert rec.calls == [
        ["nft", "-f", "-"],
        ["ip", "netns", "exec", "ns1", "nft", "-f", "-"],
    ]
    assert rec.inputs == [b"table inet t {\n}\n", b"flush ruleset\n"]


BAD_NAMES = ["", "a" * 16, "eth 0", "eth0;reboot", "br/0", "..", "tap$x", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_a_bad_interface_name_is_refused_before_anything_runs(name: str) -> None:
    for action in (rootops.bridge_add, rootops.tap_add, rootops.link_up, rootops.link_delete):
        with pytest.raises(InvalidInput) as err:
            await action(name)
        assert err.value.fields["field"] == "interface"
    with pytest.raises(InvalidInput):
        await rootops.veth_add("ok0", name)
    with pytest.raises(InvalidInput):
        await rootops.link_set_master("ok0", name)


@pytest.mark.parametrize("ns", ["", "ns 1", "ns;x", "a" * 65, "../etc"])
async def test_a_bad_namespace_name_is_refused_before_anything_runs(ns: str) -> None:
    with pytest.raises(InvalidInput):
        await rootops.netns_add(ns)
    with pytest.raises(InvalidInput):
        await rootops.link_up("eth0", netns=ns)
    with pytest.raises(InvalidInput):
        rootops.in_netns(ns, ["true"])


@pytest.mark.parametrize("vid", [0, 4095, -1, 70000, True])
async def test_a_vlan_outside_1_to_4094_is_refused_before_anything_runs(vid: int) -> None:
    with pytest.raises(InvalidInput) as err:
        await rootops.vlan_add("vmup", "vmup.x", vid)
    assert err.value.fields["field"] == "vlan"


@pytest.mark.parametrize("cidr", ["10.0.0.1", "10.0.0.300/24", "10.0.0.1/33", "eth0", ""])
async def test_a_bad_cidr_is_refused_before_anything_runs(cidr: str) -> None:
    for action in (rootops.addr_add, rootops.addr_del):
        with pytest.raises(InvalidInput) as err:
            await action("eth0", cidr)
        assert err.value.fields["field"] == "address"


async def test_addr_list_reads_interface_and_address(rec: Recorder) -> None:
    rec.stdout = (
        "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n"
        "4: eth0    inet6 fd00::2/64 scope global nodad \\       valid_lft forever\n"
        "9: mgmt0@if12    inet 10.231.0.1/24 scope global mgmt0\n"
    )
    assert await rootops.addr_list(netns="ns1") == [
        ("lo", "127.0.0.1/8"),
        ("eth0", "fd00::2/64"),
        ("mgmt0", "10.231.0.1/24"),
    ]
    assert rec.calls == [["ip", "-n", "ns1", "-o", "addr", "show"]]


# --- the netns lab's plumbing goes through the same chokepoint ----------------------------------


async def test_the_netns_lab_plumbs_one_node_with_three_veths(rec: Recorder) -> None:
    plan = netns.NetnsPlan("ab12", 1, "10.231.0.0/24", "10.231.1.0/24")
    await netns.create(plan)
    ns = "aecp-ab12-n1"
    assert rec.calls[0] == ["ip", "-o", "addr", "show"]
    assert rec.calls[1:4] == [
        ["ip", "link", "add", "aeab12m", "type", "bridge"],
        ["ip", "addr", "add", "10.231.0.254/24", "dev", "aeab12m"],
        ["ip", "link", "set", "aeab12m", "up"],
    ]
    assert ["ip", "netns", "add", ns] in rec.calls
    veth = f"ip link add aeab12n1s type veth peer name stor0 netns {ns}"
    assert veth.split() in rec.calls
    assert ["ip", "-n", ns, "addr", "add", "10.231.1.1/24", "dev", "stor0"] in rec.calls
    assert ["ip", "link", "set", "aeab12n1v", "master", "aeab12v"] in rec.calls
    assert not [c for c in rec.calls if "addr" in c and "aeab12v" in c]  # vm bridge: no address


async def test_the_netns_lab_refuses_a_subnet_already_in_use(rec: Recorder) -> None:
    rec.stdout = "7: br9    inet 10.231.1.254/24 scope global br9\n"
    plan = netns.NetnsPlan("ab12", 3, "10.231.0.0/24", "10.231.1.0/24")
    with pytest.raises(InvalidInput, match="in use on this host"):
        await netns.create(plan)
    assert rec.calls == [["ip", "-o", "addr", "show"]]


async def test_the_netns_lab_teardown_deletes_namespaces_then_veths_then_bridges(
    rec: Recorder,
) -> None:
    rec.fail_with = 'Cannot find device "x"'  # nothing is left: still no error
    await netns.destroy(netns.NetnsPlan("ab12", 2, "10.231.0.0/24", "10.231.1.0/24"))
    assert rec.calls[:2] == [
        ["ip", "netns", "delete", "aecp-ab12-n1"],
        ["ip", "netns", "delete", "aecp-ab12-n2"],
    ]
    assert rec.calls[-1] == ["ip", "link", "delete", "aeab12v"]
    assert len(rec.calls) == 2 + 6 + 3


def test_the_netns_lab_names_fit_in_an_interface_name() -> None:
    plan = netns.NetnsPlan("abcdef", 9, "10.231.0.0/24", "10.231.1.0/24")
    for net in netns.NETWORKS:
        rootops.check_ifname(plan.bridge(net))
        rootops.check_ifname(plan.host_veth(9, net))
        rootops.check_ifname(netns.NODE_IFACE[net])
    rootops.check_netns(plan.namespace(9))


def test_the_netns_lab_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(InvalidInput, match="the netns lab needs root"):
        netns.require_root()
