"""Batches a task's chunks into as few appends as the load needs.

`add` only buffers; the worker's one `AppendPipe` (workers/pipe.py) takes what every running source
has buffered and writes it in one pipelined round trip. The first chunk of a quiet source goes out
at once; chunks that arrive while a write is in flight, or within the pipe's write window, go
together in the next one. So a burst, or a thousand paced sources, cost one round trip per batch
instead of one per token, and no task or future is made per token.

While Redis is unavailable the pipe retries (workers/lease.py, `redis_retry`) and chunks keep
queueing up to 4 batches, then the task waits. Each append carries the count appended before it, so
a retry whose first attempt did reach Redis is not written twice.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from shared.keys import Source

if TYPE_CHECKING:
    from shared.store import AppendCall
    from workers.pipe import AppendPipe


STOPPED, ADDED, BACKLOGGED = 0, 1, 2  # what `add` answers


class Appender:
    __slots__ = ("_buf", "_error", "_inflight", "_max_batch", "_pipe", "_queued", "_waiter", "appended", "last", "source", "stopped", "stream_id")

    def __init__(self, pipe: AppendPipe, stream_id: str, source: Source, max_batch: int) -> None:
        self._pipe = pipe
        self.stream_id = stream_id
        self.source: Source = source
        self._max_batch = max_batch
        self._buf: list[str] = []
        self._queued = False  # waiting in the pipe's ready set
        self._inflight = 0  # the size of our batch being written (0: none)
        self._waiter: asyncio.Future[None] | None = None  # someone waits for everything to be written
        self._error: BaseException | None = None
        self.appended = 0
        self.last: str | bytes = "0-0"  # the source's last entry id (the next append's `prev`; bytes, as Redis answered it)
        self.stopped = False  # the source is no longer running (cancelled, too long, lost)

    def add(self, text: str) -> int:
        """Queue one chunk. STOPPED (0, false) once the source has stopped: the caller stops
        producing. BACKLOGGED when four batches are buffered (the producer is faster than Redis):
        the caller awaits `wait_written` before the next one. (Not a coroutine: this runs once per
        token, and most calls have nothing to wait for.)"""
        if self.stopped:
            if self._error is not None:
                raise self._error
            return STOPPED
        buf = self._buf
        buf.append(text)
        if not self._queued and not self._inflight:
            self._queued = True
            self._pipe.want(self)
        n, batch = len(buf), self._max_batch
        if n >= batch:
            if n == batch:
                self._pipe.hurry()
            if n >= batch * 4:
                return BACKLOGGED
        return ADDED

    async def wait_written(self) -> None:
        """Wait until everything queued is appended (or the source stopped); raises what the
        writes raised."""
        if self._buf or self._inflight:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)
        if self._error is not None:
            raise self._error

    close = wait_written  # (the source is done: wait for its last batch)

    # -- called by the pipe ----------------------------------------------------------------------

    def take(self) -> AppendCall:
        """The next batch, as the store appends it (with the source's deltas and last entry id
        before it)."""
        batch, mb = self._buf, self._max_batch
        if len(batch) <= mb:
            self._buf = []
        else:
            batch, self._buf = batch[:mb], batch[mb:]
            if len(self._buf) >= mb:
                self._pipe.hurry()
        self._queued, self._inflight = False, len(batch)
        return self.stream_id, self.source, batch, self.appended, self.last

    def applied(self, result: bytes | int | BaseException) -> bool:
        """The result of our batch: the source's last entry id, -1 (the source stopped) or an
        error. True when more is buffered (the pipe takes us again)."""
        if type(result) is bytes:
            self.appended += self._inflight
            self.last = result
        elif isinstance(result, BaseException):
            self._error, self.stopped = result, True
        else:
            self.stopped = True
        self._inflight = 0
        if self.stopped:
            self._buf.clear()
        if self._buf:
            self._queued = True
            return True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return False
