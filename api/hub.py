"""One pub/sub connection per API process, fanning announcements out to every open SSE stream.

Why pub/sub and not one blocking XREAD over all open streams: an XREAD over N keys costs time in
proportion to N on every call, in Redis and here (PERFORMANCE.md: 75% of a core at 5,000 slow
streams). Workers announce each append on the stream's channel with the entries themselves, so
the hub hands them to readers without any read; readers XRANGE only to catch up (a resume, a gap,
a reconnect). The hub holds one connection; catch-up reads share the process's one multiplexed
connection (shared/mux.py). An open SSE connection holds none.

At 1,000 streams of 20 tokens/s the hub reads 20,000 messages a second. redis-py's PubSub costs
tens of microseconds per message (a timeout, a retry wrapper and a dict each), too slow for that:
its backlog grew to a second. So redis-py only makes the connection (URL, AUTH, TLS, CLIENT
SETNAME); the hub writes its few commands itself and parses what arrives with hiredis, every
message of one socket read in one go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, Protocol, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.background import cancel_and_wait
from shared.events import Announcement, parse_announcement

log = logging.getLogger("tandem.hub")
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)

READ_TIMEOUT_S = 1.0  # longest single wait for a message; always below the client's socket timeout
PING_IDLE_S = 5.0  # PING the pub/sub connection after this long without any message
DEAD_AFTER_S = 12.0  # nothing at all (not even the PING's reply) for this long: the connection is dead
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 2.0  # reconnect delays: doubling, bounded
FIRST_ATTEMPT_S = 5.0  # longest `start` waits for its first connection attempt to end
READ_BUFFER_BYTES = 1 << 21  # most the hub takes from its socket per read
# The parser is fed a read this much at a time. hiredis moves what it has not parsed yet to the
# front of its buffer after every reply once 1 KiB is consumed: fed a whole busy read (hundreds of
# KiB of 140-byte messages) at once, that is quadratic. Measured: 11% of the API's CPU at 1,000
# paced streams in that memmove, and 2.5 vs 0.3 us per message for a 1.4 MB read.
FEED_BYTES = 1 << 14


class Listener(Protocol):
    def on_announcement(self, ann: Announcement) -> None: ...
    def on_resync(self) -> None: ...


class Hub:
    def __init__(self, redis: Redis, control_channel: str, confirm_timeout_s: float = 5.0) -> None:
        self._redis = redis  # a client of its own: the pub/sub connection is held for good
        self._control = control_channel
        self._confirm_timeout = confirm_timeout_s
        self.read_timeout = read_timeout_for(redis)
        self._conn: AbstractConnection | None = None  # the pub/sub connection, while up
        self._parser: Any = None  # its hiredis.Reader
        self._listeners: dict[str, set[Listener]] = {}
        self._held: dict[str, int] = {}  # channels subscribed ahead of their listener (`hold`)
        self._subscribed: set[str] = set()  # SUBSCRIBE sent on the current connection
        self._confirmed: set[str] = set()  # and confirmed by Redis
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._to_unsubscribe: set[str] = set()
        self._resync: set[str] = set()  # resubscribed after a reconnect, not confirmed yet
        self._task: asyncio.Task[None] | None = None
        self._last_rx = 0.0  # loop time of the last thing read from the pub/sub connection
        self._pinged = False
        self.connected = asyncio.Event()
        self._attempted = asyncio.Event()  # the first connection attempt has ended, either way
        self.listeners = 0
        self.reconnects = 0

    async def start(self) -> None:
        """Start the hub's loop; returns once its first connection attempt ended (connected or
        not, at most FIRST_ATTEMPT_S). Otherwise a reader that came as soon as the process served
        (a resume right after a restart) could find the hub not connected yet and get a 503. A
        Redis that is down holds the start-up for one attempt only (`readyz` says it is down; the
        hub keeps trying)."""
        self._task = asyncio.create_task(self._run(), name="tandem-hub")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), FIRST_ATTEMPT_S)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self._drop()
        await self._redis.aclose()

    async def subscribe(self, channel: str, listener: Listener) -> None:
        """Register `listener`; returns once Redis confirmed the subscription, so nothing
        announced after this returns can be missed. Raises ConnectionError when Redis is down."""
        self._listeners.setdefault(channel, set()).add(listener)
        self.listeners += 1
        try:
            await self._confirmed_soon(channel)
        except BaseException:
            self.unsubscribe(channel, listener)
            raise

    def unsubscribe(self, channel: str, listener: Listener) -> None:
        group = self._listeners.get(channel)
        if group is None or listener not in group:
            return
        group.discard(listener)
        self.listeners -= 1
        if not group:
            del self._listeners[channel]
            self._unsubscribe_later(channel)

    def hold(self, channel: str) -> Awaitable[None]:
        """Subscribe to `channel` with no listener yet, until `release`: a connection starts its
        subscription while it still checks the request (one Redis round trip fewer before its
        first event), and its reader subscribes later without waiting. The SUBSCRIBE goes out
        now; await the result for Redis's confirmation (it raises ConnectionError when Redis is
        down, and the hold is then released). Held channels are not readers (`listeners`,
        `tandem ls`)."""
        self._held[channel] = self._held.get(channel, 0) + 1
        return self._held_until_confirmed(channel, self._confirmed_soon(channel))

    async def _held_until_confirmed(self, channel: str, confirmed: Awaitable[None]) -> None:
        try:
            await confirmed
        except BaseException:
            self.release(channel)
            raise

    def release(self, channel: str) -> None:
        n = self._held.get(channel, 0) - 1
        if n > 0:
            self._held[channel] = n
            return
        self._held.pop(channel, None)
        if channel not in self._listeners:
            self._unsubscribe_later(channel)

    def _confirmed_soon(self, channel: str) -> Awaitable[None]:
        """Sends the SUBSCRIBE now (unless the channel is subscribed already); what to await for
        Redis's confirmation."""
        self._to_unsubscribe.discard(channel)
        if channel in self._confirmed:
            return _done()
        if not self.connected.is_set() or self._conn is None:
            return _fail(RedisConnectionError("the hub is not connected to Redis"))
        fut = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(channel, []).append(fut)
        if channel not in self._subscribed:
            self._subscribed.add(channel)
            self._send_subscribe([channel])
        return _within(fut, self._confirm_timeout)

    def _unsubscribe_later(self, channel: str) -> None:
        if channel not in self._listeners and channel not in self._held:
            self._to_unsubscribe.add(channel)  # the hub's loop sends it; no task per stream

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._conn is None:
                    await self._connect()
                    self._attempted.set()
                    backoff = BACKOFF_MIN_S
                assert self._conn is not None
                self._flush_unsubscribes()
                data = await self._read(self._conn)
                now = loop.time()
                if data:
                    self._last_rx, self._pinged = now, False
                    self._take(data)
                elif now - self._last_rx >= DEAD_AFTER_S:
                    # A half-open connection (host gone, no RST) reads as silence, not as an error.
                    raise RedisTimeoutError(f"no answer on the pub/sub connection for {DEAD_AFTER_S:.0f}s")
                elif now - self._last_rx >= PING_IDLE_S and not self._pinged:
                    self._pinged = True
                    self._write([("PING",)])
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as e:
                self._attempted.set()
                if self.connected.is_set():
                    log.warning("hub lost Redis, reconnecting", extra={"error": str(e)})
                await self._drop()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            except Exception:
                self._attempted.set()
                log.exception("hub loop error")
                await self._drop()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _take(self, data: bytes) -> None:
        parser, size, listeners = self._parser, len(data), self._listeners
        for offset in range(0, size, FEED_BYTES):
            parser.feed(data, offset, min(FEED_BYTES, size - offset))
            while (reply := parser.gets()) is not False:
                # A published message, nearly every reply, is handed on here rather than through
                # `_dispatch` (20,000 a second at 1,000 paced streams).
                if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                    group = listeners.get(reply[1].decode())
                    if group:
                        self._announce(group, reply[1], reply[2])
                else:
                    self._dispatch(reply)

    @staticmethod
    def _announce(group: set[Listener], channel: bytes, payload: bytes) -> None:
        try:
            ann = parse_announcement(payload)
        except (ValueError, KeyError, TypeError, IndexError):
            log.warning("ignored a malformed announcement", extra={"channel": channel.decode()})
            return
        for listener in list(group):
            listener.on_announcement(ann)

    async def _read(self, conn: AbstractConnection) -> bytes:
        """What the socket has now (up to READ_BUFFER_BYTES), or b"" after `read_timeout` of silence."""
        reader = conn._reader
        assert reader is not None
        if reader._buffer:  # type: ignore[attr-defined]
            # Arrived while the last read was handed on (a busy hub, nearly always): taken without
            # arming the silence timeout, a timer made and cancelled per read.
            data: bytes = await reader.read(READ_BUFFER_BYTES)
        else:
            try:
                async with asyncio.timeout(self.read_timeout):
                    data = await reader.read(READ_BUFFER_BYTES)
            except TimeoutError:
                return b""
        if not data:
            raise RedisConnectionError("Redis closed the pub/sub connection")
        return data

    def _write(self, commands: list[tuple[str, ...]]) -> None:
        conn = self._conn
        if conn is None:
            return  # reconnecting: _connect subscribes every channel again
        conn._writer.write(b"".join(hiredis.pack_command(cast(Any, c)) for c in commands))  # type: ignore[union-attr]

    def _send_subscribe(self, channels: list[str]) -> None:
        self._write([("SUBSCRIBE", *channels)])

    async def _connect(self) -> None:
        pool = self._redis.connection_pool
        # No socket timeout: an idle wait is not an error (`_read` has its own, and PINGs).
        conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        await conn.connect()  # type: ignore[no-untyped-call]
        # asyncio stops reading a socket once 2 x its StreamReader's limit (64 KiB) is buffered;
        # the hub takes everything buffered at once, so let a loop turn bring in more than that.
        reader = conn._reader  # type: ignore[union-attr]
        if reader is not None and hasattr(reader, "_limit"):
            reader._limit = READ_BUFFER_BYTES
        channels = list(self._listeners.keys() | self._held.keys())
        self._conn, self._parser = conn, hiredis.Reader(replyError=ResponseError)
        self._last_rx, self._pinged = asyncio.get_running_loop().time(), False
        self._subscribed = {self._control, *channels}
        self._confirmed.clear()
        self._send_subscribe([self._control])
        if channels:
            self._send_subscribe(channels)
        if self.reconnects or channels:
            log.info("hub connected to Redis", extra={"channels": len(channels)})
        self.reconnects += 1
        # Anything announced while we were away is only in the streams: every listener catches up,
        # but only once Redis confirmed its channel (_dispatch), so that nothing appended after the
        # catch-up read can be missed.
        self._resync = set(channels)
        self.connected.set()

    async def _drop(self) -> None:
        self.connected.clear()
        conn, self._conn = self._conn, None
        self._subscribed.clear()
        self._confirmed.clear()
        self._resync.clear()
        for futs in self._waiting.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(RedisConnectionError("Redis connection lost while subscribing"))
        self._waiting.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    def _flush_unsubscribes(self) -> None:
        if not self._to_unsubscribe or self._conn is None:
            return
        gone = [c for c in self._to_unsubscribe if c not in self._listeners and c not in self._held and c in self._subscribed]
        self._to_unsubscribe.clear()
        if gone:
            self._subscribed.difference_update(gone)
            self._confirmed.difference_update(gone)
            self._write([("UNSUBSCRIBE", *gone)])

    def _dispatch(self, reply: Any) -> None:
        if isinstance(reply, ResponseError):
            log.warning("Redis answered the hub with an error", extra={"error": str(reply)})
            return
        if not isinstance(reply, list) or len(reply) < 2:
            return  # not a pub/sub message (a PING's answer is ["pong", ""])
        kind, raw = reply[0], reply[1]
        channel = raw.decode() if isinstance(raw, bytes) else str(raw)
        if kind == b"subscribe":  # (a published message never comes here: `_take` hands it on)
            if channel in self._subscribed:
                self._confirmed.add(channel)
            if channel in self._resync:
                self._resync.discard(channel)
                for listener in list(self._listeners.get(channel, ())):
                    listener.on_resync()
            for fut in self._waiting.pop(channel, []):
                if not fut.done():
                    fut.set_result(None)


async def _done() -> None:
    return None


async def _fail(error: BaseException) -> None:
    raise error


async def _within(fut: asyncio.Future[None], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):  # awaited directly: no task between Redis's answer and us
        await fut


def read_timeout_for(redis: Redis) -> float:
    """The hub's blocking read timeout: READ_TIMEOUT_S, and always below the client's socket
    timeout (if it has one), so that an idle wait ends as "no message", never as a socket
    timeout error that would drop the connection and resync every reader."""
    socket_timeout = redis.connection_pool.connection_kwargs.get("socket_timeout")
    if socket_timeout is None:
        return READ_TIMEOUT_S
    return min(READ_TIMEOUT_S, float(socket_timeout) / 2)
