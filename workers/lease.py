"""Leases on running sources, the sweeper that ends the sources of dead workers, and retrying
through Redis outages.

**Lease.** Claiming a source (``Store.start``) sets ``<prefix>:{id}:lease:<src>`` = worker id with a
TTL of 0.7 * ``TANDEM_LEASE_S`` and scores the source's ``<prefix>:running`` member with that
deadline. While the source runs, its job renews both every lease_s/5 (three missed renewals in a
row still keep it); the renewal is written in the worker's next append write (workers/pipe.py), not
in a round trip of its own. A killed worker stops renewing; its lease expires.

**Sweeper.** Every worker runs one, every lease_s/5: the ``running`` members whose deadline has
passed are checked in Lua (``Store.reap``); a source whose lease is gone and whose state is still
``running`` ends there with ``error`` code ``worker_lost`` (then the stream settles as usual, so B
and ``end`` follow). Worst case from a SIGKILL to the reader's ``worker_lost``: lease TTL + one
sweep interval = 0.9 * lease_s. The sources of a dead worker are *not* continued elsewhere: a task is
not repeatable (a new run of an LLM would contradict what readers already received), so the source
ends where it stopped, with everything it wrote kept.

The sweeper also cancels orphans (``TANDEM_ORPHAN_S`` > 0: a running stream no API process has
reported an SSE reader for, during that long; see ``Sweeper.orphans``), drops expired streams from
the ``<prefix>:streams`` index, and drops old ``arq:abort`` entries arq itself never removes.

**Redis outages.** ``redis_retry`` repeats an idempotent Redis call (every write of a running source
is: the appender passes its count, ``start`` recognises its own claim, ``finish`` writes one terminal
entry only) with bounded backoff until Redis answers again. A short outage loses nothing: the source
goes on. An outage longer than the lease ends the source with ``worker_lost`` when Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.background import cancel_and_wait
from shared.keys import Source
from shared.settings import Settings
from shared.store import Store, now_ms

log = logging.getLogger("tandem.worker")

RENEW_FRACTION = 0.2  # renew every lease_s/5
SWEEP_FRACTION = 0.2  # sweep every lease_s/5
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, ConnectionError)
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
ABORT_ENTRY_MAX_AGE_MS = 600_000  # an `arq:abort` entry older than this is no longer needed
REAP_BATCH = 200

T = TypeVar("T")


async def redis_retry(call: Callable[[], Awaitable[T]], what: str, stream_id: str = "") -> T:
    """Run `call` until Redis answers: backoff from 50 ms doubling to 2 s. Only for calls that are
    safe to repeat. Cancellation (a shutdown, an abort) ends the wait."""
    delay, since = BACKOFF_FIRST_S, 0.0
    while True:
        try:
            result = await call()
        except REDIS_ERRORS as e:
            if not since:
                since = time.monotonic()
                log.warning("Redis unavailable; retrying", extra={"op": what, "stream": stream_id, "error": str(e) or type(e).__name__})
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
            continue
        if since:
            log.info("Redis is back", extra={"op": what, "stream": stream_id, "after_s": round(time.monotonic() - since, 2)})
        return result


class Lease:
    """Keeps one running source's lease while its job runs (start after `Store.start`, stop before
    writing the terminal entry). When a renewal finds that the source is no longer running, or that
    the lease expired (and ends the source with `worker_lost`), it cancels the job: `lost` says why."""

    def __init__(
        self, store: Store, stream_id: str, source: Source, worker_id: str, renew: Callable[[str, Source, str], Awaitable[int]] | None = None
    ) -> None:
        """`renew`: how a renewal is written (`Store.renew`'s signature; the worker's append pipe
        writes it along with the appends, workers/pipe.py)."""
        self.store, self.stream_id, self.source, self.worker_id = store, stream_id, source, worker_id
        self._renew = renew or store.renew
        self.lost: str | None = None  # "worker_lost" or "stopped", once the lease cancelled the job
        self._job = asyncio.current_task()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"tandem-lease-{self.stream_id}-{self.source}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _loop(self) -> None:
        every = self.store.settings.lease_s * RENEW_FRACTION
        failing = False
        while True:
            await asyncio.sleep(every)
            try:
                r = await self._renew(self.stream_id, self.source, self.worker_id)
            except REDIS_ERRORS as e:
                if not failing:
                    log.warning("lease renewal failed; retrying", extra={"stream": self.stream_id, "source": self.source, "error": str(e)})
                failing = True
                continue
            if failing:
                log.info("lease renewed again", extra={"stream": self.stream_id, "source": self.source, "renewed": r == 1})
            failing = False
            if r == 1:
                continue
            self.lost = "worker_lost" if r < 0 else "stopped"
            log.warning("source stopped by its lease", extra={"stream": self.stream_id, "source": self.source, "reason": self.lost})
            if self._job is not None:
                self._job.cancel()
            return


class Sweeper:
    """One per worker process (started in on_startup). Every step is an idempotent Lua script or a
    read, so any number of workers sweep side by side."""

    def __init__(self, store: Store, settings: Settings, worker_id: str) -> None:
        self.store, self.settings, self.worker_id = store, settings, worker_id
        self.interval = settings.lease_s * SWEEP_FRACTION
        self.orphan_every = min(settings.orphan_s / 4, 5.0) if settings.orphan_s > 0 else 0.0
        self.index_every = min(max(settings.retention_s / 2, 1.0), 30.0)
        self._unread: dict[str, float] = {}  # stream id -> first time (monotonic) seen with no reader
        self._index_cursor = float("-inf")
        self._next_orphans = 0.0
        self._next_index = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="tandem-sweeper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as e:
                if not failing:
                    log.warning("sweeper: Redis unavailable; retrying", extra={"error": str(e)})
                failing = True
                continue
            except Exception:
                log.exception("sweeper failed; retrying")
                continue
            if failing:
                log.info("sweeper: Redis is back")
            failing = False

    async def sweep(self) -> None:
        await self.reap()
        now = time.monotonic()
        if self.orphan_every and now >= self._next_orphans:
            self._next_orphans = now + self.orphan_every
            await self.orphans(now)
        if now >= self._next_index:
            self._next_index = now + self.index_every
            await self.trim()

    async def reap(self) -> int:
        """End the sources whose worker stopped renewing their lease. Returns how many."""
        reaped = 0
        for _ in range(50):
            overdue = await self.store.overdue(now_ms(), REAP_BATCH)
            for stream_id, source in overdue:
                if await self.store.reap(stream_id, source):
                    reaped += 1
                    log.warning("worker lost: source ended", extra={"stream": stream_id, "source": source, "code": "worker_lost"})
            if len(overdue) < REAP_BATCH:
                break
        return reaped

    async def orphans(self, now: float) -> int:
        """Cancel running streams that no API process has reported an open SSE connection for, during
        TANDEM_ORPHAN_S of this sweeper's observations. Returns how many."""
        running = sorted(await self.store.running_streams())
        read = await self.store.streams_with_readers(running)
        unread: dict[str, float] = {}
        cancelled = 0
        for stream_id in running:
            if stream_id in read:
                continue
            since = unread[stream_id] = self._unread.get(stream_id, now)
            if now - since < self.settings.orphan_s:
                continue
            message = f"nobody read this stream for {self.settings.orphan_s:g} s (TANDEM_ORPHAN_S)"
            if await self.store.cancel(stream_id, message):
                await self.store.abort_jobs(stream_id)  # as DELETE does: arq cancels the running jobs
                cancelled += 1
                log.info("orphan stream cancelled", extra={"stream": stream_id, "orphan_s": self.settings.orphan_s})
            del unread[stream_id]
        self._unread = unread
        return cancelled

    async def trim(self) -> int:
        """Drop expired streams from the index (a batch per pass), and stale `arq:abort` entries."""
        now = now_ms()
        removed, self._index_cursor = await self.store.trim_index(self._index_cursor, now - self.settings.retention_s * 1000, 500)
        await self.store.trim_aborts(now - ABORT_ENTRY_MAX_AGE_MS)
        return removed
