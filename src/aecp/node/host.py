"""This host's capacity and usage, read from /proc and statvfs."""

from __future__ import annotations

import os
from pathlib import Path

from aecp.model.node import Capacity, Usage


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0])
    return out


def capacity(data_dir: Path, cpus: int | None, memory_mib: int | None) -> Capacity:
    """What the node offers: configured values, else the host's."""
    st = os.statvfs(data_dir)
    return Capacity(
        cpus=cpus or os.cpu_count() or 1,
        memory_mib=memory_mib or meminfo()["MemTotal"] // 1024,
        disk_bytes=st.f_blocks * st.f_frsize,
    )


class UsageSampler:
    """CPU use between two samples, plus memory and disk use now."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._last = self._cpu_times()

    @staticmethod
    def _cpu_times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def sample(self, vms_running: int) -> Usage:
        total, idle = self._cpu_times()
        dt, di = total - self._last[0], idle - self._last[1]
        self._last = (total, idle)
        cpu = 100.0 * (dt - di) / dt if dt > 0 else 0.0
        mem = meminfo()
        st = os.statvfs(self.data_dir)
        return Usage(
            cpu_percent=round(cpu, 1),
            memory_used_mib=(mem["MemTotal"] - mem.get("MemAvailable", 0)) // 1024,
            disk_used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            vms_running=vms_running,
        )
