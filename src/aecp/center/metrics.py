"""``/metrics`` in the Prometheus text format: requests by route and status with their
latencies, per cluster how old the center's copy is and whether it answers, and the tasks by
state."""

from __future__ import annotations

import time
from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import Session as DB

from aecp.center.db.models import Cluster, ClusterSync, Task

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestMetrics:
    def __init__(self) -> None:
        self.count: dict[tuple[str, str, int], int] = defaultdict(int)
        self.buckets: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.total: dict[tuple[str, str], float] = defaultdict(float)
        self.n: dict[tuple[str, str], int] = defaultdict(int)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.count[(method, route, status)] += 1
        key = (method, route)
        self.total[key] += seconds
        self.n[key] += 1
        for i, le in enumerate(BUCKETS):
            if seconds <= le:
                self.buckets[key][i] += 1

    def render(self, db: DB, now: float) -> str:
        out = [
            "# HELP aoc_requests_total HTTP requests answered, by route and status.",
            "# TYPE aoc_requests_total counter",
        ]
        for (method, route, status), n in sorted(self.count.items()):
            out.append(
                f'aoc_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}'
            )
        out += [
            "# HELP aoc_request_seconds Time to answer, by route.",
            "# TYPE aoc_request_seconds histogram",
        ]
        for (method, route), counts in sorted(self.buckets.items()):
            labels = f'method="{method}",route="{route}"'
            for le, hits in zip(BUCKETS, counts, strict=True):
                out.append(f'aoc_request_seconds_bucket{{{labels},le="{le}"}} {hits}')
            out.append(
                f'aoc_request_seconds_bucket{{{labels},le="+Inf"}} {self.n[(method, route)]}'
            )
            out.append(f"aoc_request_seconds_sum{{{labels}}} {self.total[(method, route)]:.6f}")
            out.append(f"aoc_request_seconds_count{{{labels}}} {self.n[(method, route)]}")
        out += [
            "# HELP aoc_cluster_sync_age_seconds Age of the center's copy of each cluster.",
            "# TYPE aoc_cluster_sync_age_seconds gauge",
            "# HELP aoc_cluster_reachable 1 if the cluster answered the center's last call.",
            "# TYPE aoc_cluster_reachable gauge",
        ]
        for cl in db.scalars(select(Cluster).order_by(Cluster.name)):
            sync = db.get(ClusterSync, cl.name)
            age = now - sync.last_sync_at if sync and sync.last_sync_at else float("nan")
            ok = 1 if sync is not None and sync.state == "ok" else 0
            out.append(f'aoc_cluster_sync_age_seconds{{cluster="{cl.name}"}} {age:.3f}')
            out.append(f'aoc_cluster_reachable{{cluster="{cl.name}"}} {ok}')
        out += [
            "# HELP aoc_tasks Tasks by state.",
            "# TYPE aoc_tasks gauge",
        ]
        by_state = {
            state: n
            for state, n in db.execute(select(Task.state, func.count()).group_by(Task.state))
        }
        for state in ("pending", "executing", "succeeded", "failed", "cancelled"):
            out.append(f'aoc_tasks{{state="{state}"}} {by_state.get(state, 0)}')
        return "\n".join(out) + "\n"


def timer() -> float:
    return time.perf_counter()
