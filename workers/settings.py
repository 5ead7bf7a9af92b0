"""arq worker configuration, built from tandem's Settings, and arq's Worker made to outlive Redis
outages (TandemWorker)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import time
from signal import Signals
from typing import Any

import httpx
import orjson
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import abort_job_max_age, abort_jobs_ss, in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker, func
from redis.asyncio import BlockingConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import WatchError

from shared.gcpolicy import tune_gc
from shared.settings import Settings
from shared.store import Store
from shared.waker import Waker
from workers.job import run_source
from workers.lease import BACKOFF_MAX_S, REDIS_ERRORS, Sweeper, redis_retry
from workers.metrics import start_worker_ops, stop_worker_ops
from workers.pipe import AppendPipe
from workers.registry import load_registry
from workers.wakeup import Wakeup

JOB_NAME = "run_source"
JOB_TIMEOUT_MARGIN_S = 60  # arq's own timeout stays behind the job's (TANDEM_MAX_STREAM_S)

log = logging.getLogger("tandem.worker")
# What a Redis outage raises in arq's loop: redis-py turns a connection error inside a WATCH into
# a WatchError, which arq expects only from EXEC.
LOOP_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, WatchError)


def redis_settings(settings: Settings) -> RedisSettings:
    rs = RedisSettings.from_dsn(settings.effective_redis_url)
    rs.conn_timeout = 2
    rs.conn_retries = 30  # bounded reconnect at start-up
    rs.conn_retry_delay = 1
    return rs


def serialize(obj: Any) -> bytes:
    # arq also stores a job's result through this: an aborted job's result is its CancelledError.
    return orjson.dumps(obj, default=_exception_as_json)


def _exception_as_json(obj: Any) -> Any:
    if isinstance(obj, BaseException):
        return {"exception": type(obj).__name__, "message": str(obj)}
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def deserialize(data: bytes) -> Any:
    return orjson.loads(data)


def worker_options(settings: Settings) -> dict[str, Any]:
    registry = load_registry(settings)  # fail at start-up, not at the first job, on a bad task path

    async def on_startup(ctx: dict[str, Any]) -> None:
        redis: ArqRedis = ctx["redis"]
        ctx["store"] = Store(redis, settings)
        ctx["worker_id"] = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        # One writer for every running source's tokens.
        ctx["pipe"] = AppendPipe(ctx["store"], ctx["worker_id"], settings.append_window_ms / 1000)
        ctx["pipe"].start()
        ctx["registry"] = registry
        ctx["http"] = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0))
        await start_worker_ops(ctx, settings)  # /metrics on TANDEM_WORKER_METRICS_PORT, heartbeat for `tandem stats`
        sweeper = ctx["sweeper"] = Sweeper(ctx["store"], settings, ctx["worker_id"])
        sweeper.start()  # ends the sources of dead workers (leases), orphans, index trim
        poll_now = ctx.get("poll_now")
        if poll_now is not None:  # (TandemWorker's) a job enqueued is started at once
            wakeup = ctx["wakeup"] = Wakeup(settings, ctx["store"].keys.jobs, poll_now)
            wakeup.start()
        tune_gc()  # thousands of running sources: rare full collections (tail latency)

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        wakeup: Wakeup | None = ctx.get("wakeup")
        if wakeup is not None:
            await wakeup.stop()
        sweeper: Sweeper | None = ctx.get("sweeper")
        if sweeper is not None:
            await sweeper.stop()
        pipe: AppendPipe | None = ctx.get("pipe")
        if pipe is not None:
            await pipe.stop()
        await stop_worker_ops(ctx)
        http: httpx.AsyncClient | None = ctx.get("http")
        if http is not None:
            await http.aclose()

    return {
        "functions": [func(run_source, name=JOB_NAME, max_tries=3)],
        "redis_settings": redis_settings(settings),
        "queue_name": settings.queue_name,
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        "job_serializer": serialize,
        "job_deserializer": deserialize,
        "allow_abort_jobs": True,
        "max_jobs": settings.worker_max_jobs,
        # Due ids read per poll: enough to see past the jobs three other workers claimed and have
        # not started yet (at most TANDEM_WORKER_PREFETCH each), not the whole queue of a burst
        # (arq's default reads 5 x max_jobs ids on every poll).
        "queue_read_limit": max(settings.worker_prefetch * 4, 100),
        "poll_delay": settings.worker_poll_delay_s,
        "job_timeout": settings.max_stream_s + JOB_TIMEOUT_MARGIN_S,
        "keep_result": min(60, settings.retention_s),  # a job's result never outlives its stream
        "handle_signals": True,
        # SIGTERM: stop taking jobs, let running ones finish for this long, then cancel the rest
        # (their sources end with `worker_lost`, "worker shut down"). 0: cancel at once.
        "job_completion_wait": settings.worker_drain_s,
        "ctx": {"stopping": asyncio.Event()},  # set on SIGTERM/SIGINT; jobs see it (their ctx is a copy)
        "prefetch": settings.worker_prefetch,
        "redis_pool_size": settings.worker_redis_pool_size,
    }


# KEYS: arq's queue ; ARGV: in-progress key prefix, in-progress timeout (ms), now (ms), most to claim, job ids...
# Returns [job id, score, ...] of the jobs this worker now holds (arq's in-progress key set), in
# the order given. A job is claimable when it is in the queue, due, and nobody holds it: arq's
# own test in start_jobs. (The in-progress keys are not declared in KEYS, as arq's keys could not
# live on one Redis Cluster slot anyway.)
_CLAIM = r"""
local out, taken = {}, 0
for i = 5, #ARGV do
  if taken >= tonumber(ARGV[4]) then break end
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) <= tonumber(ARGV[3]) and redis.call('EXISTS', ARGV[1] .. id) == 0 then
    redis.call('PSETEX', ARGV[1] .. id, ARGV[2], '1')
    out[#out + 1] = id
    out[#out + 1] = score
    taken = taken + 1
  end
end
return out
"""


# KEYS: arq's queue, arq's abort set ; ARGV: now (ms), read offset, most ids to read (0: none),
# now + arq's abort_job_max_age (ms)
# Returns {due job ids, abort requests}: what arq's poll reads in three round trips (a ZRANGEBYSCORE,
# then a MULTI of ZRANGE and ZREMRANGEBYSCORE on the abort set), with arq's own bounds.
_POLL = r"""
local due = {}
if tonumber(ARGV[3]) > 0 then
  due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', ARGV[2], ARGV[3])
end
local aborts = redis.call('ZRANGE', KEYS[2], 0, -1)
if #aborts > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], ARGV[4], '+inf') end
return {due, aborts}
"""


class TandemWorker(Worker):
    """arq's Worker, plus: a Redis outage does not end the process. arq's poll loop raises on the
    first connection error and the worker exits; here each failed poll is logged and retried with
    backoff (100 ms doubling to 2 s) while running jobs carry on (their writes retry by themselves),
    and the worker goes on as soon as Redis answers. A job that arq could not start or finish
    because of the outage is released (its in-progress key deleted) so it runs, or is closed, at
    once rather than after arq's in-progress timeout."""

    def __init__(self, *, prefetch: int, redis_pool_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prefetch = prefetch
        self.redis_pool_size = redis_pool_size
        # Jobs claimed here whose source is not claimed yet (run_source calls `job_started` once
        # Store.start answered): at most `prefetch` of them.
        self.starting: set[str] = set()
        self.ctx["job_started"] = self.starting.discard
        # The CancelledError that ended each cancelled job, until arq is done with it (run_job).
        self.cancelled: dict[str, BaseException] = {}
        self.ctx["job_cancelled"] = self.cancelled.__setitem__
        # Set by a message on the jobs channel (workers/wakeup.py): poll now, not at the next tick.
        self._poll_now = Waker()
        self.ctx["poll_now"] = self._poll_now.set
        self._down_since = 0.0
        self._backoff = 0.1
        self._claim: AsyncScript | None = None  # registered once arq has made its pool
        self._poll: AsyncScript | None = None
        self._finished = False  # a job task has finished since the last poll

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await self._bounded_pool()
        if self.burst:
            await super().main()
            return
        # arq's main without burst mode, its poll loop waiting on the jobs channel too: a poll
        # every poll_delay, or at once when woken (a wake during a poll starts the next at once).
        log.info("worker starting", extra={"functions": sorted(self.functions), "queue": self.queue_name})
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        loop = asyncio.get_running_loop()
        while True:
            self._poll_now.clear()
            began = loop.time()
            await self._poll_iteration()
            await self._poll_now.wait(began + self.poll_delay_s)

    async def _bounded_pool(self) -> ArqRedis:
        """arq's client on a pool of at most `redis_pool_size` connections
        (TANDEM_WORKER_REDIS_POOL_SIZE), where a command waits for a free one. arq's own pool has no
        bound: a worker starting a burst has a command in flight for each of up to
        TANDEM_WORKER_PREFETCH jobs, and it held up to 173 connections in the bench (a pool allowed
        1,024 opened 1,025), each a file descriptor here and a client in Redis. At 64, a
        5,000-stream burst ran at a median 66,000 events/s over five runs, at 1,024 at 74,000
        (noisy; 16 cost a quarter). arq's `create_pool` still makes the first connection, with its
        start-up retries."""
        first = await create_pool(
            self.redis_settings,
            job_deserializer=self.job_deserializer,
            job_serializer=self.job_serializer,
            default_queue_name=self.queue_name,
            expires_extra_ms=self.expires_extra_ms,
        )
        made = first.connection_pool
        kwargs = {**made.connection_kwargs, "client_name": f"tandem-worker:{socket.gethostname()}:{os.getpid()}"}
        pool = BlockingConnectionPool(connection_class=made.connection_class, max_connections=self.redis_pool_size, timeout=None, **kwargs)
        await first.aclose()
        return ArqRedis(
            pool,
            job_serializer=self.job_serializer,
            job_deserializer=self.job_deserializer,
            default_queue_name=self.queue_name,
            expires_extra_ms=self.expires_extra_ms,
        )

    def _stopping(self, signum: Signals) -> None:
        stopping: asyncio.Event | None = self.ctx.get("stopping")
        if stopping is not None:
            stopping.set()
        log.info("worker stopping", extra={"signal": Signals(signum).name, "drain_s": self._job_completion_wait, "running": len(self.tasks)})

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        self._stopping(signum)
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: Signals) -> None:
        self._stopping(signum)
        super().handle_sig(signum)

    async def _poll_iteration(self) -> None:
        try:
            await self._poll_once()
        except LOOP_ERRORS as e:
            if not self._down_since:
                self._down_since = time.monotonic()
                log.warning("Redis unavailable; the worker keeps retrying", extra={"error": str(e) or type(e).__name__})
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            return
        if self._down_since:
            log.info("Redis is back; the worker goes on", extra={"after_s": round(time.monotonic() - self._down_since, 2)})
            self._down_since, self._backoff = 0.0, 0.1

    async def _poll_once(self) -> None:
        """arq's poll (`Worker._poll_iteration`: start due jobs, cancel aborted ones, drop finished
        tasks, heartbeat), with its reads in one script call instead of three round trips, and
        the running tasks looked through only when one has finished, not on every poll. A worker
        polls every TANDEM_WORKER_POLL_DELAY_S (20 ms): arq's way cost an idle worker 3% of a core,
        and a busy one with a thousand sources running more than its share."""
        if self._poll is None:
            self._poll = self.pool.register_script(_POLL)
        free = self.allow_pick_jobs and self.job_counter < self.max_jobs and len(self.starting) < self.prefetch
        want = self.queue_read_limit if free else 0
        now = timestamp_ms()
        store: Store = self.ctx["store"]
        job_ids, abort_ids = await store.run_script(self._poll, [self.queue_name, abort_jobs_ss], [now, self._queue_read_offset, want, now + abort_job_max_age])
        if job_ids:
            await self.start_jobs(job_ids)
        if abort_ids:
            aborted: set[str] = set()
            for raw in abort_ids:
                job_id = raw.decode()
                task = self.job_tasks.get(job_id)
                if task is not None:
                    aborted.add(job_id)
                    task.cancel()
            if aborted:
                self.aborting_tasks.update(aborted)
                await self.pool.zrem(abort_jobs_ss, *aborted)
        if self._finished:
            self._finished = False
            for job_id, t in list(self.tasks.items()):
                if t.done():
                    del self.tasks[job_id]
                    t.result()  # as arq: an error escaping run_job is not swallowed
        await self.heart_beat()

    def _job_done(self, _: asyncio.Task[None]) -> None:
        self._release_sem_dec_counter_on_complete()
        self._finished = True

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Claim up to the free slots' worth of `job_ids` in one round trip, and run them, so that
        at most `prefetch` of this worker's jobs are claimed and not started yet.

        arq claims one id at a time (WATCH, EXISTS, ZSCORE, MULTI/PSETEX/EXEC: four round trips in
        a row per id), and every worker walks the same ids in the same order, so two workers
        spend most of a burst claiming each other's jobs: at a thousand streams created at once,
        sources started seconds late. Here one script claims the batch with arq's own keys and
        rules (not yet started, due, in-progress key set for arq's timeout), and each worker
        starts its walk at a random point of the batch, so two workers seldom want the same id.
        What follows is arq's: its run_job, slots and accounting.

        Without the prefetch bound, the first worker to poll after a burst claimed every due job
        (up to TANDEM_WORKER_MAX_JOBS) and started them one after another while the others idled:
        5,000 streams created at once in the bench went 11,032 jobs to one worker, 968 to the
        other, and the busy one started them so late that it missed lease renewals."""
        room = min(self.max_jobs - self.job_counter, self.prefetch - len(self.starting))
        ids = [j.decode() for j in job_ids]
        ids = [j for j in ids if j not in self.tasks]
        if room <= 0 or not ids:
            return
        at = random.randrange(len(ids))
        ids = (ids[at:] + ids[:at])[: room * 2]
        if self._claim is None:
            self._claim = self.pool.register_script(_CLAIM)
        claimed = await self._claim(keys=[self.queue_name], args=[
            in_progress_key_prefix, int(self.in_progress_timeout_s * 1000), timestamp_ms(), room, *ids,
        ])  # fmt: skip
        for raw_id, score in zip(claimed[::2], claimed[1::2], strict=True):
            job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            await self.sem.acquire()  # free: the script took at most `room` jobs
            self.job_counter += 1
            self.starting.add(job_id)
            t = self.loop.create_task(self.run_job(job_id, int(float(score))))
            t.add_done_callback(self._job_done)
            self.tasks[job_id] = t

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        except LOOP_ERRORS as e:
            log.warning("job interrupted by a Redis outage; releasing it", extra={"job": job_id, "error": str(e)})
            await redis_retry(lambda: self.pool.delete(in_progress_key_prefix + job_id), "release job")
        finally:
            self.starting.discard(job_id)  # (a job that ended before its source's claim)
            exc = self.cancelled.pop(job_id, None)
            if exc is not None:
                # arq's frame holds it (its job result) and its traceback holds that frame:
                # without the traceback the cycle is gone, and the job's objects with it.
                exc.__traceback__ = None

    async def close(self) -> None:
        try:
            await super().close()
        except REDIS_ERRORS as e:
            log.warning("Redis unavailable at shutdown", extra={"error": str(e)})
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)


def make_worker(settings: Settings) -> Worker:
    return TandemWorker(**worker_options(settings))
