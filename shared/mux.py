"""One Redis connection that carries every concurrent command of a process (multiplexing).

Why: the API's requests each need a few short reads (a stream's meta, a catch-up XRANGE). Through
a connection pool, every command takes a connection, writes, waits for its reply and gives the
connection back, a handful of event-loop turns holding the connection all along; under load a
turn takes milliseconds, so six pooled connections served a few hundred commands a second and
requests queued for seconds waiting for one (and then failed with "no connection available").
Redis answers the commands of one connection in order, so they need not wait for each other: here
each command is packed (hiredis, in C), written with the others queued in the same loop turn (one
write), and its reply is matched to it by order. No command holds anything while it waits.

redis-py still makes the connection (URL, AUTH, TLS, unix sockets, CLIENT SETNAME); this module
only reads and writes on it. A command that gets no reply within `timeout_s` fails, and so does
the connection (its replies can no longer be matched): every command in flight gets a
ConnectionError, and the next command connects again. A reply that is a Redis error is that
command's exception alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

from hiredis import pack_command
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int | float


class Mux:
    def __init__(self, pool: ConnectionPool, timeout_s: float) -> None:
        """`pool`: only its connection settings are used (one connection is made from them)."""
        self._kwargs = {**pool.connection_kwargs, "socket_timeout": None}  # an idle wait is not an error
        self._connection_class = pool.connection_class
        self.timeout_s = timeout_s
        self._conn: AbstractConnection | None = None
        self._connecting: asyncio.Future[AbstractConnection] | None = None
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []  # packed commands of this loop turn, written together
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    async def execute(self, *args: Arg) -> Any:
        """One command; its reply as Redis sent it (bytes, int, lists), or its error raised."""
        return (await self._send([pack_command(cast(Any, args))]))[0]

    async def execute_many(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Several commands written back to back (so a MULTI ... EXEC among them is not split by
        anyone else's). Per command its reply, or the ResponseError Redis answered."""
        return await self._send([pack_command(cast(Any, tuple(c))) for c in commands], raise_errors=False)

    def submit(self, *args: Arg) -> asyncio.Future[Any]:
        """One command, queued now, from synchronous code: commands submitted one after another in
        one step go out in one write, and waiting for them in turn costs nothing more (with
        `asyncio.gather`, each would be a task: a loop turn before it even queues its command, and
        another between its reply and its caller). The future's result is the reply; a Redis error
        reply is a ResponseError (`checked` raises it). It fails when the connection does, or
        after `timeout_s` without a reply."""
        conn = self._conn
        if conn is None:  # not connected (yet, or any more): that takes a task anyway
            return asyncio.ensure_future(self.execute(*args))
        return self._queue(conn, [pack_command(cast(Any, args))])[-1]

    def _queue(self, conn: AbstractConnection, packed: list[bytes]) -> list[asyncio.Future[Any]]:
        """Queue commands for this loop turn's write; a future per reply. No reply to the last of
        them within `timeout_s` fails the connection (replies come in order)."""
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[Any]] = [loop.create_future() for _ in packed]
        if not self._out:
            loop.call_soon(self._flush, conn)
        self._out.extend(packed)
        self._pending.extend(futs)
        timer = loop.call_at(loop.time() + self.timeout_s, self._expire, conn, futs[-1])
        futs[-1].add_done_callback(lambda _: timer.cancel())
        return futs

    def _expire(self, conn: AbstractConnection, fut: asyncio.Future[Any]) -> None:
        if not fut.done():
            self._fail(conn, RedisTimeoutError(f"no reply from Redis within {self.timeout_s:g} s"))

    async def _send(self, packed: list[bytes], raise_errors: bool = True) -> list[Any]:
        conn = self._conn if self._conn is not None else await self._connect()
        # A failed connection (or no reply in time) raises here, the same for every command.
        replies = [await f for f in self._queue(conn, packed)]
        for r in replies:
            if raise_errors and isinstance(r, ResponseError):
                raise r
        return replies

    def _flush(self, conn: AbstractConnection) -> None:
        if conn is not self._conn:
            return  # the connection failed meanwhile; its commands were failed with it
        out, self._out = self._out, []
        try:
            conn._writer.write(b"".join(out))  # type: ignore[union-attr]
        except Exception as e:  # the transport is closing
            self._fail(conn, RedisConnectionError(f"Error writing to Redis: {e}"))

    async def _connect(self) -> AbstractConnection:
        if self._closed:
            raise RedisConnectionError("the Redis connection is closed")
        if self._connecting is None:
            fut: asyncio.Future[AbstractConnection] = asyncio.get_running_loop().create_future()
            self._connecting = fut
            try:
                conn = self._connection_class(**self._kwargs)
                await conn.connect()  # type: ignore[no-untyped-call]
                self._conn = conn
                self._reader = asyncio.create_task(self._read(conn), name="tandem-redis-mux")
                fut.set_result(conn)
            except BaseException as e:
                fut.set_exception(e if isinstance(e, Exception) else RedisConnectionError("connect interrupted"))
                raise
            finally:
                self._connecting = None
                if fut.done() and fut.exception() is not None:
                    fut.exception()  # retrieved: only the waiters below care
            return conn
        return await asyncio.shield(self._connecting)

    async def _read(self, conn: AbstractConnection) -> None:
        try:
            while True:
                try:
                    reply: Any = await conn.read_response(disconnect_on_error=False)
                except ResponseError as e:
                    # That command's answer: handed to it (a result, not the future's exception),
                    # without the traceback, which holds the parser's frame, which holds the error.
                    reply = e.with_traceback(None)
                if not self._pending:
                    raise RedisConnectionError("a reply from Redis that no command asked for")
                fut = self._pending.popleft()
                if not fut.done():  # (a caller that gave up already)
                    fut.set_result(reply)
        except asyncio.CancelledError:
            self._fail(conn, RedisConnectionError("the Redis connection was closed"))
            raise
        except Exception as e:
            self._fail(conn, e if isinstance(e, (RedisConnectionError, RedisTimeoutError)) else RedisConnectionError(str(e)))

    def _fail(self, conn: AbstractConnection, error: Exception) -> None:
        """The connection is unusable: every command on it fails; the next one connects again."""
        if conn is not self._conn:
            return
        self._conn = None
        self._out.clear()
        pending, self._pending = self._pending, deque()
        for fut in pending:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # whoever waits gets it; one that no longer waits is not an error to log
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        with contextlib.suppress(Exception):
            conn._writer.transport.abort()  # type: ignore[union-attr]
        asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))

    async def aclose(self) -> None:
        self._closed = True
        conn = self._conn
        if conn is not None:
            self._fail(conn, RedisConnectionError("the Redis connection was closed"))
        await asyncio.sleep(0)


def checked(reply: Any) -> Any:
    """A reply from `Mux.submit`'s future, or the Redis error it was, raised."""
    if isinstance(reply, ResponseError):
        raise reply
    return reply
