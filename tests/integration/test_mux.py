"""shared/mux.py on a real redis-server: many commands in flight on one connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.mux import Mux, checked
from shared.redis_server import RedisServer


@pytest.fixture
async def mux(redis_server: RedisServer) -> AsyncIterator[Mux]:
    m = Mux(ConnectionPool.from_url(redis_server.url, client_name="tandem-mux-test"), timeout_s=2.0)
    yield m
    await m.aclose()


async def mux_clients(redis: Redis) -> list[dict[str, str]]:
    return [c for c in await redis.client_list() if c.get("name") == "tandem-mux-test"]


async def test_concurrent_commands_share_one_connection(mux: Mux, redis: Redis, prefix: str) -> None:
    key = f"{prefix}:n"
    replies = await asyncio.gather(*(mux.execute("INCR", key) for _ in range(2000)))
    assert sorted(replies) == list(range(1, 2001))  # each got its own reply
    assert await mux.execute("GET", key) == b"2000"
    assert len(await mux_clients(redis)) == 1


async def test_a_redis_error_is_that_commands_alone(mux: Mux, prefix: str) -> None:
    await mux.execute("SET", f"{prefix}:s", "x")
    ok, bad, after = await asyncio.gather(
        mux.execute("GET", f"{prefix}:s"), mux.execute("HGET", f"{prefix}:s", "f"), mux.execute("PING"), return_exceptions=True
    )
    assert ok == b"x" and isinstance(bad, ResponseError) and after == b"PONG"


async def test_execute_many_keeps_a_transaction_whole(mux: Mux, prefix: str) -> None:
    key = f"{prefix}:tx"

    async def tx(i: int) -> list[object]:
        return await mux.execute_many([("MULTI",), ("RPUSH", key, f"{i}a"), ("RPUSH", key, f"{i}b"), ("EXEC",)])

    results = await asyncio.gather(*(tx(i) for i in range(200)), *(mux.execute("LLEN", key) for _ in range(50)))
    for r in results[:200]:
        assert isinstance(r, list) and r[:3] == [b"OK", b"QUEUED", b"QUEUED"]
    items = await mux.execute("LRANGE", key, 0, -1)
    assert all(items[i][:-1] == items[i + 1][:-1] for i in range(0, len(items), 2)), "no transaction was split"
    # A Redis error inside a batch is that command's reply; the others still answer.
    out = await mux.execute_many([("SET", f"{prefix}:s", "1"), ("LPUSH", f"{prefix}:s", "x"), ("GET", f"{prefix}:s")])
    assert out[0] == b"OK" and isinstance(out[1], ResponseError) and out[2] == b"1"


async def test_a_killed_connection_fails_what_is_in_flight_then_reconnects(mux: Mux, redis: Redis, prefix: str) -> None:
    await mux.execute("PING")
    (client,) = await mux_clients(redis)
    pending = asyncio.create_task(mux.execute("BLPOP", f"{prefix}:never", 5))
    await asyncio.sleep(0.1)
    await redis.client_kill_filter(_id=client["id"])
    with pytest.raises(RedisConnectionError):
        await pending
    assert await mux.execute("PING") == b"PONG"  # a new connection
    assert len(await mux_clients(redis)) == 1


async def test_no_reply_in_time_fails_the_connection(redis_server: RedisServer, redis: Redis, prefix: str) -> None:
    mux = Mux(ConnectionPool.from_url(redis_server.url, client_name="tandem-mux-test"), timeout_s=0.2)
    try:
        await mux.execute("PING")
        await redis.execute_command("CLIENT", "PAUSE", 600, "ALL")
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(RedisTimeoutError):
            await mux.execute("GET", f"{prefix}:x")
        assert asyncio.get_running_loop().time() - t0 < 0.5
        await asyncio.sleep(0.6)
        assert await mux.execute("PING") == b"PONG"
    finally:
        await mux.aclose()


async def test_closed(mux: Mux) -> None:
    await mux.execute("PING")
    await mux.aclose()
    with pytest.raises(RedisConnectionError):
        await mux.execute("PING")


async def test_redis_down_is_a_connection_error(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = RedisServer(tmp_path_factory.mktemp("mux-down")).start()
    mux = Mux(ConnectionPool.from_url(server.url, socket_connect_timeout=1.0), timeout_s=1.0)
    try:
        assert await mux.execute("PING") == b"PONG"
        server.stop()
        with pytest.raises((RedisConnectionError, RedisTimeoutError)):
            await mux.execute("PING")
        with pytest.raises(RedisConnectionError):
            await mux.execute("PING")  # connecting fails too, at once
    finally:
        await mux.aclose()


async def test_submitted_commands_of_one_step_go_out_in_one_write(mux: Mux, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await mux.execute("SET", f"{prefix}:s", "x")  # connected
    writes: list[bytes] = []
    conn = mux._conn
    assert conn is not None and conn._writer is not None
    real_write = conn._writer.write
    monkeypatch.setattr(conn._writer, "write", lambda data: (writes.append(data), real_write(data))[1])
    # Started in one step, waited for in turn: one write, no task, each its own reply.
    started = [mux.submit("GET", f"{prefix}:s"), mux.submit("HGET", f"{prefix}:s", "f"), mux.submit("INCR", f"{prefix}:n")]
    assert not any(isinstance(f, asyncio.Task) for f in started)
    replies = [await f for f in started]
    assert len(writes) == 1
    assert replies[0] == b"x" and replies[2] == 1
    with pytest.raises(ResponseError):
        checked(replies[1])  # a Redis error is that command's reply
    assert checked(replies[0]) == b"x"


async def test_submit_before_connecting_and_when_no_reply_comes(redis_server: RedisServer, redis: Redis, prefix: str) -> None:
    mux = Mux(ConnectionPool.from_url(redis_server.url, client_name="tandem-mux-test"), timeout_s=0.2)
    try:
        assert await mux.submit("PING") == b"PONG"  # not connected yet: it connects first
        await redis.execute_command("CLIENT", "PAUSE", 600, "ALL")
        t0 = asyncio.get_running_loop().time()
        late = mux.submit("GET", f"{prefix}:x")
        with pytest.raises(RedisTimeoutError):
            await late
        assert asyncio.get_running_loop().time() - t0 < 0.5
        await asyncio.sleep(0.6)
        assert await mux.submit("PING") == b"PONG"  # a new connection
    finally:
        await mux.aclose()
