"""``/v1/vms/{name}/console``: the serial console of a VM.

``GET .../console/log`` works on any node (it is forwarded to the VM's node); the interactive
WebSocket is served by the VM's node only (clients look the node up with ``GET /v1/vms/{name}``).
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
from fastapi import APIRouter, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse

from aecp.cluster.api.deps import NamePath, Node, Service, authorize
from aecp.cluster.api.errors import error_responses, redact_paths
from aecp.cluster.api.routing import api_router
from aecp.common.errors import AecpError, Conflict, NotFound, Unavailable

router = api_router("/v1/vms", "console")
ws_router = APIRouter(prefix="/v1/vms", tags=["console"])  # authenticates inside

MAX_LOG = 4 * 1024 * 1024


@router.get(
    "/{name}/console/log",
    operation_id="get_console_log",
    response_class=PlainTextResponse,
    responses=error_responses(404, 409),
)
async def console_log(
    name: NamePath,
    request: Request,
    svc: Service,
    node: Node,
    tail: int = Query(MAX_LOG, ge=1, le=MAX_LOG, description="at most this many last bytes"),
) -> Response:
    entry, snap = await svc.vm(name)
    owner = entry.node
    if owner is None:
        raise Conflict(f"VM {name} has not been placed on a node yet", vm=name)
    if owner != node.name:
        if owner not in snap.nodes:
            raise Unavailable(f"VM {name} is on node {owner}, which is not registered")
        return await _forward(snap.nodes[owner].api_url, request)
    path = node.run_dir / name / "console.log"
    data = await asyncio.to_thread(_read_tail, path, tail)
    return PlainTextResponse(data.decode(errors="replace"))


def _read_tail(path: object, tail: int) -> bytes:
    try:
        with open(path, "rb") as f:  # type: ignore[call-overload]
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail))
            data: bytes = f.read()
            return data
    except FileNotFoundError:
        return b""


async def _forward(api_url: str, request: Request) -> Response:
    """The VM's node's answer, relayed as it is (a log, or an error body)."""
    headers = {"authorization": request.headers.get("authorization", "")}
    url = api_url + request.url.path
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            resp = await client.get(url, params=dict(request.query_params), headers=headers)
    except httpx.HTTPError as exc:
        raise Unavailable(f"the VM's node at {api_url} did not answer: {exc}") from None
    return Response(
        resp.content, status_code=resp.status_code, media_type=resp.headers.get("content-type")
    )


@ws_router.websocket("/{name}/console")
async def console_ws(websocket: WebSocket, name: str) -> None:
    """Bridge the WebSocket to the VM's serial console socket (bytes both ways)."""
    svc = websocket.app.state.service
    node = websocket.app.state.node
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    try:
        # typing into a VM's console changes it: an operator's
        caller = await websocket.app.state.principals.authenticate(token)
        authorize(caller, "POST", None)
        entry, _ = await svc.vm(name)
        if entry.node != node.name:
            raise NotFound(f"VM {name} does not run on {node.name}; ask node {entry.node}")
        path = node.console_socket(name)
        if path is None:
            raise Conflict(f"VM {name} is not running: it has no console", vm=name)
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
