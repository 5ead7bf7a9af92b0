"""A lean ASGI response for SSE: no task of its own per connection, nothing per event.

sse-starlette runs four tasks per response (sender, pinger, shutdown watcher, disconnect
watcher) in an anyio task group; at thousands of open streams those tasks are most of a
connection's memory and about half of the per-event cost (PERFORMANCE.md). Here the request's own
task sends (the body iterator already merges events and pings, since it knows when it last sent),
uvicorn's own signal of a lost connection closes the stream (a task waiting on `receive` does,
under any other server), and shutdown is a flag the process sets on every open stream. Its wire
format is still built by shared/events.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from shared.background import cancel_and_wait
from shared.waker import Waker

log = logging.getLogger("tandem.api")


class Liveness:
    """What an open stream's response, its body and the process's watchdog share: why the stream
    should stop (the client left, the process is shutting down, or sends stall), when it owes a
    keepalive, and the writer its body may use between sends."""

    __slots__ = ("on_stall", "ping_due", "reason", "sending_since", "waker", "writer")

    def __init__(self, waker: Waker) -> None:
        self.reason: str | None = None
        self.waker = waker
        self.sending_since = 0.0  # loop time the send in progress began; 0: none
        self.ping_due = math.inf  # loop time the stream owes its client a keepalive comment
        self.on_stall: Callable[[], None] | None = None
        # Set by SSEResponse once the response head is out, when the server lets the body write
        # between its own sends (None: every byte goes through `send`).
        self.writer: ChunkWriter | None = None

    @property
    def closed(self) -> bool:
        return self.reason is not None

    def close(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.waker.set()


class OpenStreams:
    """Every open stream of this process, so shutdown can close them all at once, and one
    watchdog for all their sends and keepalives: a timer per send, or per wait for the next
    event, would cost more than the send's own work (a timer is a libuv handle made, armed,
    stopped and closed: ~5% of the API's CPU at 20,000 paced events/s)."""

    def __init__(self) -> None:
        self._open: set[Liveness] = set()
        self._watchdog: asyncio.Task[None] | None = None

    def watch_sends(self, timeout_s: float, ping_s: float = math.inf) -> None:
        """Cut any stream whose send has waited `timeout_s`, and wake any that owes its client a
        keepalive (`Liveness.ping_due`). Checked every min(1 s, timeout_s / 4, ping_s / 4)."""
        every = min(1.0, timeout_s / 4, ping_s / 4)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(timeout_s, every), name="tandem-send-watchdog")

    async def stop(self) -> None:
        await cancel_and_wait(self._watchdog)

    async def _watch(self, timeout_s: float, every: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for live in list(self._open):
                since = live.sending_since
                if since and now - since >= timeout_s and live.on_stall is not None:
                    live.on_stall()
                elif live.ping_due <= now:
                    live.waker.set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, live: Liveness) -> None:
        self._open.add(live)

    def discard(self, live: Liveness) -> None:
        self._open.discard(live)

    def close_all(self, reason: str = "shutdown") -> int:
        n = len(self._open)
        for live in list(self._open):
            live.close(reason)
        return n


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncIterator[bytes],
        live: Liveness,
        *,
        send_timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(body, status_code=200, headers=headers, media_type=self.media_type)
        self.live = live
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        live = self.live
        cycle = httptools_cycle(send)
        # A disconnect closes `live` at once: told by uvicorn's cycle itself where it can be (no
        # task per connection that only waits: ~1.5 KB each at 10,000 open streams), else by a
        # task waiting on `receive`.
        lost = watch_disconnect(cycle, live) if cycle is not None else None
        watcher = None if lost is not None else loop.create_task(_watch_disconnect(receive, live))
        me = asyncio.current_task()
        stalled = False

        def stall() -> None:
            nonlocal stalled
            if stalled:
                return
            stalled = True
            live.close("send_timeout")
            if me is not None:
                me.cancel()  # the send is blocked in the server's flow control: only a cancel ends it

        live.on_stall = stall  # a reader that accepts nothing for send_timeout_s is cut off (it can resume)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            live.writer = chunk_writer(send, cycle) if cycle is not None else None
            async for chunk in self.body_iterator:
                if live.closed:
                    break
                live.sending_since = loop.time()  # OpenStreams' watchdog looks at this
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                finally:
                    live.sending_since = 0.0
            if live.reason != "disconnect":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not stalled or me is None:
                raise
            # Our own cancel, from stall(). Closing the transport would wait to flush its buffer,
            # that is forever for a client that never reads: abort it (RST) instead.
            me.uncancel()
            transport = find_transport(send)
            log.warning("reader stopped reading; connection cut", extra={"send_timeout_s": self.send_timeout_s})
            if transport is not None:
                transport.abort()
        finally:
            # Nothing the response made may keep itself alive once it is over: a reference cycle
            # (`live` -> `stall` -> `live`, the cycle -> its signal -> the cycle) would keep the
            # connection's transport, task and buffers with it until a full collection of the
            # garbage collector, which the API's thresholds (shared/gcpolicy.py) make rare: every
            # closed connection cost ~25 objects and its buffers until then.
            live.writer = None
            live.on_stall = None
            if lost is not None:
                lost.detach()
            if watcher is not None:
                watcher.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def _watch_disconnect(receive: Receive, live: Liveness) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            live.close("disconnect")
            return


def find_transport(send: Any) -> asyncio.Transport | None:
    """The server's transport behind an ASGI `send` (see `_server_cycle`)."""
    cycle = _server_cycle(send)
    return None if cycle is None else cycle.transport  # type: ignore[no-any-return]


def _server_cycle(send: Any, depth: int = 16) -> Any:
    """The server's request cycle behind an ASGI `send`: the callable chain ends in a bound method
    of it (uvicorn: `RequestResponseCycle.send`), and it holds the connection's `transport`.
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
            return owner
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if callable(value):
                todo.append(value)
    return None


class ChunkWriter:
    """Writes body chunks of a started response straight to uvicorn's transport (httptools), exactly
    as its `send` frames them (HTTP/1.1 chunked), for the moments the body has bytes to send while
    its task is parked (api/sse.py): a paced token then leaves in the loop turn that brought it,
    without waking the task and passing the ASGI send chain. `ready()` is false whenever only
    `send` may write: a client that stopped reading (flow control paused), a disconnect, an ended
    response."""

    __slots__ = ("_cycle", "_flow", "_transport")

    def __init__(self, cycle: Any) -> None:
        self._cycle, self._flow, self._transport = cycle, cycle.flow, cycle.transport

    def ready(self) -> bool:
        c = self._cycle
        return not (self._flow.write_paused or c.disconnected or c.response_complete) and c.chunked_encoding is True

    def write(self, body: bytes) -> None:
        self._transport.write(b"%x\r\n%b\r\n" % (len(body), body))


# The request cycle whose framing ChunkWriter repeats; any other server (h11, hypercorn, an ASGI
# test transport) gets no writer and every byte goes through `send`.
_HTTPTOOLS_CYCLE = "uvicorn.protocols.http.httptools_impl"
_CYCLE_FIELDS = ("flow", "disconnected", "response_started", "response_complete", "chunked_encoding")


def httptools_cycle(send: Any) -> Any:
    """uvicorn's httptools request cycle behind `send`, if that is the server and it has every
    field used here; None otherwise."""
    cycle = _server_cycle(send)
    if cycle is None or type(cycle).__module__ != _HTTPTOOLS_CYCLE or not all(hasattr(cycle, f) for f in _CYCLE_FIELDS):
        return None
    return cycle


def chunk_writer(send: Any, cycle: Any = None) -> ChunkWriter | None:
    """A ChunkWriter for the response behind `send` (its `httptools_cycle`, if known), once its head
    is out; None if it cannot have one."""
    cycle = cycle if cycle is not None else httptools_cycle(send)
    if cycle is None or not cycle.response_started or cycle.chunked_encoding is not True:
        return None
    return ChunkWriter(cycle)


class _LostSignal(asyncio.Event):
    """Takes the place of a request cycle's `message_event`, which uvicorn sets when the connection
    is lost, right after marking the cycle `disconnected` (and for the request body's parts, which
    a GET had before its response began). `receive` waits on it as before; a set that finds the
    cycle disconnected also closes the stream's `Liveness`."""

    def __init__(self, cycle: Any, live: Liveness) -> None:
        super().__init__()
        self._cycle: Any = cycle
        self._live: Liveness | None = live
        if cycle.message_event.is_set():
            super().set()

    def set(self) -> None:
        super().set()
        cycle, live = self._cycle, self._live
        if cycle is not None and live is not None and cycle.disconnected:
            live.close("disconnect")

    def detach(self) -> None:
        """The response is over: from here on this is only the cycle's plain event again."""
        self._cycle = self._live = None


def watch_disconnect(cycle: Any, live: Liveness) -> _LostSignal | None:
    """Close `live` when the client behind uvicorn's httptools `cycle` goes away, without a task;
    `detach` the signal when the response ends. None if this cycle has no `message_event` to take
    the place of."""
    if type(getattr(cycle, "message_event", None)) is not asyncio.Event:
        return None
    lost = cycle.message_event = _LostSignal(cycle, live)
    if cycle.disconnected:
        live.close("disconnect")
    return lost
