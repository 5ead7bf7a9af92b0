"""api/response.py's ChunkWriter and SSEResponse under a real uvicorn server (in this test's loop,
on a free port).

The writer repeats uvicorn's HTTP/1.1 chunk framing on its transport, so these tests read the raw
bytes off the socket: what the writer and `send` wrote, interleaved, must be one well-formed
chunked body. And it must step aside whenever only `send` may write. A client that leaves closes
its response's stream at once, with no task per connection under httptools.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn

from api.response import ChunkWriter, Liveness, SSEResponse, chunk_writer
from shared.redis_server import free_port
from shared.waker import Waker

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
HEAD = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


@asynccontextmanager
async def serving(app: App, http: str = "httptools") -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=http, lifespan="off", log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 (uvicorn has a flag, no event)
                await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await task


def wrapped(app: App) -> App:
    """A middleware that wraps `send` in a closure, as Starlette's do."""

    async def outer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def send_on(message: Any) -> None:
            await send(message)

        await app(scope, receive, send_on)

    return outer


async def get(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /events HTTP/1.1\r\nHost: test\r\n\r\n")
    await writer.drain()
    return reader, writer


async def fetch(app: App, http: str = "httptools") -> tuple[bytes, bytes]:
    """One GET on a server running `app`: the response head, and its chunked body as it came."""
    async with serving(app, http) as port:
        reader, writer = await get(port)
        try:
            async with asyncio.timeout(10):
                return await reader.readuntil(b"\r\n\r\n"), await reader.readuntil(b"0\r\n\r\n")
        finally:
            writer.close()


async def test_writes_interleave_with_send_as_one_chunked_body() -> None:
    writers: list[ChunkWriter | None] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(HEAD)
        w = chunk_writer(send)
        writers.append(w)
        assert w is not None and w.ready()
        w.write(b"data: one\n\n")
        await send({"type": "http.response.body", "body": b"data: two\n\n", "more_body": True})
        w.write(b"id: a/1-0\ndata: \xc3\xa9\n\n")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        assert not w.ready()  # the response ended: nothing more may be written

    head, body = await fetch(wrapped(app))
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"b\r\ndata: one\n\n\r\nb\r\ndata: two\n\n\r\n14\r\nid: a/1-0\ndata: \xc3\xa9\n\n\r\n0\r\n\r\n"
    assert writers and writers[0] is not None


async def test_no_writer_where_the_framing_is_not_uvicorns_httptools() -> None:
    writers: list[ChunkWriter | None] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(HEAD)
        writers.append(chunk_writer(send))
        await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": False})

    await fetch(app, http="h11")
    assert writers == [None]

    async def before_head(scope: dict[str, Any], receive: Any, send: Any) -> None:
        writers.append(chunk_writer(send))  # no head out yet: the framing is not known
        await send(HEAD)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    await fetch(before_head)
    assert writers == [None, None]


@pytest.mark.parametrize("client", ["stops_reading", "leaves"])
async def test_not_ready_when_the_client_stops_reading_or_leaves(client: str) -> None:
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    chunk = b"data: " + b"x" * 16_000 + b"\n\n"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(HEAD)
        w = chunk_writer(send)
        assert w is not None
        written = 0
        async with asyncio.timeout(10):
            while w.ready() and written < 256 << 20:
                w.write(chunk)
                written += len(chunk)
                await asyncio.sleep(0)
        done.set_result(written)

    async with serving(app) as port:
        reader, writer = await get(port)
        if client == "leaves":
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.abort()
        async with asyncio.timeout(10):
            written = await done
        writer.close()
    # Flow control paused the transport (or the disconnect was seen) long before 256 MB.
    assert written < 64 << 20


def sse_app(ended: asyncio.Future[str | None], *, hold: bool = True, make_live: Callable[[Waker], Liveness] = Liveness, at_first: Callable[[], object] = lambda: None) -> App:
    """An SSE response of one event that then (with `hold`) stays open until its stream is closed;
    `ended` gets the stream's close reason once the response is over. `at_first` runs after the
    first event was yielded."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        live = make_live(Waker())

        async def body() -> AsyncIterator[bytes]:
            yield b"data: hi\n\n"
            at_first()
            while hold and not live.closed:
                live.waker.clear()
                await live.waker.wait(None)  # no deadline: only a close ends this

        await SSEResponse(body(), live, send_timeout_s=30)(scope, receive, send)
        ended.set_result(live.reason)

    return app


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_client_that_leaves_closes_its_stream_at_once(http: str) -> None:
    """Under httptools, uvicorn's own signal of the lost connection closes the stream and the
    response runs no task besides the request's; any other server gets a task waiting on `receive`."""
    tasks: list[int] = []
    ended: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
    app = sse_app(ended, at_first=lambda: tasks.append(len(asyncio.all_tasks())))

    async with serving(wrapped(app), http) as port:
        idle = len(asyncio.all_tasks())  # this test's and the server's own
        reader, writer = await get(port)
        async with asyncio.timeout(10):
            await reader.readuntil(b"data: hi\n\n")
            writer.transport.abort()
            assert await ended == "disconnect"
        writer.close()
    # The request's task, and under h11 the watcher; the server's own per-connection tasks aside.
    extra = tasks[0] - idle
    if http == "httptools":
        assert extra == 1
    else:
        assert extra >= 2


class CountedLiveness(Liveness):
    """A Liveness that counts its instances alive: freed by reference counting alone, it is gone
    as soon as nothing refers to it, without any pass of the garbage collector."""

    __slots__ = ()
    alive = 0

    def __init__(self, waker: Waker) -> None:
        super().__init__(waker)
        CountedLiveness.alive += 1

    def __del__(self) -> None:
        CountedLiveness.alive -= 1


@pytest.mark.parametrize("http", ["httptools", "h11"])
@pytest.mark.parametrize("how", ["client_leaves", "stream_ends"])
async def test_a_finished_response_leaves_no_garbage_cycle(http: str, how: str) -> None:
    """Regression: the response's own references (`live.on_stall` -> its closure -> `live`; the
    request cycle -> its lost-connection signal -> the cycle) made each finished response a
    reference cycle holding its connection's transport, task and buffers until a full collection
    of the garbage collector, which the API's thresholds make rare: an API process grew by every
    connection it had served. With the collector off, the response's Liveness must still go."""
    ended: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
    app = sse_app(ended, hold=how == "client_leaves", make_live=CountedLiveness)

    gc.collect()
    before = CountedLiveness.alive
    gc.disable()
    try:
        async with serving(wrapped(app), http) as port:
            reader, writer = await get(port)
            async with asyncio.timeout(10):
                await reader.readuntil(b"data: hi\n\n")
                if how == "client_leaves":
                    writer.transport.abort()
                else:
                    await reader.readuntil(b"0\r\n\r\n")
                assert await ended == ("disconnect" if how == "client_leaves" else None)
                while CountedLiveness.alive > before:  # noqa: ASYNC110 (a count __del__ changes: nothing to wait on)
                    await asyncio.sleep(0.01)
            writer.close()
    finally:
        gc.enable()
