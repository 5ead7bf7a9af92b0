"""One writer per worker process: the buffered chunks of every running source, in one script call.

A worker runs many sources at once (TANDEM_WORKER_MAX_JOBS); at a thousand paced sources, one
script call per token would cost a round trip and a task each, most of the worker's CPU. Here one
task writes, on a connection of its own, and whatever all sources buffered while the previous
write was in flight goes together in the next: one EVALSHA for all of them (Store.append_many;
a script call per source cost Redis as much again as the appends themselves), with the lease
renewals that are due. The pipe keeps the worker's count of appended deltas, which each write
checks (a retried write is not applied twice; writes Redis lost are found).

Writes start at most once per TANDEM_APPEND_WINDOW_MS (2 ms), unless a source has a whole batch
buffered (`hurry`). Without the window, a moderately loaded worker wrote each token on its own as
it came, and every process down the line (Redis, the API's hub, the client) woke once per token:
at 500 paced streams the whole machine spent ~10% more CPU and token latency doubled. The first
write after a quiet spell goes out at once; the window only spaces the writes that follow, so it
adds at most that much to a token's latency.
"""

from __future__ import annotations

import asyncio
import logging

from shared.background import cancel_and_wait
from shared.keys import Source
from shared.store import AppendCall, Store
from shared.waker import Waker
from workers.appender import Appender
from workers.lease import redis_retry

log = logging.getLogger("tandem.worker")
Renewal = tuple[str, Source, str, "asyncio.Future[int]"]  # stream id, source, worker, its result


class AppendPipe:
    def __init__(self, store: Store, worker: str, window_s: float = 0.0) -> None:
        """`worker`: the id the sources' leases hold. `window_s`: the least time between the starts
        of two writes."""
        self._store = store
        self._worker = worker
        self._written = 0  # deltas this worker has appended (its `appended` count; Store.append_many)
        self._window = window_s
        self._ready: dict[Appender, None] = {}  # an ordered set: first come, first written
        self._renewals: list[Renewal] = []
        self._hurry = Waker()  # set: some source has a whole batch buffered; the window does not hold it
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn = store.connection()  # the pipe's own: it writes one batch at a time

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tandem-append-pipe")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self._conn.disconnect()

    def appender(self, stream_id: str, source: str, max_batch: int) -> Appender:
        return Appender(self, stream_id, source, max_batch)  # type: ignore[arg-type]

    def want(self, appender: Appender) -> None:
        self._ready[appender] = None
        self._wake.set()

    def hurry(self) -> None:
        """An appender has a whole batch (TANDEM_APPEND_MAX_BATCH) buffered: write without waiting
        for the window (it is there to gather small writes; a source producing flat out, like an
        unpaced stream or a backlog, would otherwise be capped at one batch per window)."""
        self._hurry.set()

    async def renew(self, stream_id: str, source: Source, worker: str) -> int:
        """Renew a source's lease (`Store.renew`) in the next write, with the appends."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._renewals.append((stream_id, source, worker, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = 0.0
        renewals: list[Renewal] = []
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._ready or self._renewals:
                    delay = next_at - loop.time()
                    if delay > 0:
                        await self._hurry.wait(loop.time() + delay)
                    self._hurry.clear()  # (a take below sets it again for a source with more than a batch)
                    next_at = loop.time() + self._window
                    batch = list(self._ready)
                    self._ready.clear()
                    calls = [ap.take() for ap in batch]
                    renewals = [r for r in self._renewals if not r[3].done()]  # (a stopped lease gave up)
                    self._renewals.clear()
                    try:
                        results = await redis_retry(lambda c=calls, r=renewals: self._write(c, r), "append")  # type: ignore[misc]
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # not a connection problem: fail these sources, keep writing
                        log.exception("append failed")
                        results = [e] * (len(calls) + len(renewals))
                    for ap, result in zip(batch, results[: len(calls)], strict=True):
                        if ap.applied(result):
                            self._ready[ap] = None
                    for (*_, fut), result in zip(renewals, results[len(calls) :], strict=True):
                        if fut.done():
                            continue
                        if isinstance(result, BaseException):
                            fut.set_exception(result)
                        else:
                            fut.set_result(int(result))
                    renewals = []
                    del batch, calls, results  # not kept while the pipe waits: an ended source's appender goes now
        finally:  # stopping: no lease waits on a write that will not happen
            for *_, fut in (*renewals, *self._renewals):
                fut.cancel()

    async def _write(self, calls: list[AppendCall], renewals: list[Renewal]) -> list[bytes | int | BaseException]:
        results, self._written = await self._store.append_many(
            calls, [(sid, src, worker) for sid, src, worker, _ in renewals], worker=self._worker, written=self._written, conn=self._conn
        )
        return list(results)
