"""A detached daemon process the lab starts and later finds again by pidfile (from any process):
the node agents. Signals go only to the pid this lab started, checked against its command line."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from aecp.common.proc import pid_alive, pid_cmdline, read_pidfile

# Popen objects of daemons started by this process, kept until the daemon is stopped so that
# they are reaped (no zombies) and never garbage-collected while running.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class Daemon:
    """``argv`` run detached (own session), output appended to ``log_file``, pid in ``pidfile``.

    ``marker`` is a string that must appear in the process's argv for a pidfile to count as ours.
    """

    def __init__(self, argv: Sequence[str], pidfile: Path, log_file: Path, marker: str) -> None:
        self.argv = list(argv)
        self.pidfile = pidfile
        self.log_file = log_file
        self.marker = marker

    def pid(self) -> int | None:
        pid = read_pidfile(self.pidfile)
        if pid is not None and self.marker in " ".join(pid_cmdline(pid)):
            return pid
        return None

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(self, env: dict[str, str] | None = None) -> int:
        """Launch unless already running; returns the pid."""
        pid = self.pid()
        if pid is not None:
            return pid
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(  # noqa: S603 - argv list
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        _CHILDREN[proc.pid] = proc
        self.pidfile.write_text(f"{proc.pid}\n")
        return proc.pid

    def signal(self, sig: signal.Signals) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; removes the pidfile."""
        pid = self.pid()
        if pid is not None:
            self.signal(signal.SIGTERM)
            if not wait_gone(pid, timeout):
                self.signal(signal.SIGKILL)
                wait_gone(pid, 5.0)
        self.pidfile.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: a crash, no clean-up by the process."""
        pid = self.pid()
        if pid is not None:
            self.signal(signal.SIGKILL)
            wait_gone(pid, 5.0)
        self.pidfile.unlink(missing_ok=True)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit, reaping it if it is our child."""
    deadline = time.monotonic() + timeout
    child = _CHILDREN.get(pid)
    if child is not None:
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        del _CHILDREN[pid]
        return True
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = 0
        if done == pid or not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def kill_pidfiles(pidfiles: Sequence[Path], marker_of: dict[Path, str]) -> list[int]:
    """SIGKILL every live process named by ``pidfiles`` whose argv contains its marker."""
    killed = []
    for pf in pidfiles:
        pid = read_pidfile(pf)
        if pid is None or marker_of.get(pf, "") not in " ".join(pid_cmdline(pid)):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        wait_gone(pid, 5.0)
        killed.append(pid)
    return killed
