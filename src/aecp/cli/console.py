"""Interactive serial console over the node's WebSocket; Ctrl-] detaches."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import tty

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from aecp.cli.client import ApiError

DETACH = b"\x1d"  # Ctrl-]


def attach(api_url: str, vm: str, token: str) -> None:
    url = api_url.replace("http://", "ws://", 1) + f"/v1/vms/{vm}/console"
    try:
        ws = connect(url, additional_headers={"authorization": f"Bearer {token}"}, open_timeout=10)
    except (InvalidStatus, OSError) as exc:
        raise ApiError(f"cannot attach to the console of {vm}: {exc}") from None
    sys.stderr.write(f"attached to {vm}'s serial console; Ctrl-] detaches\r\n")
    with ws:
        reader = threading.Thread(target=_print_from, args=(ws,), daemon=True)
        reader.start()
        if sys.stdin.isatty():
            _interactive(ws)
        else:
            _piped(ws)
    sys.stderr.write("\r\ndetached\r\n")


def _print_from(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        for msg in ws:
            data = msg if isinstance(msg, bytes) else msg.encode()
            os.write(sys.stdout.fileno(), data)


def _interactive(ws: ClientConnection) -> None:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        while True:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            data = os.read(fd, 1024)
            if not data or DETACH in data:
                return
            ws.send(data)
    except ConnectionClosed:
        return
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _piped(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        for line in sys.stdin.buffer:
            ws.send(line)
    # let the guest answer the last command before detaching
    threading.Event().wait(1.0)
