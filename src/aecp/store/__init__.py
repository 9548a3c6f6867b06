"""The cluster store: contract (base), etcd adapter, in-memory double (memory), key layout."""

from aecp.store.base import (
    ChangeKind,
    Compare,
    Delete,
    KeyValue,
    Lease,
    Put,
    Store,
    WatchEvent,
)

__all__ = ["ChangeKind", "Compare", "Delete", "KeyValue", "Lease", "Put", "Store", "WatchEvent"]
