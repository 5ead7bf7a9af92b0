"""arq worker configuration, built from tandem's Settings."""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any

import httpx
import orjson
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker, func

from shared.settings import Settings
from shared.store import Store
from workers.job import run_source
from workers.registry import load_registry

JOB_NAME = "run_source"


def redis_settings(settings: Settings) -> RedisSettings:
    rs = RedisSettings.from_dsn(settings.effective_redis_url)
    rs.conn_timeout = 2
    rs.conn_retries = 30  # bounded reconnect at start-up
    rs.conn_retry_delay = 1
    return rs


def serialize(obj: Any) -> bytes:
    return orjson.dumps(obj)


def deserialize(data: bytes) -> Any:
    return orjson.loads(data)


def worker_options(settings: Settings) -> dict[str, Any]:
    registry = load_registry(settings)  # fail at start-up, not at the first job, on a bad task path

    async def on_startup(ctx: dict[str, Any]) -> None:
        redis: ArqRedis = ctx["redis"]
        ctx["store"] = Store(redis, settings)
        ctx["registry"] = registry
        ctx["worker_id"] = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        ctx["http"] = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0))

    async def on_shutdown(ctx: dict[str, Any]) -> None:
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
        "poll_delay": settings.worker_poll_delay_s,
        "job_timeout": settings.max_stream_s,
        "keep_result": 60,
        "handle_signals": True,
    }


def make_worker(settings: Settings) -> Worker:
    return Worker(**worker_options(settings))
