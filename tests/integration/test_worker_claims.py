"""workers/settings.py, TandemWorker.start_jobs: claiming a batch of arq jobs in one round trip
(real redis-server)."""

from __future__ import annotations

import asyncio

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from shared.redis_server import RedisServer
from shared.settings import Settings
from workers.settings import TandemWorker, worker_options


class NoRun(TandemWorker):
    """Claims as the worker does; the jobs themselves only record that they were started."""

    started: list[str]

    async def run_job(self, job_id: str, score: int) -> None:
        self.started.append(job_id)
        await asyncio.sleep(3600)


def no_run_worker(settings: Settings, pool: ArqRedis, max_jobs: int) -> NoRun:
    """The worker as `tandem worker` configures it, on `pool`, without its start-up hooks."""
    opts = worker_options(settings)
    for hook in ("on_startup", "on_shutdown", "redis_settings", "handle_signals", "max_jobs"):
        opts.pop(hook)
    worker = NoRun(**opts, redis_pool=pool, handle_signals=False, max_jobs=max_jobs)
    worker.started = []
    return worker


async def test_claims_what_is_due_free_and_fits(redis_server: RedisServer, settings: Settings) -> None:
    pool = ArqRedis.from_url(redis_server.url)
    worker = no_run_worker(settings, pool, max_jobs=3)
    queue, p = settings.queue_name, settings.key_prefix
    free = [f"{p}-free-{i}" for i in range(4)]
    here, elsewhere, deferred, gone = (f"{p}-{n}" for n in ("here", "elsewhere", "deferred", "gone"))
    try:
        await pool.zadd(queue, {**{j: 1 for j in [*free, here, elsewhere]}, deferred: 2**50})
        await pool.psetex(in_progress_key_prefix + elsewhere, 60_000, b"1")
        worker.tasks[here] = asyncio.get_running_loop().create_future()
        worker.job_counter = 0
        ids = [j.encode() for j in [*free, here, elsewhere, deferred, gone]]
        await worker.start_jobs(ids)
        await asyncio.sleep(0)
        # Three slots: three of the free jobs, each now held with arq's in-progress key.
        assert len(worker.started) == 3 and set(worker.started) <= set(free)
        assert worker.job_counter == 3 and set(worker.started) <= set(worker.tasks)
        for j in worker.started:
            ttl = await pool.pttl(in_progress_key_prefix + j)
            assert 0 < ttl <= worker.in_progress_timeout_s * 1000
        (left,) = set(free) - set(worker.started)
        assert not await pool.exists(in_progress_key_prefix + left)
        assert not await pool.exists(in_progress_key_prefix + deferred)
        # No slot left: nothing more is claimed.
        await worker.start_jobs(ids)
        await asyncio.sleep(0)
        assert len(worker.started) == 3
        assert not await pool.exists(in_progress_key_prefix + left)
    finally:
        for j in worker.started:
            worker.tasks[j].cancel()
        worker.tasks.clear()
        await pool.delete(queue, *(in_progress_key_prefix + j for j in [*free, elsewhere]))
        await pool.aclose()


async def test_claims_no_more_than_prefetch_until_they_start(redis_server: RedisServer, settings: Settings) -> None:
    """A worker holds at most TANDEM_WORKER_PREFETCH jobs claimed and not started: the rest of a
    burst stays in the queue for the other workers, however many slots this one has free."""
    pool = ArqRedis.from_url(redis_server.url)
    worker = no_run_worker(settings.model_copy(update={"worker_prefetch": 2}), pool, max_jobs=10)
    queue, p = settings.queue_name, settings.key_prefix
    burst = [f"{p}-burst-{i}" for i in range(6)]
    ids = [j.encode() for j in burst]
    try:
        await pool.zadd(queue, dict.fromkeys(burst, 1))
        assert worker.queue_read_limit == 100  # ids read per poll: 4 x prefetch, at least 100
        await worker.start_jobs(ids)
        await asyncio.sleep(0)
        assert len(worker.started) == 2 and worker.starting == set(worker.started)
        await worker.start_jobs(ids)  # both still starting: nothing more
        await asyncio.sleep(0)
        assert len(worker.started) == 2
        worker.ctx["job_started"](worker.started[0])  # what run_source calls once its source is claimed
        await worker.start_jobs(ids)
        await asyncio.sleep(0)
        assert len(worker.started) == 3 and len(worker.starting) == 2
        left = [j for j in burst if j not in worker.started]
        assert not any([await pool.exists(in_progress_key_prefix + j) for j in left])
    finally:
        for j in worker.started:
            worker.tasks[j].cancel()
        worker.tasks.clear()
        await pool.delete(queue, *(in_progress_key_prefix + j for j in burst))
        await pool.aclose()
