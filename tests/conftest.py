"""Fixtures: one private redis-server per test session (free port, temp dir), a unique key prefix
per test, and real tandem processes on top of it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from api.hub import Hub
from shared.mux import Mux
from shared.redis_server import RedisServer
from shared.settings import Settings
from shared.store import Store
from tests.harness import Stack, stack


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def settings(redis_server: RedisServer, prefix: str) -> Settings:
    return Settings(redis_url=redis_server.url, key_prefix=prefix, queue_name=f"{prefix}:queue", _env_file=None)  # type: ignore[call-arg]


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis: Redis, settings: Settings) -> AsyncIterator[Store]:
    """As the API has it: reads on one multiplexed connection (shared/mux.py)."""
    mux = Mux(redis.connection_pool, timeout_s=5.0)
    yield Store(redis, settings, mux)
    await mux.aclose()


@pytest.fixture
def live(tmp_path: Path, redis_server: RedisServer) -> Iterator[Stack]:
    """Two `tandem api` and two `tandem worker` processes on the session's Redis."""
    with stack(tmp_path, redis_server, apis=2, workers=2) as s:
        yield s


@pytest.fixture
async def hub(redis_server: RedisServer, prefix: str) -> AsyncIterator[Hub]:
    """A running hub (api/hub.py) on the test Redis."""
    h = Hub(Redis.from_url(redis_server.url, socket_connect_timeout=2.0), f"{prefix}:hub", confirm_timeout_s=3.0)
    await h.start()
    await asyncio.wait_for(h.connected.wait(), 5.0)
    yield h
    await h.stop()
