"""Batches a task's chunks into as few append round trips as the load needs.

The first chunk goes out at once; chunks that arrive while an append is in flight wait for it and
go together in the next one. A quiet source pays no added latency; a burst costs one round trip
per batch instead of one per token.

While Redis is unavailable, an append is retried (workers/lease.py, `redis_retry`) and chunks keep
queueing up to 4 batches, then the task waits. Each append carries the count appended before it, so
a retry whose first attempt did reach Redis is not written twice.
"""

from __future__ import annotations

import asyncio
from functools import partial

from shared.keys import Source
from shared.store import Store
from workers.lease import redis_retry


class Appender:
    def __init__(self, store: Store, stream_id: str, source: Source, max_batch: int) -> None:
        self._store = store
        self._stream_id = stream_id
        self._source = source
        self._max_batch = max_batch
        self._buf: list[str] = []
        self._inflight: asyncio.Task[None] | None = None
        self.appended = 0
        self.stopped = False  # the source is no longer running (cancelled, too long, lost)

    async def add(self, text: str) -> bool:
        """Queue one chunk. False once the source has stopped: the caller stops producing."""
        self._buf.append(text)
        if self._inflight is None or self._inflight.done():
            if self._inflight is not None:
                self._inflight.result()  # surface an append's failure here, in the task's flow
            self._inflight = asyncio.create_task(self._drain())
        elif len(self._buf) >= self._max_batch * 4:
            await asyncio.shield(self._inflight)  # backpressure: producer faster than Redis
        return not self.stopped

    async def close(self) -> None:
        """Wait until everything queued is appended (or the source stopped)."""
        if self._inflight is not None:
            await self._inflight
        if self._buf and not self.stopped:
            await self._drain()

    async def _drain(self) -> None:
        while self._buf and not self.stopped:
            batch, self._buf = self._buf[: self._max_batch], self._buf[self._max_batch :]
            append = partial(self._store.append, self._stream_id, self._source, batch, self.appended)
            n = await redis_retry(append, "append", self._stream_id)
            if n < 0:
                self.stopped = True
                self._buf.clear()
            else:
                self.appended += n
