"""workers/pipe.py: one writer batches every source's tokens; writes start at most once per window."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from itertools import pairwise
from typing import Any, cast

import pytest

from shared.store import AppendCall, RenewCall, Store
from workers.appender import ADDED, BACKLOGGED
from workers.pipe import AppendPipe


class FakeConnection:
    async def disconnect(self) -> None:
        pass


class RecordingStore:
    """Stands in for Store.append_many: records each write (loop time, calls), accepts everything."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, list[AppendCall]]] = []
        self.renewed: list[list[RenewCall]] = []  # per write
        self.written: dict[tuple[str, str], list[str]] = {}
        self.renew_result = 1

    def connection(self) -> Any:
        return FakeConnection()

    async def append_many(
        self, calls: Sequence[AppendCall], renewals: Sequence[RenewCall] = (), *, worker: str, written: int | None = None, conn: Any = None
    ) -> tuple[list[bytes | int], int]:
        assert isinstance(conn, FakeConnection)  # the pipe writes on a connection of its own
        assert worker == "w1" and written == sum(len(v) for v in self.written.values())  # the pipe keeps the count
        self.writes.append((asyncio.get_running_loop().time(), list(calls)))
        self.renewed.append(list(renewals))
        await asyncio.sleep(0)  # a round trip: tokens added meanwhile wait for the next write
        for sid, src, texts, expected, prev in calls:
            got = self.written.setdefault((sid, src), [])
            assert expected == len(got)  # each batch carries how many went before it
            assert prev == (b"%d-0" % len(got) if got else "0-0")  # and the last entry id before it
            got.extend(texts)
        lasts: list[bytes | int] = [b"%d-0" % len(self.written[sid, src]) for sid, src, *_ in calls]
        return lasts + [self.renew_result] * len(renewals), sum(len(v) for v in self.written.values())


@asynccontextmanager
async def running(store: RecordingStore, window_s: float = 0.0) -> AsyncIterator[AppendPipe]:
    pipe = AppendPipe(cast(Store, store), "w1", window_s)
    pipe.start()
    try:
        yield pipe
    finally:
        await pipe.stop()


async def produce(pipe: AppendPipe, sources: int, tokens: int, every_s: float) -> None:
    appenders = [pipe.appender(f"s{i}", "a", 256) for i in range(sources)]
    for t in range(tokens):
        for ap in appenders:
            assert ap.add(f"{t} ")
        await asyncio.sleep(every_s)
    for ap in appenders:
        await ap.close()


async def test_writes_start_at_most_once_per_window_and_lose_nothing() -> None:
    store = RecordingStore()
    window = 0.05
    async with running(store, window) as pipe:
        await produce(pipe, sources=5, tokens=40, every_s=0.005)  # a token per source every 5 ms
    assert store.written == {(f"s{i}", "a"): [f"{t} " for t in range(40)] for i in range(5)}
    starts = [t for t, _ in store.writes]
    gaps = [b - a for a, b in pairwise(starts)]
    assert min(gaps) >= window - 0.002  # uvloop's clock has 1 ms resolution
    # ~0.2 s of tokens in 0.05 s windows: a handful of writes, each carrying many tokens
    assert len(store.writes) < 40 / 2
    assert max(len(texts) for _, calls in store.writes for _, _, texts, *_ in calls) > 1


async def test_the_first_write_after_a_quiet_spell_goes_out_at_once() -> None:
    store = RecordingStore()
    async with running(store, window_s=3600.0) as pipe:  # a window no test would wait out
        ap = pipe.appender("s", "a", 256)
        ap.add("hello ")
        await asyncio.wait_for(ap.close(), 10)
    assert store.written == {("s", "a"): ["hello "]}


async def test_without_a_window_tokens_added_during_a_write_go_in_the_next() -> None:
    store = RecordingStore()
    async with running(store) as pipe:
        await produce(pipe, sources=3, tokens=20, every_s=0)
    assert store.written == {(f"s{i}", "a"): [f"{t} " for t in range(20)] for i in range(3)}
    assert sum(len(texts) for _, calls in store.writes for _, _, texts, *_ in calls) == 60


async def test_lease_renewals_ride_along_with_the_appends() -> None:
    store = RecordingStore()
    async with running(store, window_s=0.05) as pipe:
        ap = pipe.appender("s", "a", 256)
        ap.add("first ")  # written at once; the window starts
        await asyncio.sleep(0)
        ap.add("second ")
        renewed = await asyncio.gather(pipe.renew("s", "a", "w1"), pipe.renew("t", "b", "w1"))
        await ap.close()
        assert renewed == [1, 1]
        # The renewals went in the same write as the token that was waiting for the window.
        both = [i for i, (_, calls) in enumerate(store.writes) if calls and store.renewed[i]]
        assert both and store.renewed[both[0]] == [("s", "a", "w1"), ("t", "b", "w1")]
        assert store.writes[both[0]][1][0][2] == ["second "]
        # A renewal alone is written too, and its result is the script's.
        store.renew_result = -1
        assert await asyncio.wait_for(pipe.renew("s", "a", "w1"), 10) == -1
        # One whose lease gave up (cancelled) before the write is not written.
        before = sum(len(r) for r in store.renewed)
        gave_up = asyncio.ensure_future(pipe.renew("s", "b", "w1"))
        await asyncio.sleep(0)
        gave_up.cancel()
        store.renew_result = 1
        assert await asyncio.wait_for(pipe.renew("u", "a", "w1"), 10) == 1
        assert sum(len(r) for r in store.renewed) == before + 1


async def test_stopping_the_pipe_releases_waiting_renewals() -> None:
    store = RecordingStore()
    pipe = AppendPipe(cast(Store, store), "w1", window_s=3600.0)
    pipe.start()
    await asyncio.wait_for(pipe.renew("s", "a", "w1"), 10)  # the first write starts the window
    waiting = asyncio.ensure_future(pipe.renew("s", "a", "w1"))  # held by the window
    await asyncio.sleep(0.01)
    await pipe.stop()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 10)


async def test_a_source_with_a_whole_batch_buffered_does_not_wait_for_the_window() -> None:
    store = RecordingStore()
    async with running(store, window_s=3600.0) as pipe:  # a window no test would wait out
        ap = pipe.appender("s", "a", 8)
        for i in range(32):  # flat out (no await in between): 4 whole batches of 8
            ap.add(f"{i} ")
        await asyncio.wait_for(ap.close(), 10)  # would hang behind the window
    assert store.written == {("s", "a"): [f"{i} " for i in range(32)]}
    assert [len(texts) for _, calls in store.writes for _, _, texts, *_ in calls] == [8, 8, 8, 8]


async def test_a_producer_faster_than_redis_waits_once_four_batches_are_buffered() -> None:
    store = RecordingStore()
    async with running(store) as pipe:
        ap = pipe.appender("s", "a", 4)
        # nothing has been written yet (no await in between): up to 15 buffered, the producer goes on
        assert [ap.add(f"{i} ") for i in range(15)] == [ADDED] * 15
        assert ap.add("15 ") == BACKLOGGED  # 16 = 4 batches of 4: the producer waits for the writes
        await asyncio.wait_for(ap.wait_written(), 10)
        assert ap.appended == 16 and store.written == {("s", "a"): [f"{i} " for i in range(16)]}
        # A stopped source (cancelled, too long) answers False; a write error is raised to the producer.
        ap.applied(-1)
        assert not ap.add("late ")
        failing = pipe.appender("t", "a", 4)
        failing.applied(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            failing.add("x")
        with pytest.raises(RuntimeError, match="boom"):
            await failing.wait_written()
