"""The body of one SSE response: feed -> pacer -> bytes, several ready events per send.

Faults, and what one connection does about them:
- Redis stops answering: the connection stays open (keepalive pings go on) and catches up once
  Redis is back: when the hub has resubscribed (it calls the feed's `on_resync`), or on a bounded
  backoff. A browser's EventSource would give up on a 503, so holding on beats closing.
- The server shuts down (SIGTERM): the body ends at once, cleanly; the client resumes elsewhere
  with Last-Event-ID (see `Shutdown` and `SseResponse`).
- The client stops reading: one send waits at most TANDEM_SSE_SEND_TIMEOUT_S, then the connection
  is aborted, not merely closed (see `SseResponse`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from api.feed import Feed
from api.hub import REDIS_DOWN
from shared.events import sse_message, sse_retry

log = logging.getLogger("tandem.api")

# A flush of a long backlog goes out in sends of at most this many events, yielding to the loop
# between them, so one stream cannot hold the loop while its socket buffer fills.
MAX_EVENTS_PER_SEND = 256
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0  # catch-up reads after a Redis error: doubling delay, bounded


class Shutdown:
    """Handed to sse-starlette as its `shutdown_event`: it calls `set()` when the server begins
    to shut down. Also wakes this connection's loop, which then ends the body."""

    __slots__ = ("_feed", "flag")

    def __init__(self, feed: Feed) -> None:
        self._feed = feed
        self.flag = False

    def set(self) -> None:
        self.flag = True
        self._feed.waker.set()

    def is_set(self) -> bool:
        return self.flag


async def event_stream(
    feed: Feed,
    meta_doc: dict[str, object],
    retry_ms: int,
    on_close: Callable[[], None],
    on_events: Callable[[list[object], float], None] | None = None,
    *,
    shutdown: Shutdown | None = None,
    hub_connected: Callable[[], bool] | None = None,
) -> AsyncIterator[bytes]:
    """`hub_connected`: whether the hub's pub/sub connection is up. While it is down, a failed
    catch-up read waits for the hub's resync instead of retrying on a timer."""
    loop = asyncio.get_running_loop()
    pacer = feed.pacer
    hold: float | None = None  # after a failed read: none before this loop time (inf: until the hub resyncs)
    held_at = 0  # feed.resyncs when the hold began: a resync since then ends it
    backoff = RETRY_MIN_S

    def may_read() -> bool:
        return hold is None or loop.time() >= hold or feed.resyncs != held_at

    try:
        yield sse_retry(retry_ms) + sse_message("meta", meta_doc)
        while True:
            if shutdown is not None and shutdown.flag:
                return  # the client resumes on another replica
            feed.waker.clear()
            if feed.needs_fill() and may_read():
                try:
                    await feed.fill()
                    hold, backoff = None, RETRY_MIN_S
                except REDIS_DOWN as e:
                    if hold is None:
                        log.debug("reader waits for Redis", extra={"error": str(e)})  # the hub logs the outage once
                    up = hub_connected() if hub_connected is not None else True
                    hold, held_at = (loop.time() + backoff if up else math.inf), feed.resyncs
                    backoff = min(backoff * 2, RETRY_MAX_S)
            now = loop.time()
            items, wake_at = pacer.poll(now, MAX_EVENTS_PER_SEND)
            if items:
                if on_events is not None:
                    on_events(items, now)  # type: ignore[arg-type]
                yield b"".join(item.sse() for item in items)
            if pacer.finished:
                return
            if wake_at is not None and wake_at <= loop.time():
                await asyncio.sleep(0)  # more is due now: let other streams have a turn first
                continue
            if feed.needs_fill() and may_read():
                continue
            deadline = wake_at
            if hold is not None and hold != math.inf and feed.needs_fill():
                deadline = hold if deadline is None else min(deadline, hold)
            await feed.waker.wait(deadline)
    finally:
        on_close()


class SseResponse(EventSourceResponse):
    """EventSourceResponse that really lets go of a reader who stopped reading.

    When one send waits longer than `send_timeout`, sse-starlette raises SendTimeoutError and the
    server then only *closes* the transport, which waits to flush its buffer, that is forever for
    a client that never reads: the socket, its user-space buffer and several MB of kernel send
    buffer stay until the client goes away. Here the transport is aborted (RST) instead, and the
    timeout is logged as what it is rather than as an application error.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            transport = find_transport(send)
            log.warning("reader stopped reading; connection cut", extra={"send_timeout_s": self.send_timeout, "aborted": transport is not None})
            if transport is not None:
                transport.abort()
                await asyncio.sleep(0)  # let the server see the connection lost before we return


def find_transport(send: Any, depth: int = 16) -> asyncio.Transport | None:
    """The server's transport behind an ASGI `send`: the callable chain ends in a bound method of
    the server's request cycle (uvicorn: `RequestResponseCycle.send`), whose `transport` it is.
    Middleware wraps `send` in closures; they are followed through their cells."""
    seen: set[int] = set()
    todo = [send]
    while todo and len(seen) < depth * 4:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        owner = getattr(fn, "__self__", None)
        transport = getattr(owner, "transport", None)
        if transport is not None and callable(getattr(transport, "abort", None)):
            return transport  # type: ignore[no-any-return]
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if callable(value):
                todo.append(value)
    return None
