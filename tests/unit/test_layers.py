"""Imports point down the layers of ARCHITECTURE.md §6; a breach fails here.

``cli | center | node | cluster | lab`` → ``compute | storage | network | protection`` →
``store`` → ``model`` → ``conf`` → ``common``. Top-layer packages may compose one another (the
node process hosts the cluster API; the CLI runs the lab), except ``center``, which reaches
clusters over REST only. Sibling front ends never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aecp

RANK = {
    "cli": 5,
    "center": 5,
    "node": 5,
    "cluster": 5,
    "lab": 5,
    "compute": 4,
    "storage": 4,
    "network": 4,
    "protection": 4,
    "store": 3,
    "model": 2,
    "conf": 1,
    "common": 0,
}
ROOT = Path(aecp.__file__).parent


def imports() -> list[tuple[str, str]]:
    """(importing module path, imported aecp module) for every ``aecp.*`` import."""
    out = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aecp."):
                out.append((str(path.relative_to(ROOT)), node.module))
            elif isinstance(node, ast.Import):
                out += [
                    (str(path.relative_to(ROOT)), a.name)
                    for a in node.names
                    if a.name.startswith("aecp.")
                ]
    return out


def test_every_import_points_down_or_across_the_top_layer() -> None:
    bad = []
    for src, target in imports():
        src_pkg = src.split("/")[0].removesuffix(".py")
        dst_pkg = target.split(".")[1]
        if src_pkg not in RANK or dst_pkg not in RANK:
            continue
        if RANK[dst_pkg] > RANK[src_pkg] or (
            RANK[dst_pkg] == RANK[src_pkg] and src_pkg != dst_pkg and RANK[src_pkg] != 5
        ):
            bad.append(f"{src} imports {target}")
    assert bad == []


# the HA agent's management-IP mover moves an address on its own host: it runs ``ip`` through
# the one root-command chokepoint, which is no way into a cluster
HOST_ACTIONS = {("center/ha/vip.py", "aecp.network")}  # rootops


def test_the_center_reaches_clusters_only_over_rest() -> None:
    bad = [
        f"{s} imports {t}"
        for s, t in imports()
        if s.startswith("center/")
        and t.split(".")[1] in ("compute", "storage", "network", "node", "cluster")
        and (s, t) not in HOST_ACTIONS
    ]
    assert bad == []


def test_sibling_front_ends_do_not_import_each_other() -> None:
    bad = []
    for src, target in imports():
        parts = src.split("/")
        if parts[:2] == ["storage", "frontends"] and len(parts) > 3:
            mine = parts[2]
            if target.startswith("aecp.storage.frontends.") and target.split(".")[3] != mine:
                bad.append(f"{src} imports {target}")
    assert bad == []


def test_abs_knows_nothing_of_vms_or_templates() -> None:
    """Volume owners are asked about through ``storage.meta.owners``, which the cluster
    implements (review finding: the meta service decoded VM specs)."""
    bad = [
        f"{s} imports {t}"
        for s, t in imports()
        if s.startswith("storage/") and t in ("aecp.model.vm", "aecp.model.template")
    ]
    assert bad == []
