"""The gateway's own responses: JSON documents and ``{"code", "type", "message"}`` errors, sent over ASGI."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Send

_JSON_HEADERS = [(b"content-type", b"application/json")]


async def send_json(send: Send, status: int, body: dict[str, Any],
                    extra_headers: list[tuple[bytes, bytes]] | None = None) -> int:
    """Send ``body`` as the whole response; returns its length in bytes (for the execution record)."""
    payload = json.dumps(body).encode()
    headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
    return len(payload)


async def send_error(send: Send, status: int, kind: str, message: str,
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send_json(send, status, {"code": status, "type": kind, "message": message}, extra_headers)
