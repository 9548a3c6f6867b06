"""What both node processes (the agent and the storage server) build alike from the node's
settings to reach ABS: Meta, and the credentials of replica connections."""

from __future__ import annotations

from aecp.cluster.volumeowners import ClusterOwners
from aecp.common.clock import Clock
from aecp.common.pki import Bundle
from aecp.common.tls import Credentials
from aecp.conf.settings import NodeSettings
from aecp.storage.chunk.auth import ReplicaAuth
from aecp.storage.meta.model import MIB
from aecp.storage.meta.service import MetaService
from aecp.store.base import Store


def meta_service(settings: NodeSettings, store: Store, clock: Clock) -> MetaService:
    """ABS Meta over ``store`` with this node's extent size and overcommit ratio, asking the
    cluster who owns a volume."""
    return MetaService(
        store,
        settings.storage.extent_mib * MIB,
        clock,
        overcommit_ratio=settings.storage.overcommit_ratio,
        owners=ClusterOwners(store),
    )


def replica_auth(settings: NodeSettings, credentials: Credentials | None = None) -> ReplicaAuth:
    """This node's side of replica authentication (encrypting if the settings say so)."""
    creds = credentials or Credentials(Bundle(settings.security.tls_dir))
    return ReplicaAuth(creds, settings.security.replica_encryption)
