"""A small synchronous REST client for the cluster API, used by the CLI.

Finding the API: ``--api``/``AECP_API`` (comma-separated URLs) and ``AECP_TOKEN`` or
``AECP_TOKEN_FILE``; otherwise the ``cli.json`` the lab writes. Each request tries the URLs in
order until one answers, so any live node will do.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from aecp.lab.harness import default_root


class ApiError(Exception):
    """The API refused a request (4xx/5xx) or no node answered."""

    def __init__(self, message: str, status: int = 0, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.body = body or {}


def discover() -> tuple[list[str], str]:
    """API URLs and token from the environment, else from the lab's cli.json."""
    urls = [u for u in os.environ.get("AECP_API", "").split(",") if u]
    token = os.environ.get("AECP_TOKEN", "")
    token_file = os.environ.get("AECP_TOKEN_FILE", "")
    cfg_path = default_root() / "cli.json"
    if (not urls or not (token or token_file)) and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        urls = urls or cfg.get("api", [])
        token_file = token_file or cfg.get("token_file", "")
    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ApiError(f"cannot read the token file {token_file}: {exc.strerror}") from None
    if not urls:
        raise ApiError("no cluster API known: start a lab (aecp lab up) or set AECP_API")
    return urls, token


class Client:
    def __init__(self, urls: list[str], token: str, timeout: float = 30) -> None:
        self.urls = urls
        self.token = token
        self.http = httpx.Client(
            timeout=timeout, headers={"authorization": f"Bearer {token}"} if token else {}
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        last = ""
        for url in self.urls:
            try:
                r = self.http.request(method, url + path, **kw)
            except httpx.TransportError as exc:
                last = f"{url}: {exc}"
                continue
            return _decode(r)
        raise ApiError(f"no API answered ({last})")

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> Any:
        return self.request("PUT", path, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    def wait_operation(
        self, op_id: str, on_update: Callable[[dict[str, Any]], None], timeout: float = 600
    ) -> dict[str, Any]:
        """Poll the operation until it ends; returns it. ``ApiError`` if it failed or was
        cancelled (superseded by a later request, or its object deleted): it did not happen as
        asked."""
        deadline = time.monotonic() + timeout
        while True:
            op: dict[str, Any] = self.get(f"/v1/operations/{op_id}")
            on_update(op)
            if op["state"] in ("failed", "cancelled"):
                raise ApiError(f"{op['kind']} {op['target']} {op['state']}: {op['error']}", body=op)
            if op["state"] == "succeeded":
                return op
            if time.monotonic() > deadline:
                raise ApiError(f"operation {op_id} still running after {timeout:.0f}s")
            time.sleep(0.25)


def _decode(r: httpx.Response) -> Any:
    if r.status_code == 204:
        return None
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code >= 400:
        if isinstance(body, dict):
            raise ApiError(body.get("message") or str(body), r.status_code, body)
        raise ApiError(f"HTTP {r.status_code}: {r.text[:300]}", r.status_code)
    if body is None:
        return r.text
    return body


def file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk
