"""Shared fixtures of the integration tier: real etcd clusters on loopback addresses.

``etcd_cluster`` is a module-scoped factory: ``etcd_cluster(hosts)`` returns an ``EtcdCluster``
(not started, TLS with client certificates from a CA of its own) whose data dirs, logs,
pidfiles and credentials live in a fresh temporary directory. Start it
with ``await cluster.start()``; that call is idempotent (it restarts members a test killed and
waits until all answer), so a function-scoped async fixture may call it before every test. Every
member of every cluster the factory made is stopped when the module ends, pass or fail.

``etcd3_cluster`` is the usual 3-member cluster on 127.0.50.1-3 (client port 2379, peer 2380).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest

from aecp.common.pki import ClusterCA
from aecp.lab.etcd import EtcdCluster

ETCD3_HOSTS = ("127.0.50.1", "127.0.50.2", "127.0.50.3")

MakeEtcdCluster = Callable[..., EtcdCluster]


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeEtcdCluster]:
    made: list[EtcdCluster] = []

    def make(
        hosts: Sequence[str] = ETCD3_HOSTS, *, client_port: int = 2379, peer_port: int = 2380
    ) -> EtcdCluster:
        base = tmp_path_factory.mktemp("etcd")
        ca = ClusterCA.create(base / "pki", base.name)
        cluster = EtcdCluster.on_loopback(
            base, hosts, ca, client_port=client_port, peer_port=peer_port, token=base.name
        )
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        failures: list[Exception] = []
        for cluster in made:
            try:
                cluster.stop()
            except Exception as e:
                failures.append(e)
        if failures:
            raise failures[0]


@pytest.fixture(scope="module")
def etcd3_cluster(etcd_cluster: MakeEtcdCluster) -> EtcdCluster:
    return etcd_cluster(ETCD3_HOSTS)
