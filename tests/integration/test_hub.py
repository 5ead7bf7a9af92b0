"""api/hub.py on a real redis-server: one pub/sub connection fanning announcements out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from api.hub import FEED_BYTES, Hub
from shared.events import Announcement
from shared.redis_server import RedisServer, free_port
from shared.store import Store
from tests.integration.test_store import running_stream


class Recorder:
    def __init__(self) -> None:
        self.announcements: list[Announcement] = []
        self.resyncs = 0
        self.event = asyncio.Event()

    def on_announcement(self, ann: Announcement) -> None:
        self.announcements.append(ann)
        self.event.set()

    def on_resync(self) -> None:
        self.resyncs += 1
        self.event.set()

    def texts(self) -> list[str]:
        return [f.get("text", f["type"]) for a in self.announcements for _, f in a.entries]


async def eventually(check: Callable[[], bool], within: float = 5.0, what: str = "") -> None:
    for _ in range(int(within / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    assert check(), what or "not within the time limit"


async def numsub_becomes(redis: Redis, channel: str, n: int, within: float = 5.0) -> None:
    for _ in range(int(within / 0.02)):
        if await numsub(redis, channel) == n:
            return
        await asyncio.sleep(0.02)
    assert await numsub(redis, channel) == n


async def numsub(redis: Redis, channel: str) -> int:
    ((_, n),) = await redis.pubsub_numsub(channel)
    return int(n)


async def test_subscribe_then_receive(hub: Hub, store: Store, redis: Redis) -> None:
    sid = await running_stream(store)
    channel = store.keys.channel(sid)
    rec = Recorder()
    await hub.subscribe(channel, rec)
    # Confirmed by Redis when subscribe returns: an append right now is not missed.
    assert await numsub(redis, channel) == 1
    await store.append(sid, "a", ["x", "y"])
    await eventually(lambda: rec.texts() == ["x", "y"])
    assert rec.announcements[0].source == "a" and rec.announcements[0].prev == "0-0"
    assert hub.listeners == 1
    assert rec.resyncs == 0


async def test_fan_out_on_one_subscription(hub: Hub, store: Store, redis: Redis) -> None:
    sid, other = await running_stream(store), await running_stream(store)
    channel = store.keys.channel(sid)
    recs = [Recorder() for _ in range(5)]
    for r in recs:
        await hub.subscribe(channel, r)
    elsewhere = Recorder()
    await hub.subscribe(store.keys.channel(other), elsewhere)
    assert await numsub(redis, channel) == 1  # one SUBSCRIBE, however many readers
    assert hub.listeners == 6
    await store.append(sid, "b", ["1"])
    await store.append(other, "a", ["2"])
    await eventually(lambda: all(r.texts() == ["1"] for r in recs) and elsewhere.texts() == ["2"])


async def test_unsubscribe_last_listener(hub: Hub, store: Store, redis: Redis) -> None:
    sid = await running_stream(store)
    channel = store.keys.channel(sid)
    r1, r2 = Recorder(), Recorder()
    await hub.subscribe(channel, r1)
    await hub.subscribe(channel, r2)
    hub.unsubscribe(channel, r1)
    hub.unsubscribe(channel, r1)  # twice: no effect
    assert hub.listeners == 1
    await store.append(sid, "a", ["x"])
    await eventually(lambda: r2.texts() == ["x"])
    assert r1.texts() == []
    hub.unsubscribe(channel, r2)
    assert hub.listeners == 0
    await numsub_becomes(redis, channel, 0)
    # Subscribing again works (a fresh SUBSCRIBE, confirmed).
    r3 = Recorder()
    await hub.subscribe(channel, r3)
    await store.append(sid, "a", ["z"])
    await eventually(lambda: r3.texts() == ["z"])
    assert r2.texts() == ["x"]


async def test_resubscribe_while_unsubscribe_pending(hub: Hub, store: Store) -> None:
    """Unsubscribing the last listener and subscribing again before the hub's loop ran: the
    channel must stay subscribed."""
    sid = await running_stream(store)
    channel = store.keys.channel(sid)
    r1, r2 = Recorder(), Recorder()
    await hub.subscribe(channel, r1)
    hub.unsubscribe(channel, r1)
    await hub.subscribe(channel, r2)
    await asyncio.sleep(1.2)  # let the loop flush whatever it had queued
    await store.append(sid, "a", ["still here"])
    await eventually(lambda: r2.texts() == ["still here"])


async def test_hold_subscribes_ahead_of_the_listener(hub: Hub, store: Store, redis: Redis) -> None:
    """A connection holds its channel while it checks the request; its reader then subscribes
    without waiting for Redis, and is not counted as a reader before that."""
    sid = await running_stream(store)
    channel = store.keys.channel(sid)
    await hub.hold(channel)
    assert await numsub(redis, channel) == 1
    assert hub.listeners == 0 and channel not in hub._listeners
    await hub.hold(channel)  # a second connection to the same stream
    rec = Recorder()
    subscribed = asyncio.ensure_future(hub.subscribe(channel, rec))
    await asyncio.sleep(0)
    assert subscribed.done()  # confirmed already: no round trip
    hub.release(channel)
    hub.release(channel)
    await store.append(sid, "a", ["x"])
    await eventually(lambda: rec.texts() == ["x"])
    # The listener keeps the channel after every hold is released; the last one out unsubscribes.
    await asyncio.sleep(1.2)  # the hub's loop flushes unsubscribes when it wakes
    assert await numsub(redis, channel) == 1
    hub.unsubscribe(channel, rec)
    await numsub_becomes(redis, channel, 0)


async def test_a_released_hold_with_no_listener_unsubscribes(hub: Hub, store: Store, redis: Redis) -> None:
    sid = await running_stream(store)
    channel = store.keys.channel(sid)
    await hub.hold(channel)
    hub.release(channel)
    await numsub_becomes(redis, channel, 0)
    # A held channel is subscribed again after the hub reconnects.
    await hub.hold(channel)
    before = hub.reconnects
    await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    await eventually(lambda: hub.reconnects > before, what="no reconnect after the kill")
    await numsub_becomes(redis, channel, 1)
    hub.release(channel)
    await numsub_becomes(redis, channel, 0)


async def test_malformed_announcement_is_skipped(hub: Hub, store: Store, redis: Redis) -> None:
    """Regression: an announcement whose field list has an odd length raised IndexError in
    parse_announcement, which the hub did not catch as malformed: it dropped its connection and
    every reader of the process resynced. Fix: parse_announcement raises ValueError only."""
    sid = await running_stream(store)
    channel = store.keys.channel(sid)
    rec = Recorder()
    await hub.subscribe(channel, rec)
    for bad in (b'{"s":"a","p":"0-0","e":[["1-0",["type"]]]}', b"not json", b'{"s":"z","p":"0-0","e":[]}', b"[]"):
        await redis.publish(channel, bad)
    await store.append(sid, "a", ["ok"])
    await eventually(lambda: rec.texts() == ["ok"])
    assert rec.resyncs == 0
    assert hub.connected.is_set()


async def test_a_large_read_is_parsed_whole_and_in_order(hub: Hub, store: Store, redis_server: RedisServer) -> None:
    """The hub feeds its parser a read in FEED_BYTES slices (hiredis is quadratic on one large
    feed): messages that straddle a slice's end are still parsed once each, in order."""
    sid = await running_stream(store)
    channel = store.keys.channel(sid)
    rec = Recorder()
    await hub.subscribe(channel, rec)
    sizes: list[int] = []
    read = hub._read

    async def recording(conn: Any) -> bytes:
        data = await read(conn)
        sizes.append(len(data))
        return data

    hub._read = recording  # type: ignore[method-assign]
    n = 5_000
    # A blocking client blocks this loop while it publishes: the hub cannot read until it is done,
    # so the messages reach it in a few large reads.
    with SyncRedis.from_url(redis_server.url) as sync, sync.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.publish(channel, orjson.dumps({"s": "a", "p": f"{i}-0", "e": [[f"{i + 1}-0", ["type", "delta", "text", f"t{i} é"]]]}))
        pipe.execute()
    await eventually(lambda: len(rec.announcements) == n, what=f"{len(rec.announcements)} of {n} announcements")
    assert rec.texts() == [f"t{i} é" for i in range(n)]
    assert max(sizes) > 4 * FEED_BYTES, sizes  # the slicing was exercised
    assert hub.connected.is_set() and rec.resyncs == 0


async def test_reconnect_after_client_kill(hub: Hub, store: Store, redis: Redis) -> None:
    sid = await running_stream(store)
    channel = store.keys.channel(sid)
    rec = Recorder()
    await hub.subscribe(channel, rec)
    await store.append(sid, "a", ["before"])
    await eventually(lambda: rec.texts() == ["before"])

    killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    assert int(killed) >= 1
    # The hub notices, reconnects, resubscribes, and tells every listener to catch up.
    await eventually(lambda: rec.resyncs >= 1, what="no resync after the kill")
    await asyncio.wait_for(hub.connected.wait(), 5.0)
    await numsub_becomes(redis, channel, 1)
    await store.append(sid, "a", ["after"])
    await eventually(lambda: rec.texts()[-1:] == ["after"])
    # A new subscriber on the reconnected hub works too.
    rec2 = Recorder()
    await hub.subscribe(store.keys.channel(sid), rec2)
    await store.append(sid, "a", ["again"])
    await eventually(lambda: rec2.texts() == ["again"])


async def test_start_returns_connected(redis_server: RedisServer, prefix: str) -> None:
    """A process serves once its start-up is done: its first readers must find the hub connected
    (not a 503 because its connection was still being made)."""
    h = Hub(Redis.from_url(redis_server.url), f"{prefix}:hub")
    await h.start()
    try:
        assert h.connected.is_set()
        await h.subscribe(f"{prefix}:first", Recorder())  # no wait, no error
    finally:
        await h.stop()


async def test_subscribe_when_redis_is_down(prefix: str) -> None:
    port = free_port()  # nothing listens here
    h = Hub(Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.5), f"{prefix}:hub")
    await h.start()
    try:
        await asyncio.sleep(0.2)
        assert not h.connected.is_set()
        with pytest.raises(RedisConnectionError):
            await h.subscribe("some:channel", Recorder())
        assert h.listeners == 0  # a failed subscribe leaves nothing behind
        with pytest.raises(RedisConnectionError):
            await h.hold("some:channel")
        assert h._held == {}
    finally:
        await h.stop()


async def test_stop_is_clean(redis_server: RedisServer, prefix: str, redis: Redis) -> None:
    h = Hub(Redis.from_url(redis_server.url), f"{prefix}:hub")
    await h.start()
    await asyncio.wait_for(h.connected.wait(), 5.0)
    await h.subscribe(f"{prefix}:x", Recorder())
    assert await numsub(redis, f"{prefix}:x") == 1
    await h.stop()
    await numsub_becomes(redis, f"{prefix}:x", 0)
