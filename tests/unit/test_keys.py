"""The key layout: one place names every key, and VM keys split back into (vm, part)."""

from aecp.store import keys


def test_vm_keys_live_under_one_prefix_per_vm() -> None:
    assert keys.vm_spec("vm1").startswith(keys.vm_prefix("vm1"))
    assert keys.vm_status("vm1").startswith(keys.vm_prefix("vm1"))
    assert keys.vm_placement("vm1").startswith(keys.vm_prefix("vm1"))
    assert not keys.vm_spec("vm10").startswith(keys.vm_prefix("vm1"))


def test_split_vm_key_returns_vm_and_part() -> None:
    assert keys.split_vm_key(keys.vm_status("web-1")) == ("web-1", "status")
    assert keys.split_vm_key(keys.node("n1")) is None
    assert keys.split_vm_key(keys.VMS + "x") is None


def test_every_root_is_under_the_aecp_prefix() -> None:
    for prefix in (
        keys.CLUSTER,
        keys.NODES,
        keys.ALIVE,
        keys.VMS,
        keys.IMAGES,
        keys.OPS,
        keys.LEADERS,
    ):
        assert prefix.startswith(keys.ROOT)
    assert keys.last_segment(keys.alive("n2"), keys.ALIVE) == "n2"
