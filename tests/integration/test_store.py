"""shared/store.py on a real redis-server: the Lua scripts' writes, states, TTLs and announcements."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from arq.constants import job_key_prefix, retry_key_prefix
from hiredis import pack_command
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.cursor import entry_key
from shared.events import Announcement, done_fields, error_fields, parse_announcement
from shared.keys import Source
from shared.redis_server import RedisServer
from shared.settings import Settings
from shared.store import APPENDED_TTL_S, Store, token_matches

PACING = {"slow_interval_ms": 250, "b_interval_ms": 0}


async def new_stream(store: Store, prompt: str = "hello") -> str:
    created = await store.create(
        prompt=prompt,
        tasks={"a": ("simulated", {"tokens": 3}), "b": ("simulated", {"text": "B text"})},
        pacing=PACING,
    )
    return created.id


async def running_stream(store: Store, a: str = "w1", b: str = "w2") -> str:
    """A stream whose A runs on worker `a` and B on worker `b`."""
    sid = await new_stream(store)
    assert await store.start(sid, "a", a) == "queued"
    assert await store.start(sid, "b", b) == "queued"
    return sid


async def last_id(store: Store, sid: str, src: Source) -> bytes:
    """As appends answer it."""
    rows = await entries(store, sid, src)
    return (rows[-1][0] if rows else "0-0").encode()


def with_settings(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update=update)


async def entries(store: Store, sid: str, src: Source) -> list[tuple[str, dict[str, str]]]:
    return await store.read(sid, src, "0-0", 10_000)


class Announcements:
    """Every announcement on one stream's channel, in order."""

    def __init__(self, ps: PubSub) -> None:
        self.ps = ps

    async def take(self, n: int, within: float = 3.0) -> list[Announcement]:
        out: list[Announcement] = []
        async with asyncio.timeout(within):
            while len(out) < n:
                msg = await self.ps.get_message(ignore_subscribe_messages=True, timeout=0.5)
                if msg is not None and msg["type"] == "message":
                    out.append(parse_announcement(msg["data"]))
        return out

    async def none_pending(self) -> bool:
        return await self.ps.get_message(ignore_subscribe_messages=True, timeout=0.2) is None


@pytest.fixture
async def listen(redis: Redis, store: Store) -> AsyncIterator[Any]:
    pubsubs: list[PubSub] = []

    async def subscribe(sid: str) -> Announcements:
        ps = redis.pubsub()
        await ps.subscribe(store.keys.channel(sid))
        msg = await ps.get_message(timeout=2.0)
        assert msg is not None and msg["type"] == "subscribe"
        pubsubs.append(ps)
        return Announcements(ps)

    yield subscribe
    for ps in pubsubs:
        await ps.aclose()  # type: ignore[no-untyped-call]


# -- create / start ----------------------------------------------------------------------------


async def test_create_writes_meta(store: Store, redis: Redis) -> None:
    created = await store.create(
        prompt="Explain é",
        tasks={"a": ("simulated", {"tokens": 3}), "b": ("other", {"x": [1, 2]})},
        pacing=PACING,
    )
    meta = await store.meta(created.id)
    assert meta is not None
    assert meta["id"] == created.id
    assert meta["status"] == "queued"
    assert meta["prompt"] == "Explain é"
    assert orjson.loads(meta["pacing"]) == PACING
    assert meta["a_task"] == "simulated" and orjson.loads(meta["a_options"]) == {"tokens": 3}
    assert meta["b_task"] == "other" and orjson.loads(meta["b_options"]) == {"x": [1, 2]}
    for src in "ab":
        assert meta[f"{src}_state"] == "queued"
        assert meta[f"{src}_tokens"] == meta[f"{src}_events"] == "0"
        assert meta[f"{src}_last"] == "0-0"
    # The token itself is never stored, only its digest.
    assert created.token not in meta.values()
    assert token_matches(meta, created.token)
    assert not token_matches(meta, created.token + "x")
    assert not token_matches({}, created.token)
    # Unfinished streams expire too: max_stream_s + retention_s.
    s = store.settings
    pttl = await redis.pttl(store.keys.meta(created.id))
    assert (s.max_stream_s + s.retention_s) * 1000 - 5000 < pttl <= (s.max_stream_s + s.retention_s) * 1000
    assert await redis.zscore(store.keys.index, created.id) is not None


async def test_ids_and_tokens_are_unique(store: Store) -> None:
    made = [await store.create(prompt="p", tasks={"a": ("s", {}), "b": ("s", {})}, pacing={}) for _ in range(20)]
    assert len({c.id for c in made}) == 20
    assert len({c.token for c in made}) == 20
    assert all(len(c.id) >= 20 and len(c.token) >= 40 for c in made)


async def test_start_claims_once(store: Store, redis: Redis) -> None:
    sid = await new_stream(store)
    assert await store.start(sid, "a", "w1") == "queued"
    assert await store.start(sid, "a", "w2") == "running"  # a second claim sees it taken
    meta = await store.meta(sid)
    assert meta is not None
    assert meta["a_state"] == "running" and meta["a_worker"] == "w1" and meta["status"] == "running"
    assert meta["b_state"] == "queued"
    assert int(meta["a_started_ms"]) > 0
    assert await redis.zscore(store.keys.running, f"{sid}:a") is not None
    assert await store.start("no-such-stream", "a", "w1") is None


async def test_a_claim_reads_the_meta_only_when_it_is_ours(store: Store) -> None:
    # The worker takes the task's name and options from the claim's reply (no second round trip).
    sid = await new_stream(store)
    before, meta = await store.start_source(sid, "a", "w1")
    assert before == "queued"
    assert meta == await store.meta(sid)
    assert meta["a_state"] == "running" and meta["a_worker"] == "w1" and meta["a_task"] == "simulated"
    # The same worker's claim again (its first reply was lost): still ours, with the meta.
    assert await store.start_source(sid, "a", "w1") == ("queued", meta)
    # Someone else's claim, a terminal source, a stream that is gone: no meta.
    assert await store.start_source(sid, "a", "w2") == ("running", {})
    await store.finish(sid, ["b"], error_fields("cancelled", "x"))
    assert await store.start_source(sid, "b", "w1") == ("cancelled", {})
    assert await store.start_source("no-such-stream", "a", "w1") == (None, {})


async def test_claim_takes_the_job_out_of_arqs_queue(store: Store, redis: Redis) -> None:
    # arq leaves a running job in its queue, where every worker re-checks it on every poll; once
    # the source is claimed (and leased) the job leaves the queue, and its record lives no longer
    # than the stream.
    sid = await new_stream(store)
    queue = store.settings.queue_name
    jobs = {src: store.keys.job_id(sid, src) for src in ("a", "b")}
    for job_id in jobs.values():
        await redis.zadd(queue, {job_id: 1})
        await redis.psetex(job_key_prefix + job_id, 86_400_000, b"{}")
        await redis.psetex(retry_key_prefix + job_id, 86_400_000, b"1")
    assert await store.start(sid, "a", "w1") == "queued"
    assert await redis.zscore(queue, jobs["a"]) is None
    assert await redis.zscore(queue, jobs["b"]) == 1  # not claimed yet: still arq's to run
    meta_ttl = await redis.pttl(store.keys.meta(sid))
    assert 0 < await redis.pttl(job_key_prefix + jobs["a"]) <= meta_ttl + 1  # (PTTLs of keys set in the same ms may differ by 1)
    assert 0 < await redis.pttl(retry_key_prefix + jobs["a"]) <= meta_ttl + 1
    assert await redis.pttl(job_key_prefix + jobs["b"]) > meta_ttl
    # A claim that fails (taken, or terminal) leaves arq's queue alone.
    await redis.zadd(queue, {jobs["a"]: 2})
    assert await store.start(sid, "a", "w2") == "running"
    assert await redis.zscore(queue, jobs["a"]) == 2


# -- append ------------------------------------------------------------------------------------


async def test_append_and_read(store: Store, redis: Redis) -> None:
    sid = await running_stream(store)
    assert await store.append(sid, "a", ["one ", "two\n", ""]) == 3
    assert await store.append(sid, "a", ["😀 \"x\" \\"]) == 1
    rows = await entries(store, sid, "a")
    assert [f for _, f in rows] == [
        {"type": "delta", "text": "one "},
        {"type": "delta", "text": "two\n"},
        {"type": "delta", "text": ""},
        {"type": "delta", "text": '😀 "x" \\'},
    ]
    assert await store.text(sid, "a") == 'one two\n😀 "x" \\'
    meta = await store.meta(sid)
    assert meta is not None
    status = await store.status(sid, meta)
    assert status["a"]["tokens"] == 4 and status["a"]["state"] == "running"  # counted from the stream while it runs
    # Exclusive reads after any id.
    assert await store.read(sid, "a", rows[1][0], 10) == rows[2:]
    assert await store.read(sid, "a", rows[-1][0], 10) == []
    assert await store.read(sid, "a", "0-0", 2) == rows[:2]
    # The events stream gets the meta's TTL at its first append.
    pttl_meta = await redis.pttl(store.keys.meta(sid))
    pttl_a = await redis.pttl(store.keys.events(sid, "a"))
    assert 0 < pttl_a <= pttl_meta + 10 and pttl_meta - pttl_a < 5000
    # The meta's counts are written when the source ends.
    assert await store.finish(sid, ["a"], done_fields(4)) == 1
    meta = await store.meta(sid)
    rows = await entries(store, sid, "a")
    assert meta is not None and meta["a_tokens"] == "4" and meta["a_events"] == "5" and meta["a_last"] == rows[-1][0]


async def test_reads_are_the_same_with_or_without_the_mux(store: Store, redis: Redis) -> None:
    assert store.mux is not None
    plain = Store(redis, store.settings)
    sid = await running_stream(store)
    assert await store.append(sid, "a", ["one ", "two"]) == 2
    await store.finish(sid, ["b"], done_fields(0))
    for s in (store, plain):
        assert await s.meta(sid) == await plain.meta(sid)
        assert await s.meta("no-such-stream") is None
        rows = await s.read(sid, "a", "0-0", 10)
        assert rows == await plain.read(sid, "a", "0-0", 10) and len(rows) == 2
        assert await s.read(sid, "a", rows[0][0], 10) == rows[1:]
        # (Ids are per source: B's one entry may have A's second's id, when the writes straddle a
        # millisecond; B has nothing after its own.)
        (b_last,) = [eid for eid, _ in await s.read(sid, "b", "0-0", 10)]
        ms, seq = entry_key(b_last)
        b_after = f"{ms}-{seq + 1}"
        assert await s.has_entry(sid, "a", rows[1][0]) and await s.has_entry(sid, "b", b_last)
        assert not await s.has_entry(sid, "b", b_after) and not await s.has_entry(sid, "a", "1-0")
        assert await s.source_state(sid, "b") == "done" and await s.source_state("no-such-stream", "a") is None
        # The `_soon` reads, started together and awaited in turn.
        soon = [s.meta_soon(sid), s.has_entry_soon(sid, "a", rows[0][0]), s.source_state_soon(sid, "a"), s.meta_soon("nope")]
        assert [await x for x in soon] == [await plain.meta(sid), True, "running", None]
        await s.ping()
        created = await new_stream(s)  # a create is one MULTI/EXEC either way
        assert (await plain.meta(created) or {}).get("status") == "queued"
        assert await redis.zscore(s.keys.index, created) is not None


async def test_append_many_in_one_round_trip(store: Store, redis: Redis) -> None:
    s1, s2, queued = await running_stream(store, b="w1"), await running_stream(store, b="w1"), await new_stream(store)
    out, count = await store.append_many([
        (s1, "a", ["a1 ", "a2"], 0, "0-0"), (s2, "b", ["b1"], 0, "0-0"), (queued, "a", ["x"], 0, "0-0"), (s1, "b", ["é\n"], 0, "0-0"),
    ], worker="w1", written=0)  # fmt: skip
    assert out == [await last_id(store, s1, "a"), await last_id(store, s2, "b"), -1, await last_id(store, s1, "b")]
    assert count == 4 and await redis.get(store.keys.appended("w1")) == b"4"
    assert 0 < await redis.pttl(store.keys.appended("w1")) <= APPENDED_TTL_S * 1000
    assert await store.text(s1, "a") == "a1 a2" and await store.text(s2, "b") == "b1" and await store.text(s1, "b") == "é\n"
    # Retried with the same count (its reply was lost): nothing is written twice, and the answer is the same.
    again, count = await store.append_many([(s1, "a", ["a1 ", "a2"], 0, "0-0")], worker="w1", written=0)
    assert again == out[:1] and count == 2 and await store.text(s1, "a") == "a1 a2"
    # Only the lease's holder appends: to another worker's source, the write is refused (and ends it).
    refused, count = await store.append_many([(s1, "a", ["not mine"], 2, out[0])], worker="w2", written=0)
    assert refused == [-1] and count == 0
    meta = await store.meta(s1)
    assert meta is not None and meta["a_state"] == "failed" and "lost its lease" in meta["a_error"]
    # One call's error is that call's result; the others in the batch still run.
    await redis.delete(store.keys.events(s2, "a"))
    await redis.set(store.keys.events(s2, "a"), "not a stream")
    out, count = await store.append_many([(s2, "a", ["x"], 0, "0-0"), (s1, "b", ["b2"], 1, out[3])], worker="w1", written=2)
    assert isinstance(out[0], ResponseError) and out[1] == await last_id(store, s1, "b") and count == 3
    assert await store.text(s1, "b") == "é\nb2"
    assert await redis.ping()  # the pooled connection is in step after the error


async def test_append_many_after_redis_forgot_the_script(store: Store, redis: Redis) -> None:
    sid = await running_stream(store, b="w1")
    await redis.script_flush()
    out, count = await store.append_many([(sid, "a", ["x"], 0, "0-0"), (sid, "b", ["y"], 0, "0-0")], worker="w1", written=0)
    assert all(isinstance(r, bytes) for r in out) and count == 2
    assert await store.text(sid, "a") == "x" and await store.text(sid, "b") == "y"


def test_packed_appends_are_what_pack_command_writes(store: Store) -> None:
    calls = [("s1", "a", ["x"], 0, "0-0"), ("s1", "a", ["é\n", "", "two words"], 7, "17-3"), ("s-2", "b", ["y"], 12, "9-0")]
    k = store.keys
    for batch, written in ((calls[:1], 0), (calls, 40), (calls, None)):
        keys = [k.appended("w1"), *(x for sid, src, *_ in batch for x in (k.lease(sid, src), k.events(sid, src), k.meta(sid)))]  # type: ignore[arg-type]
        argv = [x for sid, src, texts, exp, prev in batch for x in (k.channel(sid), src, prev, exp, len(texts), *texts)]
        head = ["w1", "" if written is None else written, APPENDED_TTL_S * 1000]
        want = pack_command(("EVALSHA", store._append.sha, len(keys), *keys, *head, *argv))
        assert store._packed_appends(batch, "w1", written) == want  # type: ignore[arg-type]


async def test_append_many_reads_every_reply_of_a_large_batch(store: Store) -> None:
    sids = [await running_stream(store) for _ in range(40)]
    calls = [(sid, "a", [f"{i}-{j} " for j in range(50)], 0, "0-0") for i, sid in enumerate(sids)]
    out, count = await store.append_many(calls, worker="w1", written=0)  # type: ignore[arg-type]
    assert out == [await last_id(store, sid, "a") for sid in sids] and count == 2000
    # 40 x 50 texts again with the same count: found in the streams, nothing written twice
    more = (sids[0], "a", ["more"], 50, out[0])
    again, count = await store.append_many([*calls, more], worker="w1", written=0)  # type: ignore[arg-type, list-item]
    assert again[:40] == out and again[40] == await last_id(store, sids[0], "a") and count == 2001
    assert await store.text(sids[0], "a") == "".join(f"0-{j} " for j in range(50)) + "more"


async def test_append_many_for_more_sources_than_lua_can_unpack(store: Store) -> None:
    """One write may carry every running source of a worker (TANDEM_WORKER_MAX_JOBS has no upper
    bound; the bench runs 10,000 sources on one worker). Redis's Lua unpacks at most 8,000 values
    at once: the script's lease check must not unpack one per source."""
    sids = await asyncio.gather(*(running_stream(store, b="w1") for _ in range(4_100)))
    calls = [(sid, src, [f"{src}{i}"], 0, "0-0") for i, sid in enumerate(sids) for src in ("a", "b")]
    out, count = await store.append_many(calls, worker="w1", written=0)  # type: ignore[arg-type]
    assert count == 8_200 and all(type(r) is bytes for r in out), {repr(r) for r in out if type(r) is not bytes}
    assert await store.text(sids[-1], "b") == "b4099"


async def test_append_many_times_out_when_redis_does_not_answer(redis_server: RedisServer, settings: Settings, redis: Redis) -> None:
    slow = Redis.from_url(redis_server.url, socket_timeout=0.3)
    store = Store(slow, settings)
    try:
        sid = await running_stream(store)
        await redis.execute_command("CLIENT", "PAUSE", 1500, "WRITE")  # scripts that write wait
        with pytest.raises(RedisTimeoutError):
            await store.append_many([(sid, "a", ["x"], 0, "0-0")], worker="w1", written=0)
        await asyncio.sleep(1.5)
        # The connection that timed out was dropped (its late reply would answer the next call);
        # the retry with the same count writes nothing twice.
        out, count = await store.append_many([(sid, "a", ["x", "y"], 0, "0-0")], worker="w1", written=0)
        assert out == [await last_id(store, sid, "a")] and count == 2
        assert await store.text(sid, "a") == "xy"
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
        await slow.aclose()


async def test_append_many_on_a_connection_of_its_own(store: Store, redis: Redis) -> None:
    """A worker's append pipe writes on a connection outside the pool; after Redis dropped it, the
    write raises and the retry connects again."""
    sid = await running_stream(store)
    conn = store.connection()
    try:
        out, count = await store.append_many([(sid, "a", ["x"], 0, "0-0")], worker="w1", written=0, conn=conn)
        assert isinstance(out[0], bytes) and count == 1
        await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        call = (sid, "a", ["y"], 1, out[0])
        with pytest.raises(RedisConnectionError):
            await store.append_many([call], worker="w1", written=count, conn=conn)
        again, count = await store.append_many([call], worker="w1", written=count, conn=conn)
        assert isinstance(again[0], bytes) and count == 2 and await store.text(sid, "a") == "xy"
    finally:
        await conn.disconnect()


async def test_append_to_a_queued_or_unknown_source_is_refused(store: Store) -> None:
    sid = await new_stream(store)
    assert await store.append(sid, "a", ["x"]) == -1
    assert await store.append("no-such-stream", "a", ["x"]) == -1
    assert await entries(store, sid, "a") == []


async def test_text_reads_in_batches(store: Store) -> None:
    sid = await running_stream(store)
    texts = [f"{i} " for i in range(2500)]
    for i in range(0, len(texts), 500):
        assert await store.append(sid, "b", texts[i : i + 500]) == 500
    assert await store.text(sid, "b") == "".join(texts)


async def test_append_after_terminal_returns_minus_one(store: Store) -> None:
    sid = await running_stream(store)
    assert await store.append(sid, "a", ["x"]) == 1
    assert await store.finish(sid, ["a"], done_fields(1)) == 1
    assert await store.append(sid, "a", ["late"]) == -1
    rows = await entries(store, sid, "a")
    assert [f["type"] for _, f in rows] == ["delta", "done"]
    assert await store.finish(sid, ["a"], error_fields("worker_lost", "x")) == 0  # one terminal only
    assert len(await entries(store, sid, "a")) == 2


# -- finish / settle ---------------------------------------------------------------------------


async def test_finish_one_source_then_settle(store: Store, redis: Redis) -> None:
    settings = with_settings(store.settings, retention_s=120, max_stream_s=1000)
    store = Store(redis, settings)
    sid = await running_stream(store)
    assert await store.append(sid, "a", ["a1 ", "a2"]) == 2
    assert await store.finish(sid, ["a"], done_fields(2, {"finish_reason": "stop"})) == 1
    meta = await store.meta(sid)
    assert meta is not None
    assert meta["a_state"] == "done" and meta["status"] == "running"
    rows = await entries(store, sid, "a")
    assert rows[-1][1] == {"type": "done", "tokens": "2", "extra": '{"finish_reason":"stop"}'}
    assert meta["a_last"] == rows[-1][0] and meta["a_events"] == "3" and meta["a_tokens"] == "2"
    assert "a_error" not in meta
    # Not settled yet: the stream keeps its long TTL.
    assert await redis.pttl(store.keys.meta(sid)) > 1_000_000

    assert await store.finish(sid, ["b"], error_fields("task_failed", "boom \"x\"")) == 1
    meta = await store.meta(sid)
    assert meta is not None
    assert meta["b_state"] == "failed" and meta["status"] == "failed"
    assert orjson.loads(meta["b_error"]) == {"code": "task_failed", "message": 'boom "x"'}
    assert int(meta["finished_ms"]) >= int(meta["created_ms"])
    # Settled: every key of the stream expires after the retention, together.
    for key in store.keys.stream_keys(sid):
        assert await redis.exists(key), key
        pttl = await redis.pttl(key)
        assert 120_000 - 5000 < pttl <= 120_000, (key, pttl)
    assert await redis.zscore(store.keys.running, f"{sid}:a") is None
    assert await redis.zscore(store.keys.running, f"{sid}:b") is None

    doc = await store.status(sid, meta)
    assert doc["status"] == "failed"
    assert doc["a"] == {"task": "simulated", "state": "done", "tokens": 2, "text": "a1 a2", "error": None}
    assert doc["b"]["error"] == {"code": "task_failed", "message": 'boom "x"'}
    assert doc["b"]["text"] == ""
    assert doc["pacing"] == PACING
    assert doc["created_at"].endswith("Z")


@pytest.mark.parametrize(
    ("a_fields", "b_fields", "status"),
    [
        (done_fields(0), done_fields(0), "completed"),
        (done_fields(0), error_fields("task_failed", "m"), "failed"),
        (error_fields("worker_lost", "m"), done_fields(0), "failed"),
        (error_fields("cancelled", "m"), done_fields(0), "cancelled"),
        (error_fields("task_failed", "m"), error_fields("cancelled", "m"), "cancelled"),
    ],
)
async def test_final_status(store: Store, a_fields: list[str], b_fields: list[str], status: str) -> None:
    sid = await running_stream(store)
    await store.finish(sid, ["a"], a_fields)
    await store.finish(sid, ["b"], b_fields)
    meta = await store.meta(sid)
    assert meta is not None and meta["status"] == status


async def test_terminal_entry_and_state_are_visible_together(store: Store, redis: Redis) -> None:
    """A reader that sees the source's terminal state also sees its terminal entry, and never the
    other way round: both are written by one script."""
    sid = await running_stream(store)
    k = store.keys
    stop = asyncio.Event()
    seen: list[tuple[str, str]] = []

    async def reader() -> None:
        while not stop.is_set():
            async with redis.pipeline(transaction=True) as tx:
                tx.hget(k.meta(sid), "a_state")
                tx.xrevrange(k.events(sid, "a"), count=1)
                state, last = await tx.execute()
            last_type = last[0][1][b"type"].decode() if last else "none"
            seen.append((state.decode(), last_type))

    async def writer() -> None:
        for i in range(30):
            await store.append(sid, "a", [f"{i} "])
        await store.finish(sid, ["a"], done_fields(30))
        await asyncio.sleep(0.02)
        stop.set()

    await asyncio.gather(reader(), reader(), writer())
    assert ("done", "done") in seen
    for state, last_type in seen:
        assert (state == "done") == (last_type == "done"), (state, last_type)


# -- limits ------------------------------------------------------------------------------------


async def test_too_long_at_max_source_events(store: Store, redis: Redis) -> None:
    store = Store(redis, with_settings(store.settings, max_source_events=5))
    sid = await running_stream(store)
    assert await store.append(sid, "a", ["1", "2", "3"]) == 3
    # Room for one more delta: the last of the 5 entries is the terminal `too_long` error.
    assert await store.append(sid, "a", ["4", "5", "6"]) == -1
    rows = await entries(store, sid, "a")
    assert len(rows) == 5
    assert [f.get("text") for _, f in rows[:4]] == ["1", "2", "3", "4"]
    last = rows[-1][1]
    assert last["type"] == "error" and last["code"] == "too_long"
    assert "5 events" in last["message"] and "TANDEM_MAX_SOURCE_EVENTS" in last["message"]
    meta = await store.meta(sid)
    assert meta is not None
    assert meta["a_state"] == "failed" and meta["a_events"] == "5" and meta["a_tokens"] == "4"
    assert meta["a_last"] == rows[-1][0]
    assert orjson.loads(meta["a_error"])["code"] == "too_long"
    assert meta["status"] == "running"  # B still runs
    assert await store.append(sid, "a", ["more"]) == -1
    assert len(await entries(store, sid, "a")) == 5
    # B too: and then the stream settles as failed.
    assert await store.append(sid, "b", ["x"] * 4) == 4
    assert await store.append(sid, "b", ["y"]) == -1
    meta = await store.meta(sid)
    assert meta is not None and meta["b_state"] == "failed" and meta["status"] == "failed"
    assert 0 < await redis.pttl(store.keys.meta(sid)) <= store.settings.retention_s * 1000


async def test_too_long_when_the_retried_write_had_reached_the_limit(store: Store, redis: Redis) -> None:
    """A write that reached the limit, whose reply (and so the `too_long` that follows it) was lost
    to a dropped connection: its retry ends the source with `too_long`, not as a gap."""
    store = Store(redis, with_settings(store.settings, max_source_events=5))
    sid = await running_stream(store)
    out, count = await store.append_many([(sid, "a", ["1", "2", "3"], 0, "0-0")], worker="w1", written=0)
    k = store.keys
    first_attempt = ["w1", count, 60_000, k.channel(sid), "a", out[0], 3, 1, "4"]  # what fits of ["4", "5", "6"]
    keys = [k.appended("w1"), k.lease(sid, "a"), k.events(sid, "a"), k.meta(sid)]
    assert (await store._append(keys=keys, args=first_attempt))[1] == 4  # one more fitted; not ended yet
    retried, _ = await store.append_many([(sid, "a", ["4", "5", "6"], 3, out[0])], worker="w1", written=count)
    assert retried == [-1]
    rows = await entries(store, sid, "a")
    assert [f.get("text", f.get("code")) for _, f in rows] == ["1", "2", "3", "4", "too_long"]


async def test_too_long_when_exactly_full(store: Store, redis: Redis) -> None:
    store = Store(redis, with_settings(store.settings, max_source_events=5))
    sid = await running_stream(store)
    assert await store.append(sid, "b", ["1", "2", "3", "4"]) == 4  # fits exactly: no error yet
    meta = await store.meta(sid)
    assert meta is not None and meta["b_state"] == "running"
    # The done entry is the 5th and last one allowed.
    assert await store.finish(sid, ["b"], done_fields(4)) == 1
    rows = await entries(store, sid, "b")
    assert len(rows) == 5 and rows[-1][1]["type"] == "done"


async def test_too_long_with_an_empty_batch_room(store: Store, redis: Redis) -> None:
    store = Store(redis, with_settings(store.settings, max_source_events=2))
    sid = await running_stream(store)
    assert await store.append(sid, "a", ["1"]) == 1
    assert await store.append(sid, "a", ["2"]) == -1
    rows = await entries(store, sid, "a")
    assert [f["type"] for _, f in rows] == ["delta", "error"]


# -- cancel ------------------------------------------------------------------------------------


async def test_cancel_writes_to_non_terminal_sources_only(store: Store, redis: Redis) -> None:
    sid = await running_stream(store)
    await store.append(sid, "a", ["a "])
    await store.finish(sid, ["a"], done_fields(1))
    await store.append(sid, "b", ["b "])
    assert await store.cancel(sid) == 1  # only B
    a_rows, b_rows = await entries(store, sid, "a"), await entries(store, sid, "b")
    assert [f["type"] for _, f in a_rows] == ["delta", "done"]
    assert b_rows[-1][1] == {"type": "error", "code": "cancelled", "message": "cancelled by request"}
    meta = await store.meta(sid)
    assert meta is not None
    assert (meta["a_state"], meta["b_state"], meta["status"]) == ("done", "cancelled", "cancelled")
    assert orjson.loads(meta["b_error"])["code"] == "cancelled"
    assert await store.cancel(sid) == 0  # nothing left to cancel
    assert len(await entries(store, sid, "b")) == 2
    assert await store.append(sid, "b", ["late"]) == -1


async def test_cancel_queued_stream(store: Store, redis: Redis) -> None:
    sid = await new_stream(store)
    assert await store.cancel(sid) == 2
    meta = await store.meta(sid)
    assert meta is not None
    assert (meta["a_state"], meta["b_state"], meta["status"]) == ("cancelled", "cancelled", "cancelled")
    for src in ("a", "b"):
        rows = await entries(store, sid, src)
        assert len(rows) == 1 and rows[0][1]["code"] == "cancelled"
    # A worker that picks the job up later sees it is over.
    assert await store.start(sid, "a", "w") == "cancelled"
    for key in store.keys.stream_keys(sid):
        assert 0 < await redis.pttl(key) <= store.settings.retention_s * 1000


async def test_cancel_unknown_stream(store: Store) -> None:
    assert await store.cancel("no-such-stream") == 0


async def test_delete(store: Store, redis: Redis) -> None:
    sid = await running_stream(store)
    await store.append(sid, "a", ["x"])
    await store.delete(sid)
    assert await store.meta(sid) is None
    assert await redis.exists(*store.keys.stream_keys(sid)) == 0
    assert await redis.zscore(store.keys.index, sid) is None


# -- announcements -----------------------------------------------------------------------------


async def test_announcements_chain(store: Store, listen: Any) -> None:
    sid = await running_stream(store)
    ann: Announcements = await listen(sid)
    await store.append(sid, "a", ["a1", "a2"])
    await store.append(sid, "b", ["b1"])
    await store.append(sid, "a", ["a3"])
    await store.finish(sid, ["a"], done_fields(3))
    await store.append(sid, "b", ["b2", "b3", "b4"])
    await store.cancel(sid)  # B only
    got = await ann.take(6)
    assert await ann.none_pending()
    assert [(x.source, len(x.entries)) for x in got] == [("a", 2), ("b", 1), ("a", 1), ("a", 1), ("b", 3), ("b", 1)]
    for src in ("a", "b"):
        mine = [x for x in got if x.source == src]
        prev = "0-0"
        for x in mine:
            assert x.prev == prev
            prev = x.entries[-1][0]
        # What was announced is exactly what is stored, in the same shape as XRANGE returns it.
        announced = [e for x in mine for e in x.entries]
        assert announced == await entries(store, sid, src)
    assert got[3].entries[0][1] == {"type": "done", "tokens": "3"}
    assert got[5].entries[0][1]["code"] == "cancelled"


async def test_announcement_of_too_long(store: Store, redis: Redis, listen: Any) -> None:
    store = Store(redis, with_settings(store.settings, max_source_events=3))
    sid = await running_stream(store)
    ann: Announcements = await listen(sid)
    assert await store.append(sid, "a", ["1", "2", "3"]) == -1
    got = await ann.take(2)
    assert [len(x.entries) for x in got] == [2, 1]
    assert got[1].prev == got[0].entries[-1][0]
    assert got[1].entries[0][1]["code"] == "too_long"
    assert await ann.none_pending()


async def test_no_announcement_when_nothing_is_written(store: Store, listen: Any) -> None:
    sid = await running_stream(store)
    ann: Announcements = await listen(sid)
    await store.finish(sid, ["a"], done_fields(0))
    assert len(await ann.take(1)) == 1
    assert await store.append(sid, "a", ["x"]) == -1
    assert await store.finish(sid, ["a"], done_fields(0)) == 0
    assert await ann.none_pending()


async def test_announcement_payload_text_round_trip(store: Store, listen: Any) -> None:
    """cjson in the script must carry any text exactly: escapes, non-ASCII, control characters."""
    sid = await running_stream(store)
    ann: Announcements = await listen(sid)
    texts = ["a/b", "\\", '"', "\r\n", "\x00\x01\x1f", "é東😀", "\u2028", "", " " * 3, "[]{}"]
    assert await store.append(sid, "a", texts) == len(texts)
    (got,) = await ann.take(1)
    assert [f["text"] for _, f in got.entries] == texts


# -- everything is plain text ------------------------------------------------------------------


async def test_values_are_plain_strings_and_json(store: Store, redis: Redis) -> None:
    sid = await running_stream(store)
    await store.append(sid, "a", ["é ", "x"])
    await store.finish(sid, ["a"], done_fields(2, {"usage": {"total": 2}}))
    await store.finish(sid, ["b"], error_fields("task_failed", "m"))
    prefix = store.keys.prefix
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    assert keys
    json_fields = {"pacing", "a_options", "b_options", "a_error", "b_error", "extra"}
    checked = 0
    for raw_key in keys:
        key = raw_key.decode()
        kind = (await redis.type(key)).decode()
        values: list[tuple[str, bytes]] = []
        if kind == "hash":
            values = [(f.decode(), v) for f, v in (await redis.hgetall(key)).items()]  # type: ignore[misc]
        elif kind == "stream":
            for _, fields in await redis.xrange(key):
                values += [(f.decode(), v) for f, v in fields.items()]
        elif kind == "zset":
            values = [("member", m) for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "string":
            values = [("value", await redis.get(key))]
        for name, value in values:
            assert not value.startswith(b"\x80"), f"{key} {name} looks pickled"
            text = value.decode("utf-8")  # raises if it is not UTF-8
            if name in json_fields:
                orjson.loads(text)
            checked += 1
    assert checked > 20


# -- leases and lost writes ----------------------------------------------------------------------


async def test_renew_and_reap(store: Store, redis: Redis) -> None:
    sid = await running_stream(store)  # A held by w1, B by w2
    assert await store.renew(sid, "a", "w1") == 1
    assert 0 < await redis.pttl(store.keys.lease(sid, "a")) <= store.lease_ttl_ms
    assert await store.reap(sid, "a") == 0  # its lease is alive: only re-scored
    assert await store.renew(sid, "a", "intruder") == -1  # not this worker's lease: ended
    meta = await store.meta(sid)
    assert meta is not None and meta["a_state"] == "failed" and "lost its lease" in meta["a_error"]
    assert await store.renew(sid, "a", "w1") == 0 and await store.reap(sid, "a") == 0  # not running any more
    assert await redis.zscore(store.keys.running, f"{sid}:a") is None
    await redis.delete(store.keys.lease(sid, "b"))  # B's worker died
    assert await store.reap(sid, "b") == 1
    meta = await store.meta(sid)
    assert meta is not None and meta["b_state"] == "failed" and "no lease renewal" in meta["b_error"]
    assert meta["status"] == "failed" and not await redis.exists(store.keys.lease(sid, "a"), store.keys.lease(sid, "b"))
    rows = await store.read(sid, "b", "0-0", 10)
    assert [f["code"] for _, f in rows] == ["worker_lost"]


async def test_renewals_ride_with_appends_in_one_round_trip(store: Store, redis: Redis) -> None:
    sid, other = await running_stream(store), await running_stream(store)  # A held by w1, B by w2
    await redis.pexpire(store.keys.lease(sid, "a"), 100)
    out, count = await store.append_many([(sid, "a", ["x"], 0, "0-0")], [(sid, "a", "w1"), (other, "b", "w1")], worker="w1", written=0)
    assert out[1:] == [1, -1] and isinstance(out[0], bytes)  # the append; A's lease renewed; B of `other` is not w1's: ended
    assert await redis.pttl(store.keys.lease(sid, "a")) > 100
    meta = await store.meta(other)
    assert meta is not None and meta["b_state"] == "failed" and "lost its lease" in meta["b_error"]
    await redis.script_flush()  # and after Redis forgot both scripts
    again, _ = await store.append_many([(sid, "a", ["y"], 1, out[0])], [(sid, "a", "w1")], worker="w1", written=count)
    assert again[1] == 1 and isinstance(again[0], bytes)
    assert await store.text(sid, "a") == "xy"


async def test_an_append_whose_lease_expired_ends_the_source(store: Store, redis: Redis) -> None:
    """The worker stalled for longer than its lease: its next append ends the source, as the sweeper
    or the next renewal would have."""
    sid = await running_stream(store)
    await redis.delete(store.keys.lease(sid, "a"))
    out, _ = await store.append_many([(sid, "a", ["late"], 0, "0-0")], worker="w1", written=0)
    assert out == [-1]
    rows = await entries(store, sid, "a")
    assert [f.get("code") for _, f in rows] == ["worker_lost"]


async def test_append_that_finds_writes_missing_ends_the_source(store: Store, redis: Redis) -> None:
    """Redis restarted without the worker's latest writes (an AOF fsynced once a second): its count
    is behind what the worker knows, so the write is checked source by source; a source that lost
    entries readers may have had ends with `worker_lost`, one that lost none goes on."""
    sid, other = await running_stream(store), await running_stream(store)
    out, count = await store.append_many([(sid, "a", ["x", "y"], 0, "0-0"), (other, "a", ["o"], 0, "0-0")], worker="w1", written=0)
    assert count == 3
    # What a restart that lost the last write of `sid` (and its count) would leave.
    await redis.xdel(store.keys.events(sid, "a"), out[0])
    await redis.set(store.keys.appended("w1"), 1)
    prev = await last_id(store, sid, "a")
    out2, count = await store.append_many([(sid, "a", ["z"], 2, out[0]), (other, "a", ["p"], 1, out[1])], worker="w1", written=3)
    assert out2[0] == -1 and out2[1] == await last_id(store, other, "a") and count == 4
    rows = await store.read(sid, "a", "0-0", 10)
    assert rows[0][0].encode() == prev and [f.get("text", f.get("code")) for _, f in rows] == ["x", "worker_lost"]
    meta = await store.meta(sid)
    assert meta is not None and meta["a_state"] == "failed" and "Redis lost part" in meta["a_error"]
    assert await store.text(other, "a") == "op"
    # A count that expired (a worker idle for days) only makes the next write checked.
    await redis.delete(store.keys.appended("w1"))
    out3, count = await store.append_many([(other, "a", ["q"], 2, out2[1])], worker="w1", written=count)
    assert isinstance(out3[0], bytes) and count == 5 and await store.text(other, "a") == "opq"
