"""``/v1/vms/{name}/console``: the serial console of a VM (``cluster.console`` decides).

``GET .../console/log`` works on any node (it is relayed from the VM's node); the interactive
WebSocket is served by the VM's node only (clients look the node up with ``GET /v1/vms/{name}``).
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse

from aecp.cluster.api.deps import Consoles, NamePath, authorize
from aecp.cluster.api.routing import api_router
from aecp.cluster.console import MAX_LOG
from aecp.common.apierrors import error_responses, redact_paths
from aecp.common.errors import AecpError

router = api_router("/v1/vms", "console")
ws_router = APIRouter(prefix="/v1/vms", tags=["console"])  # authenticates inside


@router.get(
    "/{name}/console/log",
    operation_id="get_console_log",
    response_class=PlainTextResponse,
    responses=error_responses(404, 409),
)
async def console_log(
    name: NamePath,
    request: Request,
    consoles: Consoles,
    tail: int = Query(MAX_LOG, ge=1, le=MAX_LOG, description="at most this many last bytes"),
) -> Response:
    where = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    auth = request.headers.get("authorization", "")
    answer = await consoles.log(name, tail, where, auth)
    if answer.status == 200 and (answer.content_type or "").startswith("text/plain"):
        return PlainTextResponse(answer.body.decode(errors="replace"))
    return Response(answer.body, status_code=answer.status, media_type=answer.content_type)


@ws_router.websocket("/{name}/console")
async def console_ws(websocket: WebSocket, name: str) -> None:
    """Bridge the WebSocket to the VM's serial console socket (bytes both ways)."""
    consoles = websocket.app.state.consoles
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    try:
        # typing into a VM's console changes it: an operator's
        caller = await websocket.app.state.principals.authenticate(token)
        authorize(caller, "POST", None)
        path = await consoles.socket(name)
        reader, writer = await asyncio.open_unix_connection(str(path))
    except (AecpError, OSError) as exc:
        await websocket.close(
            code=4000 + getattr(exc, "http_status", 503) % 1000,
            reason=redact_paths(_why(exc))[:120],
        )
        return
    await websocket.accept()
    try:
        await _pump(websocket, reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _why(exc: AecpError | OSError) -> str:
    if isinstance(exc, AecpError):
        return exc.message
    return f"the console is not reachable: {exc.strerror or 'I/O error'}"


async def _pump(ws: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def to_ws() -> None:
        while data := await reader.read(4096):
            await ws.send_bytes(data)

    async def to_console() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                data = await ws.receive_bytes()
                writer.write(data)
                await writer.drain()

    tasks = [asyncio.ensure_future(to_ws()), asyncio.ensure_future(to_console())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await ws.close()
