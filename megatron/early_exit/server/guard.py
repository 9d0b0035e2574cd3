"""ASGI middleware in front of the app: API key (401) and request body limit (413).

    app = Guard(fastapi_app, api_key="secret", max_body_bytes=1 << 20)

With an API key every path but ``/health`` and the static page (``GET /``, which holds no data
and sends the key its user types with each of its API calls) needs ``Authorization: Bearer
<key>``, compared in constant time (``hmac.compare_digest``). The body is read here, up to the limit, before the app
sees the request: a declared ``Content-Length`` over the limit is refused before reading, a
chunked body as soon as it passes the limit. The buffered body is replayed to the app, after
which ``receive`` is the server's again (so handlers still see a client disconnect).
"""

from __future__ import annotations

import hmac
import json
from typing import Optional

__all__ = ["Guard", "error_body"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "server_error"}


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    """The JSON error object every failure returns (OpenAI's shape)."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


async def _send_error(send, status: int, message: str, param=None, headers=()) -> None:
    body = json.dumps(error_body(status, message, param)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, api_key: Optional[str] = None, max_body_bytes: int = 1 << 20):
        self.app, self.max_body_bytes = app, max_body_bytes
        self._key = f"Bearer {api_key}".encode() if api_key else None

    def _authorized(self, scope) -> bool:
        path = scope.get("path")
        if self._key is None or path == "/health" or (path == "/" and scope.get("method") == "GET"):
            return True
        got = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                got = value
        return hmac.compare_digest(got, self._key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            return await _send_error(send, 401, "missing or wrong API key (Authorization: Bearer "
                                     "KEY)", "authorization", [(b"www-authenticate", b"Bearer")])
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _send_error(send, 400, "Content-Length is not a number",
                                         "content-length")
            if int(declared) > self.max_body_bytes:
                return await _send_error(send, 413, f"body over {self.max_body_bytes} bytes",
                                         "body")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _send_error(send, 413, f"body over {self.max_body_bytes} bytes", "body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            if replay:
                return replay.pop()
            return await receive()

        return await self.app(scope, replay_receive, send)
