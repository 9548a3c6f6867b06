"""The cluster store: contract (base), etcd adapter, in-memory double (memory), key layout."""

from aecp.store.base import (
    Compare,
    Delete,
    EventKind,
    KeyValue,
    Lease,
    Put,
    Store,
    WatchEvent,
)

__all__ = ["Compare", "Delete", "EventKind", "KeyValue", "Lease", "Put", "Store", "WatchEvent"]
