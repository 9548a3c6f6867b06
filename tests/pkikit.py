"""Test support: a cluster CA in a temporary directory and the credentials tests need from it
(node bundles, replica authentication)."""

from __future__ import annotations

from pathlib import Path

from aecp.common.pki import Bundle, ClusterCA
from aecp.common.tls import Credentials
from aecp.storage.chunk.auth import ReplicaAuth


class TestPKI:
    """A CA under ``root`` that issues node bundles on demand (addresses: ``address``)."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, root: Path, address: str = "127.0.0.1") -> None:
        self.ca = ClusterCA.create(root, "test")
        self.address = address

    def node(self, name: str) -> Bundle:
        bundle = self.ca.node_bundle(name)
        return bundle if bundle.cert_file.exists() else self.ca.issue_node(name, [self.address])

    def replica_auth(self, name: str, *, encrypt: bool = False) -> ReplicaAuth:
        return ReplicaAuth(Credentials(self.node(name)), encrypt)
