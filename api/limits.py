"""Pure-ASGI body size limit: 413 before the app sees a body over TANDEM_MAX_BODY_BYTES.

The body is read here (at most the limit plus one chunk) and replayed to the app: an exception
raised from inside `receive` would be turned into a 400 by FastAPI's body parsing.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(send, receive, drain=int(value) <= self.drain_limit)
                return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, receive, drain=message.get("more_body", False))
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @property
    def drain_limit(self) -> int:
        return max(4 * self.max_bytes, 8 << 20)

    async def _refuse(self, send: Send, receive: Receive, drain: bool) -> None:
        """413. A proxy in front (nginx buffers the whole body, then writes it) turns an answer
        sent while it is still writing into a 502, so a body of bounded size is read and dropped
        first; past `drain_limit` the connection is closed instead."""
        close = not drain
        if drain:
            seen = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                seen += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
                if seen > self.drain_limit:
                    close = True
                    break
        body = orjson.dumps(
            {"error": {"code": "body_too_large", "message": f"request body is over {self.max_bytes} bytes (TANDEM_MAX_BODY_BYTES)"}}
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *([(b"connection", b"close")] if close else []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
