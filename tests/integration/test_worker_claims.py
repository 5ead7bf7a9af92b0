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


async def test_claims_what_is_due_free_and_fits(redis_server: RedisServer, settings: Settings) -> None:
    pool = ArqRedis.from_url(redis_server.url)
    opts = worker_options(settings)
    for hook in ("on_startup", "on_shutdown", "redis_settings", "handle_signals", "max_jobs"):
        opts.pop(hook)
    worker = NoRun(**opts, redis_pool=pool, handle_signals=False, max_jobs=3)
    worker.started = []
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
