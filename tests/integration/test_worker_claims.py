"""workers/settings.py, TandemWorker: which queued job ids a poll tries to claim (real redis-server)."""

from __future__ import annotations

import asyncio

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from shared.redis_server import RedisServer
from shared.settings import Settings
from workers.settings import TandemWorker, worker_options


async def test_ids_running_here_or_elsewhere_are_not_claimed(redis_server: RedisServer, settings: Settings) -> None:
    pool = ArqRedis.from_url(redis_server.url)
    opts = worker_options(settings)
    for hook in ("on_startup", "on_shutdown", "redis_settings", "handle_signals"):
        opts.pop(hook)
    worker = TandemWorker(**opts, redis_pool=pool, handle_signals=False)
    try:
        here, elsewhere, free, gone = (f"{settings.key_prefix}-job-{n}" for n in ("here", "elsewhere", "free", "gone"))
        worker.tasks[here] = asyncio.get_running_loop().create_future()
        await pool.psetex(in_progress_key_prefix + elsewhere, 60_000, b"1")
        ids = [x.encode() for x in (here, elsewhere, free, gone)]
        # One pipelined round trip drops what is running; arq's own checks still see the rest.
        assert await worker._startable(ids) == [free.encode(), gone.encode()]
        assert await worker._startable([here.encode()]) == []
        assert await worker._startable([free.encode()]) == [free.encode()]
    finally:
        worker.tasks.clear()
        await pool.delete(in_progress_key_prefix + elsewhere)
        await pool.aclose()
