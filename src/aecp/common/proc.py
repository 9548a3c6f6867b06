"""Subprocesses: argv lists only (never a shell string), with captured output and clear errors."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from aecp.common.errors import AecpError


class CommandFailed(AecpError):
    """A command exited non-zero; carries argv, exit code and output."""

    code = "command_failed"

    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        super().__init__(
            f"{argv[0]} exited with {returncode}: {output.strip()[-2000:]}",
            argv=list(argv),
            returncode=returncode,
        )
        self.returncode = returncode
        self.output = output


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 600,
    input_data: bytes | None = None,
) -> Result:
    """Run ``argv`` to completion and capture its output.

    Raises ``CommandFailed`` when ``check`` and the exit code is not 0. Blocking: call it from a
    thread (``arun``) when inside an event loop.
    """
    if isinstance(argv, str):
        raise TypeError("argv must be a list, not a shell string")
    full_env = None if env is None else {**os.environ, **env}
    proc = subprocess.run(  # noqa: S603 - argv list, no shell
        list(argv),
        cwd=cwd,
        env=full_env,
        capture_output=True,
        timeout=timeout,
        input=input_data,
        check=False,
    )
    res = Result(
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, res.stderr + res.stdout)
    return res


async def arun(argv: Sequence[str], **kwargs: object) -> Result:
    """``run`` in a worker thread, so the event loop never blocks on a child."""
    return await asyncio.to_thread(run, argv, **kwargs)  # type: ignore[arg-type]


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pid_cmdline(pid: int) -> list[str]:
    """The argv of a running process, or [] if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def read_pidfile(path: Path) -> int | None:
    """The pid in ``path`` if the file exists and names a live process, else None."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def kill(pid: int, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Send ``sig`` to ``pid``; False if it was already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


async def wait_pid_exit(pid: int, timeout: float, poll: float = 0.05) -> bool:
    """Wait until ``pid`` is gone (reaping it if it is our child); True if it exited in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
        except ChildProcessError:
            done = 0
        if done == pid or not pid_alive(pid):
            return True
        await asyncio.sleep(poll)
    return not pid_alive(pid)
