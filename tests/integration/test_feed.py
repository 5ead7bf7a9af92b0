"""api/feed.py + api/hub.py + shared/pacing.py on a real redis-server.

Each test opens a Feed as the events route does (subscribe on the hub, then the SSE body of
api/sse.py), writes A and B through the Store concurrently, and compares what the feed sent with
what Redis holds: every entry exactly once, in order, then `end`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import pytest
from redis.asyncio import Redis

from api.feed import Feed, start_point
from api.hub import Hub
from api.response import Liveness
from api.sse import event_stream
from shared.cursor import START, Cursor
from shared.events import Event, done_fields, end_event, error_fields, event_from_entry
from shared.keys import Source
from shared.pacing import Pacer
from shared.redis_server import RedisServer
from shared.settings import Settings
from shared.store import Store, is_terminal
from tests.client import parse_sse
from tests.integration.test_store import running_stream

# -- tools -------------------------------------------------------------------------------------


class CheckedPacer(Pacer):
    """A Pacer that records the most events it ever held per source, and when each came in."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.max_pending = {"a": 0, "b": 0}
        self.log: list[str] = []  # shared with a CountingStore to see the order of reads and pushes
        self.pushed: list[Event] = []

    def push(self, event: Event) -> None:
        super().push(event)
        self.pushed.append(event)
        self.log.append(f"push {event.source} {event.kind}")
        src = event.source
        self.max_pending[src] = max(self.max_pending[src], self.pending(src))


class CountingStore(Store):
    """Records every catch-up read: (source, after, count, rows returned)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        super().__init__(redis, settings)
        self.reads: list[tuple[str, str, int, int]] = []
        self.log: list[str] = []

    async def read(self, stream_id: str, source: Source, after: str, count: int) -> list[tuple[str, dict[str, str]]]:
        self.log.append(f"read {source}")
        rows = await super().read(stream_id, source, after, count)
        self.reads.append((source, after, count, len(rows)))
        return rows


@dataclass
class Message:
    event: str
    id: str | None
    data: dict[str, Any]
    chunk: int  # which yielded chunk (one pacer poll) it came in
    t: float  # loop time the chunk was yielded


@dataclass
class Reader:
    feed: Feed
    pacer: CheckedPacer
    messages: list[Message] = field(default_factory=list)

    def events(self) -> list[tuple[str, str | None, dict[str, Any]]]:
        return [(m.event, m.id, m.data) for m in self.messages if m.event not in ("meta", "phase")]

    def phases(self) -> list[str]:
        return [m.data["phase"] for m in self.messages if m.event == "phase"]


async def open_reader(
    hub: Hub,
    store: Store,
    sid: str,
    cursor: Cursor = START,
    *,
    slow: float = 0.0,
    b_gap: float = 0.0,
    batch: int = 512,
    slow_buffer: int | None = None,
) -> Reader:
    """What the events route does before it starts the body ("early": A's first entries read
    with the meta, before subscribing; B's state is the feed's first fill's to check)."""
    early_from = cursor.entry if cursor.source == "a" and MODE["reads"] == "early" else None
    meta, early = await asyncio.gather(
        store.meta(sid), store.read_events(sid, "a", early_from, batch) if early_from is not None else asyncio.sleep(0)
    )
    assert meta is not None
    cursor, a_state, b_state = start_point(cursor, meta)
    pacer = CheckedPacer(slow, b_gap, a_state=a_state, b_state=b_state)
    if is_terminal(meta.get("b_state")):
        pacer.b_completed()
    feed = Feed(store, sid, cursor, pacer, batch, slow_buffer)
    if early is not None and cursor.source == "a" and cursor.entry == early_from:
        feed.prefill(early)
    await hub.subscribe(store.keys.channel(sid), feed)
    return Reader(feed, pacer)


class SinkWriter:
    """Stands in for api.response.ChunkWriter: what the body writes between its own sends lands in
    the same place as what it yields, in the order it happened."""

    def __init__(self, take: Callable[[bytes], None]) -> None:
        self.take = take
        self.paused = False  # as a server's flow control: only `send` may write
        self.writes = 0

    def ready(self) -> bool:
        return not self.paused

    def write(self, body: bytes) -> None:
        self.writes += 1
        self.take(body)


# Every test here runs four ways. Sends: the body's task sends everything it yields ("task"), or
# the hub's callback also writes for a parked stream through a writer ("direct", as under
# uvicorn). Reads: A's first entries are read after the subscription ("late"), or with the
# request's checks before it, as the events route does ("early").
DEFAULT_MODE = {"sends": "task", "reads": "late"}
MODE = dict(DEFAULT_MODE)


def _in_mode(key: str, request: pytest.FixtureRequest) -> Iterator[str]:
    MODE[key] = request.param
    yield request.param
    MODE[key] = DEFAULT_MODE[key]


@pytest.fixture(autouse=True, params=["task", "direct"])
def sends(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _in_mode("sends", request)


@pytest.fixture(autouse=True, params=["late", "early"])
def reads(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _in_mode("reads", request)


async def run_reader(
    reader: Reader, hub: Hub, store: Store, sid: str, within: float = 20.0, writer: list[SinkWriter] | None = None
) -> Reader:
    """`writer`: gets the SinkWriter, in "direct" mode."""
    loop = asyncio.get_running_loop()
    channel = store.keys.channel(sid)
    live = Liveness(reader.feed.waker)
    body = cast(
        AsyncGenerator[bytes, None],
        event_stream(reader.feed, {"id": sid}, 1000, lambda: hub.unsubscribe(channel, reader.feed), live=live, ping_s=15.0),
    )
    buf = b""
    n = 0

    def take(chunk: bytes) -> None:
        nonlocal buf, n
        buf += chunk
        msgs, buf = parse_sse(buf)
        now = loop.time()
        reader.messages += [Message(e or "", i, orjson.loads(d), n, now) for e, i, d in msgs]
        n += 1

    if MODE["sends"] == "direct":
        live.writer = SinkWriter(take)  # type: ignore[assignment]
        if writer is not None:
            writer.append(live.writer)  # type: ignore[arg-type]
    async with asyncio.timeout(within), aclosing(body) as chunks:
        async for chunk in chunks:
            take(chunk)
    assert buf == b""
    return reader


async def expected(store: Store, sid: str, cursor: Cursor = START) -> list[tuple[str, str | None, dict[str, Any]]]:
    """What a reader from `cursor` must get, from what Redis holds once both sources ended."""
    meta = await store.meta(sid)
    assert meta is not None and is_terminal(meta["a_state"]) and is_terminal(meta["b_state"])
    out: list[Event] = []
    for src in ("a", "b"):
        if cursor.source == "b" and src == "a":
            continue
        after = cursor.entry if cursor.source == src else "0-0"
        rows = await store.read(sid, src, after, 1_000_000)  # type: ignore[arg-type]
        out += [event_from_entry(src, eid, f) for eid, f in rows]  # type: ignore[arg-type]
    out.append(end_event(meta["status"]))
    return [(e.kind, str(e.cursor), e.data) for e in out]


async def write(
    store: Store,
    sid: str,
    src: Source,
    n: int,
    *,
    seed: int = 0,
    max_batch: int = 5,
    pause: float = 0.001,
    delay: float = 0.0,
    terminal: Sequence[str] | None = None,
) -> None:
    """Append `n` deltas in random batches with small pauses, then the terminal entry
    (`terminal=[]`: none, the source goes on)."""
    rng = random.Random(seed)
    await asyncio.sleep(delay)
    i = 0
    while i < n:
        k = min(n - i, rng.randint(1, max_batch))
        assert await store.append(sid, src, [f"{src}{j} " for j in range(i, i + k)]) == k
        i += k
        await asyncio.sleep(pause * rng.random())
    if terminal is None:
        await store.finish(sid, [src], done_fields(n))
    elif terminal:
        await store.finish(sid, [src], list(terminal))


def assert_shape(reader: Reader) -> None:
    """meta first; deltas/done/error of A, then of B, then end last; phases in order."""
    kinds = [m.event for m in reader.messages]
    assert kinds[0] == "meta" and kinds[-1] == "end" and kinds.count("end") == 1
    sources = [m.data["source"] for m in reader.messages if m.event in ("delta", "done", "error")]
    assert sources == sorted(sources)
    order = ["slow", "flush", "waiting", "b"]
    ph = reader.phases()
    assert ph == sorted(set(ph), key=order.index)


async def ended_slow_flush_b(reader: Reader, store: Store, sid: str, task: asyncio.Task[Reader]) -> None:
    """The reader's run ended with the whole stream exactly once, A paced while B ran, then
    flushed, then B."""
    await task
    assert reader.events() == await expected(store, sid)
    assert_shape(reader)
    assert reader.phases() == ["slow", "flush", "b"]


@pytest.fixture
async def cstore(redis: Redis, settings: Settings) -> CountingStore:
    return CountingStore(redis, settings)


# -- fresh reads -------------------------------------------------------------------------------


async def test_fresh_read_of_a_live_stream(hub: Hub, cstore: CountingStore) -> None:
    store = cstore
    sid = await running_stream(store)
    reader = await open_reader(hub, store, sid)
    reader.pacer.log = store.log
    task = asyncio.create_task(run_reader(reader, hub, store, sid))
    await asyncio.gather(write(store, sid, "a", 300, seed=1), write(store, sid, "b", 80, seed=2))
    await task
    assert reader.events() == await expected(store, sid)
    assert_shape(reader)
    assert reader.pacer.max_pending["a"] <= 512
    assert hub.listeners == 0  # on_close unsubscribed
    # B is neither read nor buffered before A has ended: only its completion is noted.
    log = store.log
    a_end = log.index("push a done")
    assert "read b" not in log[:a_end] and "push b delta" not in log[:a_end] and "push b done" not in log[:a_end]


async def test_fresh_read_of_a_finished_stream(hub: Hub, store: Store) -> None:
    sid = await running_stream(store)
    await write(store, sid, "a", 40, pause=0)
    await write(store, sid, "b", 10, pause=0, terminal=error_fields("task_failed", "boom"))
    reader = await run_reader(await open_reader(hub, store, sid, slow=5.0), hub, store, sid)
    assert reader.events() == await expected(store, sid)
    assert reader.events()[-1] == ("end", "end", {"status": "failed"})
    # B had completed: no slow phase, A's history in one go.
    assert reader.phases() == ["flush", "b"]
    assert_shape(reader)


async def test_an_entry_appended_before_the_subscription_took_effect(hub: Hub, cstore: CountingStore) -> None:
    """The events route reads A's first entries with its checks, before its subscription is
    confirmed: an entry appended in between is announced to no one. The first fill reads after
    what was read early, so it is neither lost nor sent twice."""
    store = cstore
    sid = await running_stream(store)
    await store.append(sid, "a", ["h1 ", "h2 "])
    early = await store.read_events(sid, "a", "0-0", 512)
    # Nobody is subscribed yet: the rest of the stream is announced to no one, so no later
    # announcement would reveal a gap either.
    await store.append(sid, "a", ["unheard "])
    await store.finish(sid, ["a"], done_fields(3))
    await write(store, sid, "b", 5, seed=4)
    pacer = CheckedPacer(0.0, 0.0)
    feed = Feed(store, sid, START, pacer, 512)
    feed.prefill(early)
    await hub.subscribe(store.keys.channel(sid), feed)
    assert [e.data["text"] for e in pacer.pushed] == ["h1 ", "h2 "] and feed.needs_fill()
    reads = len(store.reads)
    reader = await run_reader(Reader(feed, pacer), hub, store, sid, within=5.0)
    assert reader.events() == await expected(store, sid)
    assert store.reads[reads][:2] == ("a", early[-1].cursor.entry)  # the first fill: after the early read
    assert_shape(reader)


async def test_b_completed_before_the_subscription_is_seen_by_the_first_fill(hub: Hub, cstore: CountingStore) -> None:
    """B completes between the meta read (running) and the subscription: announced to no one. The
    first fill reads B's state, even when A's early read filled the pacer and A needs no read, so
    A's backlog flushes at once instead of at the slow pace."""
    store = cstore
    sid = await running_stream(store)
    await store.append(sid, "a", [f"t{i} " for i in range(12)])
    meta = await store.meta(sid)
    assert meta is not None and meta["b_state"] == "running"
    early = await store.read_events(sid, "a", "0-0", 8)
    await store.finish(sid, ["b"], done_fields(0))  # nobody is subscribed yet
    pacer = CheckedPacer(60.0, 0.0)  # while B runs, one A event a minute
    feed = Feed(store, sid, START, pacer, 8)
    feed.prefill(early)
    await hub.subscribe(store.keys.channel(sid), feed)
    assert pacer.pending("a") == 8 and not pacer.b_complete
    assert feed.needs_fill(), "B's state is still to be read"
    reads = len(store.reads)
    await feed.fill()
    assert pacer.b_complete and not feed.needs_fill()
    assert len(store.reads) == reads, "A had a full batch: no read of A"
    await store.finish(sid, ["a"], done_fields(12))
    reader = await run_reader(Reader(feed, pacer), hub, store, sid, within=5.0)
    assert reader.events() == await expected(store, sid)
    assert reader.phases() == ["flush", "b"]


async def test_slow_then_flush_when_b_completes(hub: Hub, store: Store) -> None:
    sid = await running_stream(store)
    reader = await open_reader(hub, store, sid, slow=0.04)
    task = asyncio.create_task(run_reader(reader, hub, store, sid))
    await write(store, sid, "a", 60, pause=0, max_batch=10)  # A is fast: a backlog builds
    # B completes once a few deltas went out at the slow pace (waited for, not slept: on a busy
    # machine the loop can stall for a few hundred ms).
    for _ in range(500):
        if sum(m.event == "delta" for m in reader.messages) >= 4:
            break
        await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    b_done_at = loop.time()
    await store.finish(sid, ["b"], done_fields(0))
    await ended_slow_flush_b(reader, store, sid, task)
    msgs = reader.messages
    flush = next(m for m in msgs if m.event == "phase" and m.data["phase"] == "flush")
    slow_deltas = [m for m in msgs if m.event == "delta" and m.chunk < flush.chunk]
    assert 4 <= len(slow_deltas) <= 30  # not all 60: A was paced while B ran
    # One at a time, 40 ms apart by the server's clock. Received times carry the machine's
    # jitter, but a late send does not make the next one early by more than it was late.
    assert all(len([m for m in slow_deltas if m.chunk == c]) == 1 for c in {m.chunk for m in slow_deltas})
    span = slow_deltas[-1].t - slow_deltas[0].t
    assert span >= 0.03 * (len(slow_deltas) - 1), span
    # The flush goes out when B completes (the slow pace would take 2 s more), with the whole
    # backlog in the same send.
    assert flush.t - b_done_at < 0.5
    in_flush_chunk = [m for m in msgs if m.chunk == flush.chunk and m.event == "delta"]
    assert len(in_flush_chunk) == 60 - len(slow_deltas)


# -- sends from the hub's callback ---------------------------------------------------------------


@pytest.mark.parametrize("sends", ["direct"], indirect=True)
async def test_live_tokens_go_out_from_the_hubs_callback(hub: Hub, store: Store) -> None:
    sid = await running_stream(store)
    await store.finish(sid, ["b"], done_fields(0))  # no pacing: every token goes as it comes
    reader = await open_reader(hub, store, sid)
    got: list[SinkWriter] = []
    task = asyncio.create_task(run_reader(reader, hub, store, sid, writer=got))
    await asyncio.sleep(0.05)  # the reader is parked, waiting for A
    for i in range(40):
        assert await store.append(sid, "a", [f"t{i} "]) == 1
        await asyncio.sleep(0.002)
    await store.finish(sid, ["a"], done_fields(40))
    await task
    assert reader.events() == await expected(store, sid)
    assert_shape(reader)
    # Tokens that came one at a time to a parked stream went out from the callback that brought them.
    assert got[0].writes >= 30


@pytest.mark.parametrize("sends", ["direct"], indirect=True)
async def test_a_connection_that_cannot_take_bytes_goes_back_to_send(hub: Hub, store: Store) -> None:
    sid = await running_stream(store)
    await store.finish(sid, ["b"], done_fields(0))
    reader = await open_reader(hub, store, sid)
    got: list[SinkWriter] = []
    task = asyncio.create_task(run_reader(reader, hub, store, sid, writer=got))
    await asyncio.sleep(0.05)

    async def tokens(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            assert await store.append(sid, "a", [f"t{i} "]) == 1
            await asyncio.sleep(0.002)

    await tokens(0, 20)
    writer = got[0]
    writer.paused = True
    before = writer.writes
    await tokens(20, 40)
    assert writer.writes == before  # paused: every token went through the task's sends
    writer.paused = False
    await tokens(40, 60)
    await store.finish(sid, ["a"], done_fields(60))
    await task
    assert reader.events() == await expected(store, sid)
    assert writer.writes > before
    assert_shape(reader)


@pytest.mark.parametrize("sends", ["direct"], indirect=True)
async def test_slow_slots_go_out_from_a_timer_while_the_stream_is_parked(hub: Hub, store: Store) -> None:
    """While B runs, each slow slot's delta is written by a timer callback (the body's task stays
    parked); a connection that cannot take bytes gets them from the task's sends instead."""
    sid = await running_stream(store)
    reader = await open_reader(hub, store, sid, slow=0.02)
    got: list[SinkWriter] = []
    task = asyncio.create_task(run_reader(reader, hub, store, sid, writer=got))
    await write(store, sid, "a", 200, pause=0, max_batch=50, terminal=[])  # a backlog, held back

    async def slow_deltas(n: int) -> None:  # waited for, not slept: a busy machine stalls
        for _ in range(1000):
            if sum(m.event == "delta" for m in reader.messages) >= n:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"fewer than {n} slow deltas")

    await slow_deltas(10)
    writer = got[0]
    assert writer.writes >= 8  # (the first slots may be the task's: its first sends, the read)
    writer.paused = True
    before, sent = writer.writes, sum(m.event == "delta" for m in reader.messages)
    await slow_deltas(sent + 4)
    assert writer.writes == before  # not written from the callback while it cannot take bytes
    writer.paused = False
    await slow_deltas(sent + 8)
    assert writer.writes > before
    await store.finish(sid, ["b"], done_fields(0))
    await store.finish(sid, ["a"], done_fields(200))
    await ended_slow_flush_b(reader, store, sid, task)
    msgs = reader.messages
    flush = next(i for i, m in enumerate(msgs) if m.event == "phase" and m.data["phase"] == "flush")
    slow = [m for m in msgs[:flush] if m.event == "delta"]
    assert len(slow) < 100  # not all 200: A was paced while B ran
    # One per slot: a late slot does not make the next one early by more than it was late.
    assert slow[-1].t - slow[0].t >= 0.015 * (len(slow) - 1)


class BrokenPacer(CheckedPacer):
    """Raises (a bug) from its n-th look at an event in the hub's loop on (poll, or the fast lane's
    `passes`)."""

    def __init__(self, *args: Any, fail_at: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.polls, self.fail_at = 0, fail_at

    def _in_the_hub(self) -> None:
        task = asyncio.current_task()
        if task is not None and task.get_name() == "tandem-hub":
            self.polls += 1
            if self.polls >= self.fail_at:
                raise RuntimeError("a bug in the pacer")

    def poll(self, now: float, limit: int = 1 << 30) -> tuple[list[Any], float | None]:
        self._in_the_hub()
        return super().poll(now, limit)

    def passes(self, event: Event) -> bool:
        self._in_the_hub()
        return super().passes(event)


@pytest.mark.parametrize("sends", ["direct"], indirect=True)
async def test_a_failing_send_from_the_callback_ends_that_response_only(hub: Hub, store: Store) -> None:
    bad_sid, good_sid = await running_stream(store), await running_stream(store)
    for sid in (bad_sid, good_sid):
        await store.finish(sid, ["b"], done_fields(0))
    bad = await open_reader(hub, store, bad_sid)
    bad.feed.pacer = bad.pacer = BrokenPacer(0.0, 0.0, fail_at=8)
    bad.pacer.b_completed()
    good = await open_reader(hub, store, good_sid)
    reconnects = hub.reconnects
    tasks = [asyncio.create_task(run_reader(r, hub, store, sid)) for r, sid in ((bad, bad_sid), (good, good_sid))]
    await asyncio.sleep(0.05)
    for i in range(30):
        for sid in (bad_sid, good_sid):
            assert await store.append(sid, "a", [f"t{i} "]) == 1
        await asyncio.sleep(0.002)
    await store.finish(good_sid, ["a"], done_fields(30))
    await asyncio.wait_for(tasks[0], 5)  # the broken one's response ended (the client would resume)
    await tasks[1]
    assert bad.pacer.polls >= 8 and not any(m.event == "end" for m in bad.messages)
    got = [m.data["text"] for m in bad.messages if m.event == "delta"]
    assert got == [f"t{i} " for i in range(len(got))]  # what it did get is in order, no gaps
    assert good.events() == await expected(store, good_sid)  # the other reader never noticed
    assert hub.reconnects == reconnects and hub.connected.is_set()


# -- resume ------------------------------------------------------------------------------------


async def test_resume_from_a_middle_cursor_while_live(hub: Hub, store: Store) -> None:
    sid = await running_stream(store)
    await write(store, sid, "a", 50, pause=0)  # A is done...
    rows = await store.read(sid, "a", "0-0", 1000)
    cursor = Cursor("a", rows[20][0])
    reader = await open_reader(hub, store, sid, cursor)
    task = asyncio.create_task(run_reader(reader, hub, store, sid))
    await write(store, sid, "b", 30, seed=3)  # ...B goes on while we read
    await task
    want = await expected(store, sid, cursor)
    assert reader.events() == want
    assert want[0][1] == f"a-{rows[21][0]}"
    assert_shape(reader)


async def test_resume_in_a_while_a_runs(hub: Hub, store: Store) -> None:
    sid = await running_stream(store)
    await write(store, sid, "a", 30, pause=0, terminal=[])  # no terminal yet: A still running
    rows = await store.read(sid, "a", "0-0", 1000)
    cursor = Cursor("a", rows[-1][0])
    reader = await open_reader(hub, store, sid, cursor)
    task = asyncio.create_task(run_reader(reader, hub, store, sid))
    await asyncio.sleep(0.05)
    assert await store.append(sid, "a", ["late "]) == 1
    await store.finish(sid, ["a"], done_fields(31))
    await write(store, sid, "b", 5)
    await task
    assert reader.events() == await expected(store, sid, cursor)
    assert reader.events()[0][2] == {"source": "a", "text": "late "}


async def test_resume_from_a_b_cursor(hub: Hub, store: Store) -> None:
    sid = await running_stream(store)
    await write(store, sid, "a", 10, pause=0, terminal=error_fields("task_failed", "x"))
    await write(store, sid, "b", 20, pause=0, terminal=[])
    rows = await store.read(sid, "b", "0-0", 1000)
    cursor = Cursor("b", rows[7][0])
    reader = await open_reader(hub, store, sid, cursor, slow=1.0)
    task = asyncio.create_task(run_reader(reader, hub, store, sid))
    await asyncio.sleep(0.05)
    await write(store, sid, "b", 5, seed=4)
    await task
    want = await expected(store, sid, cursor)
    assert reader.events() == want
    assert all(e[2].get("source") != "a" for e in reader.events())
    assert reader.events()[-1] == ("end", "end", {"status": "failed"})
    assert "slow" not in reader.phases()


async def test_resume_at_b_terminal_gets_only_end(hub: Hub, store: Store) -> None:
    """Regression: a client that got B's `done` but not `end` resumed with B's terminal id; the
    feed read nothing after it and the pacer waited forever for B's terminal event (keepalives
    only). Fix: start_point() starts such a connection past B, and the Pacer sends just `end`."""
    sid = await running_stream(store)
    await write(store, sid, "a", 3, pause=0)
    await write(store, sid, "b", 3, pause=0, terminal=error_fields("cancelled", "c"))
    rows = await store.read(sid, "b", "0-0", 1000)
    reader = await run_reader(await open_reader(hub, store, sid, Cursor("b", rows[-1][0])), hub, store, sid, within=5)
    assert reader.events() == [("end", "end", {"status": "cancelled"})]


async def test_resume_at_a_terminal_goes_on_with_b(hub: Hub, store: Store) -> None:
    """Regression: a client that dropped while waiting for B (its last id: A's `done`) resumed
    and waited forever: the feed looked for A's events after A's terminal one. Fix: start_point()
    starts such a connection at B's beginning, past A."""
    sid = await running_stream(store)
    await write(store, sid, "a", 4, pause=0)
    rows = await store.read(sid, "a", "0-0", 1000)
    cursor = Cursor("a", rows[-1][0])
    reader = await open_reader(hub, store, sid, cursor, slow=1.0)
    task = asyncio.create_task(run_reader(reader, hub, store, sid, within=5))
    await asyncio.sleep(0.05)
    await write(store, sid, "b", 6, seed=10)
    await task
    assert reader.events() == await expected(store, sid, Cursor("b", "0-0"))
    assert reader.events()[0][2] == {"source": "b", "text": "b0 "}
    assert reader.phases() in (["waiting", "b"], ["b"])


@pytest.mark.parametrize(
    ("where", "meta", "want"),
    [
        ("a-5-0", {"a_state": "running", "a_last": "5-0"}, ("a-5-0", None, None)),
        ("a-4-0", {"a_state": "done", "a_last": "5-0"}, ("a-4-0", None, None)),
        ("a-5-0", {"a_state": "done", "a_last": "5-0", "b_state": "running"}, ("b-0-0", "done", None)),
        ("a-5-0", {"a_state": "failed", "a_last": "5-0", "b_state": "done", "b_last": "0-0"}, ("b-0-0", "failed", None)),
        ("b-3-0", {"a_state": "done", "b_state": "running", "b_last": "3-0"}, ("b-3-0", "done", None)),
        ("b-2-0", {"a_state": "done", "b_state": "done", "b_last": "3-0"}, ("b-2-0", "done", None)),
        ("b-3-0", {"a_state": "cancelled", "b_state": "cancelled", "b_last": "3-0"}, ("b-3-0", "cancelled", "cancelled")),
        ("a-0-0", {"a_state": "queued", "a_last": "0-0"}, ("a-0-0", None, None)),
    ],
)
def test_start_point(where: str, meta: dict[str, str], want: tuple[str, str | None, str | None]) -> None:
    cursor, a_state, b_state = start_point(Cursor.parse(where), meta)
    assert (str(cursor), a_state, b_state) == want


# -- gaps --------------------------------------------------------------------------------------


async def test_gap_missed_announcements(hub: Hub, store: Store) -> None:
    """Appends the feed never heard of (it was unsubscribed): the next announcement's `prev`
    does not match, and the feed reads the gap from Redis."""
    sid = await running_stream(store)
    channel = store.keys.channel(sid)
    reader = await open_reader(hub, store, sid)
    task = asyncio.create_task(run_reader(reader, hub, store, sid))
    await write(store, sid, "a", 10, pause=0, terminal=[])
    await asyncio.sleep(0.05)
    hub.unsubscribe(channel, reader.feed)
    await write(store, sid, "a", 25, seed=5, pause=0, terminal=[])  # not heard
    await hub.subscribe(channel, reader.feed)
    await write(store, sid, "a", 10, seed=6, terminal=[])
    await store.finish(sid, ["a"], done_fields(45))
    await write(store, sid, "b", 10)
    await task
    assert reader.events() == await expected(store, sid)
    assert len([e for e in reader.events() if e[0] == "delta" and e[2]["source"] == "a"]) == 45


async def test_gap_announcement_with_a_wrong_prev(hub: Hub, store: Store, redis: Redis) -> None:
    """An announcement that does not follow what the feed has: its entries are not trusted;
    the feed reads Redis instead, so nothing bogus goes out and nothing is lost."""
    sid = await running_stream(store)
    channel = store.keys.channel(sid)
    reader = await open_reader(hub, store, sid)
    task = asyncio.create_task(run_reader(reader, hub, store, sid))
    await write(store, sid, "a", 5, pause=0, terminal=[])
    await asyncio.sleep(0.05)
    bogus = {"s": "a", "p": "1-0", "e": [["99999999999999-0", ["type", "delta", "text", "BOGUS"]]]}
    await redis.publish(channel, orjson.dumps(bogus))
    await write(store, sid, "a", 5, seed=7, pause=0)
    await write(store, sid, "b", 5)
    await task
    assert reader.events() == await expected(store, sid)
    assert all(e[2].get("text") != "BOGUS" for e in reader.events())


class GatedStore(CountingStore):
    """A catch-up read that waits for the test, before or after its XRANGE."""

    def __init__(self, redis: Redis, settings: Settings, when: str) -> None:
        super().__init__(redis, settings)
        self.when = when
        self.entered, self.gate = asyncio.Event(), asyncio.Event()
        self.armed = False  # the gate holds reads from here on (not the connection's early read)

    async def read(self, stream_id: str, source: Source, after: str, count: int) -> list[tuple[str, dict[str, str]]]:
        if not self.armed:
            return await super().read(stream_id, source, after, count)
        self.entered.set()
        if self.when == "before":
            await self.gate.wait()
        rows = await super().read(stream_id, source, after, count)
        if self.when == "after":
            await self.gate.wait()
        return rows


@pytest.mark.parametrize("when", ["before", "after"])
async def test_announcements_during_a_read_follow_on_without_another_read(hub: Hub, redis: Redis, settings: Settings, when: str) -> None:
    """Tokens appended while a catch-up read is in flight are taken from their announcements once
    the read is back (whether the read saw them or not): one read, each entry once. A busy API
    process used to read again for every announcement that arrived during a read, and at 20
    tokens/s a source could stay behind, reading, for as long as it ran."""
    store = GatedStore(redis, settings, when)
    sid = await running_stream(store)
    assert await store.append(sid, "a", ["h1 ", "h2 "]) == 2  # history: the feed starts behind
    reader = await open_reader(hub, store, sid)
    store.armed, reads_before = True, len(store.reads)
    fill = asyncio.create_task(reader.feed.fill())
    await asyncio.wait_for(store.entered.wait(), 5)
    for i in range(3):
        assert await store.append(sid, "a", [f"n{i} "]) == 1
    await asyncio.sleep(0.2)  # the hub hands the three announcements to the feed meanwhile
    store.gate.set()
    await asyncio.wait_for(fill, 5)
    assert [r[0] for r in store.reads[reads_before:]] == ["a"], "one read"
    assert not reader.feed.needs_fill()
    assert [e.data["text"] for e in reader.pacer.pushed] == ["h1 ", "h2 ", "n0 ", "n1 ", "n2 "]
    # And live from here on: the next announcement goes straight to the pacer.
    assert await store.append(sid, "a", ["n3 "]) == 1
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(reader.pacer.pushed) == 6:
            break
    assert [e.data["text"] for e in reader.pacer.pushed][-1] == "n3 " and len(store.reads) == reads_before + 1


# -- long backlogs: memory stays bounded -------------------------------------------------------


async def test_long_finished_backlog_larger_than_read_batch(hub: Hub, cstore: CountingStore) -> None:
    store = cstore
    sid = await running_stream(store)
    await write(store, sid, "a", 700, pause=0, max_batch=50)
    await write(store, sid, "b", 300, pause=0, max_batch=50)
    reader = await run_reader(await open_reader(hub, store, sid, batch=16), hub, store, sid)
    reads = list(store.reads)
    assert reader.events() == await expected(store, sid)
    assert reader.pacer.max_pending["a"] <= 16
    assert reader.pacer.max_pending["b"] <= 16
    assert all(count <= 16 for _, _, count, _ in reads)
    assert len(reads) >= (700 + 300 + 2) // 16


async def test_long_live_backlog_while_slow(hub: Hub, store: Store) -> None:
    """A far ahead of a slow pacer: the feed must not buffer A's backlog beyond read_batch; the
    rest stays in Redis until the pacer wants it."""
    sid = await running_stream(store)
    reader = await open_reader(hub, store, sid, slow=0.01, batch=16)
    task = asyncio.create_task(run_reader(reader, hub, store, sid))
    await write(store, sid, "a", 400, pause=0.001, max_batch=7)
    await asyncio.sleep(0.3)
    assert reader.pacer.max_pending["a"] <= 16
    await store.finish(sid, ["b"], done_fields(0))
    await task
    assert reader.events() == await expected(store, sid)
    assert reader.pacer.max_pending["a"] <= 16


async def test_while_b_runs_a_backlog_waits_in_redis_and_flushes_when_b_completes(hub: Hub, cstore: CountingStore) -> None:
    """TANDEM_SLOW_BUFFER: while B runs, the pacer holds at most `slow_buffer` of A's entries
    (refilled from Redis as the slow pace takes them); when B completes, what it holds goes out
    at once and the rest is read after it: every entry exactly once, in order."""
    store = cstore
    sid = await running_stream(store)
    reader = await open_reader(hub, store, sid, slow=0.02, batch=64, slow_buffer=6)
    task = asyncio.create_task(run_reader(reader, hub, store, sid))
    await write(store, sid, "a", 150, pause=0.002, max_batch=4, terminal=[])
    for _ in range(500):  # a few refills at the slow pace (waited for: a busy machine stalls)
        if sum(m.event == "delta" for m in reader.messages) >= 12:
            break
        await asyncio.sleep(0.01)
    held_while_slow = reader.pacer.max_pending["a"]
    reads_while_slow = sum(src == "a" for src, *_ in store.reads)
    flush_at = len(reader.messages)
    await store.finish(sid, ["b"], done_fields(0))
    await store.finish(sid, ["a"], done_fields(150))
    await ended_slow_flush_b(reader, store, sid, task)
    assert held_while_slow <= 6
    assert reads_while_slow >= 2  # refilled from Redis while slow, not held
    assert reader.pacer.max_pending["a"] <= 64
    # The flush read the backlog in reads of up to a batch, not six at a time.
    flush_reads = [count for src, _, count, _ in store.reads[reads_while_slow:] if src == "a"]
    assert flush_reads and max(flush_reads) > 6
    assert sum(m.event == "delta" for m in reader.messages[flush_at:]) > 100


async def test_live_batches_larger_than_read_batch(hub: Hub, store: Store) -> None:
    sid = await running_stream(store)
    reader = await open_reader(hub, store, sid, batch=8)
    task = asyncio.create_task(run_reader(reader, hub, store, sid))
    await write(store, sid, "a", 200, max_batch=30)
    await write(store, sid, "b", 100, max_batch=30)
    await task
    assert reader.events() == await expected(store, sid)
    assert max(reader.pacer.max_pending.values()) <= 8


@pytest.mark.parametrize("batch", [1, 2, 3])
async def test_tiny_read_batch(hub: Hub, store: Store, batch: int) -> None:
    """Regression: with read_batch=1 the feed never read history (it filled only while
    pending < read_batch // 2 == 0), so a reader of an existing stream waited forever."""
    sid = await running_stream(store)
    await write(store, sid, "a", 10, pause=0)
    reader = await open_reader(hub, store, sid, batch=batch)
    task = asyncio.create_task(run_reader(reader, hub, store, sid, within=10))
    await write(store, sid, "b", 10)
    await task
    assert reader.events() == await expected(store, sid)
    assert max(reader.pacer.max_pending.values()) <= batch


# -- hub reconnect -----------------------------------------------------------------------------


async def test_hub_reconnect_loses_nothing(hub: Hub, store: Store, redis: Redis) -> None:
    sid = await running_stream(store)
    reader = await open_reader(hub, store, sid)
    task = asyncio.create_task(run_reader(reader, hub, store, sid))

    async def killer() -> None:
        for _ in range(3):
            await asyncio.sleep(0.05)
            await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]

    await asyncio.gather(write(store, sid, "a", 150, seed=8, pause=0.003), killer())
    await write(store, sid, "b", 50, seed=9, pause=0.003)
    await task
    assert reader.events() == await expected(store, sid)
    assert_shape(reader)


async def test_hub_reconnect_while_idle_then_terminal(hub: Hub, store: Store, redis: Redis) -> None:
    """The connection drops, and the only append during the outage is the last one: the resync
    after reconnecting must find it (no later announcement would reveal the gap)."""
    sid = await running_stream(store)
    await write(store, sid, "a", 5, pause=0)
    await write(store, sid, "b", 5, pause=0, terminal=[])
    reader = await open_reader(hub, store, sid)
    task = asyncio.create_task(run_reader(reader, hub, store, sid))
    await asyncio.sleep(0.1)
    hub_client_dropped = hub.connected.is_set()
    await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    await store.finish(sid, ["b"], done_fields(5))  # most likely during the outage
    await task
    assert hub_client_dropped
    assert reader.events() == await expected(store, sid)


class LateSubscribeHub(Hub):
    """A hub whose SUBSCRIBEs of stream channels reach Redis `late` seconds after the caller was
    told they were sent: how a busy Redis may order them after other clients' commands."""

    late = 0.0
    pending: set[asyncio.Task[None]] = set()

    def _send_subscribe(self, channels: list[str]) -> None:
        if self.late <= 0 or any(c.endswith(":hub") for c in channels):
            super()._send_subscribe(channels)
            return

        async def later() -> None:
            await asyncio.sleep(self.late)
            super(LateSubscribeHub, self)._send_subscribe(channels)

        task = asyncio.create_task(later())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)


async def test_hub_resyncs_after_resubscribe_confirmed(redis_server: RedisServer, prefix: str, store: Store, redis: Redis) -> None:
    """Regression: after a reconnect the hub told its listeners to catch up as soon as it had
    *sent* SUBSCRIBE. A catch-up read that Redis served before the SUBSCRIBE took effect left the
    feed live while appends were still unheard; if those were the last ones (no later
    announcement reveals the gap) the reader waited forever. Fix: resync once Redis confirms."""
    hub = LateSubscribeHub(Redis.from_url(redis_server.url, socket_connect_timeout=2.0), f"{prefix}:hub", confirm_timeout_s=3.0)
    await hub.start()
    try:
        await asyncio.wait_for(hub.connected.wait(), 5.0)
        sid = await running_stream(store)
        await write(store, sid, "a", 5, pause=0, terminal=[])
        reader = await open_reader(hub, store, sid)
        task = asyncio.create_task(run_reader(reader, hub, store, sid, within=8))
        await asyncio.sleep(0.1)
        hub.late = 0.4
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
        for _ in range(1000):  # the hub reconnected (and sent its SUBSCRIBE, held back)
            if hub.connected.is_set():
                break
            await asyncio.sleep(0.005)
        assert hub.connected.is_set()
        await asyncio.sleep(0.1)  # the early catch-up read is done: nothing new yet
        # Everything else happens before the SUBSCRIBE reaches Redis: no announcement is heard.
        await write(store, sid, "a", 5, seed=11, pause=0)
        await write(store, sid, "b", 5, seed=12, pause=0)
        await task
        assert reader.events() == await expected(store, sid)
    finally:
        await asyncio.gather(*LateSubscribeHub.pending)
        await hub.stop()
