"""GET /v1/streams/{id}/events as plain ASGI, ahead of FastAPI's routing.

An SSE request lives as long as its stream, and every layer it passed through stays on its
stack for that long: FastAPI's exception, exit-stack, router, route and request/response layers,
each a coroutine frame plus closures around `send`. At 10,000 open streams those are tens of MB;
every event goes through each `send` wrapper; and FastAPI's parameter and dependency handling cost
~150 µs per connect. This middleware sits just inside Starlette's error middleware and serves the
one route itself (the same `open_events` as the declared route, which stays for the API docs),
with the same JSON errors; everything else goes on to FastAPI.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ApiError, count, error_response, redis_down_response
from api.hub import REDIS_DOWN
from api.routes import open_events

_EVENTS = re.compile(r"/v1/streams/([^/]+)/events")


class EventsFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        m = _EVENTS.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "GET" else None
        state = getattr(scope["app"].state, "tandem", None) if m is not None and "app" in scope else None
        if m is None or state is None:
            await self.app(scope, receive, send)
            return
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in (b"last-event-id", b"authorization") and name not in headers:
                headers[name] = value.decode("latin-1")
        raw = headers.get(b"last-event-id", query.get("last_event_id"))
        response: Response
        try:
            response = await open_events(state, m.group(1), query.get("token"), raw, headers.get(b"authorization"))
        except ApiError as e:
            count(state, e.code)
            response = error_response(e.status, e.code, e.message, e.details, e.headers)
        except REDIS_DOWN:
            count(state, "redis_unavailable")
            response = redis_down_response()
        await response(scope, receive, send)
