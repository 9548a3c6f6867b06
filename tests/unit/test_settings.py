"""Node settings: typed, and every problem in a file reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from aecp.common.errors import ConfigError
from aecp.compute.qemu.argv import longest_socket
from aecp.conf.settings import MAX_SOCKET_PATH, load, parse
from aecp.node.main import check_runtime_paths, run_node


def good() -> dict[str, object]:
    return {
        "name": "node1",
        "address": "127.0.1.1",
        "data_dir": "/tmp/d",
        "images_dir": "/tmp/i",
        "security": {"tls_dir": "/tmp/pki"},
    }


def test_defaults_fill_the_groups() -> None:
    s = parse(good())
    assert s.agent.lease_ttl == 10 and s.compute.accel == "auto"
    assert s.api_url == "http://127.0.1.1:8700"


def test_every_problem_is_reported_at_once() -> None:
    bad = good() | {
        "name": "Node_1",
        "address": "nowhere",
        "agent": {"lease_ttl": 1, "bogus": 2},
        "store": {"endpoints": ["x"]},
    }
    with pytest.raises(ConfigError) as err:
        parse(bad)
    problems = " | ".join(err.value.fields["problems"])
    assert "agent.lease_ttl" in problems and "agent.bogus" in problems


def test_semantic_problems_are_reported_together() -> None:
    bad = good() | {"name": "Node_1", "address": "nowhere", "store": {"endpoints": ["x"]}}
    with pytest.raises(ConfigError) as err:
        parse(bad)
    problems = err.value.fields["problems"]
    assert len(problems) == 3
    assert any(p.startswith("name:") for p in problems)
    assert any(p.startswith("address:") for p in problems)
    assert any(p.startswith("store.endpoints:") for p in problems)


def test_an_unreadable_or_non_json_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not JSON"):
        load(tmp_path / "bad.json")


def test_a_data_dir_too_long_for_the_nbd_socket_is_refused() -> None:
    with pytest.raises(ConfigError, match="data_dir: too long"):
        parse(good() | {"data_dir": "/" + "d" * 100})


def test_the_nbd_socket_is_outside_the_run_dir_where_vms_have_their_directories() -> None:
    """A VM named nbd has run_dir/nbd, which its delete removes (found by review)."""
    s = parse(good())
    assert s.run_dir not in s.nbd_socket.parents


async def test_a_data_dir_too_long_for_the_vm_sockets_is_refused_before_the_node_starts() -> None:
    """Review finding: only the NBD socket was checked; VM sockets are longer (run/.sock/
    <16 hex>.console), so a data_dir that passed validation failed every VM's launch."""
    data_dir = Path("/nonexistent-aecp") / ("d" * 60)
    settings = parse(good() | {"data_dir": str(data_dir)})  # the NBD socket fits
    assert len(str(settings.nbd_socket)) <= MAX_SOCKET_PATH
    with pytest.raises(ConfigError, match="data_dir: too long: a VM's console socket"):
        await run_node(settings)
    assert not data_dir.exists()
    longest = longest_socket(settings.run_dir)
    assert longest.name.endswith(".console") and len(str(longest)) > MAX_SOCKET_PATH
    check_runtime_paths(parse(good()))  # the default layout fits
