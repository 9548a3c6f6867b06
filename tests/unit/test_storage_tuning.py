"""``tune_malloc``: large request buffers are reused from the heap instead of being mapped,
faulted in and unmapped again for every request."""

from __future__ import annotations

import subprocess
import sys

ROUNDS = """
import resource, sys
if sys.argv[1] == "tuned":
    from aecp.node.storage_server import tune_malloc
    assert tune_malloc()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # 50 rounds of 16 request buffers of 1 MiB, as a burst of 1 MiB writes
    buffers = [bytearray(1 << 20) for _ in range(16)]
    del buffers
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    argv = [sys.executable, "-c", ROUNDS, mode]
    return int(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)


def test_tuned_malloc_faults_in_request_buffers_once_not_every_round() -> None:
    default, tuned = page_faults("default"), page_faults("tuned")
    assert tuned < 16 * 256 * 3  # about one round's pages (16 MiB of 4 KiB pages)
    assert default > 10 * tuned  # glibc's default gives the memory back after every round
