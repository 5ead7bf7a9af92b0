"""The events route in-process (ASGI, real redis-server), with this test acting as the worker.

httpx's ASGI transport returns a response once the app has sent all of it, so these tests read
finished streams only: the response ends after `end`, or the test times out (a reader that would
wait forever).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from api.app import create_app
from shared.background import settled
from shared.events import done_fields, error_fields
from shared.settings import Settings
from shared.store import Store
from tests.client import parse_sse

Event3 = tuple[str, str | None, dict[str, Any]]


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update={"sse_ping_s": 60.0}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tandem.test") as c:
            yield c


async def create(client: httpx.AsyncClient, **pacing: int) -> dict[str, Any]:
    body = {"prompt": "p", "pacing": pacing or {"slow_interval_ms": 0, "b_interval_ms": 0}}
    r = await client.post("/v1/streams", json=body)
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def work(store: Store, sid: str, a: list[str], b: list[str], a_end: list[str], b_end: list[str]) -> None:
    """What the workers would do."""
    assert await store.start(sid, "a", "test") == "queued"
    assert await store.start(sid, "b", "test") == "queued"
    if a:
        assert await store.append(sid, "a", a) == len(a)
    await store.finish(sid, ["a"], a_end)
    if b:
        assert await store.append(sid, "b", b) == len(b)
    await store.finish(sid, ["b"], b_end)


async def read(client: httpx.AsyncClient, url: str, last_id: str | None = None) -> tuple[int, list[Event3], bytes]:
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    async with asyncio.timeout(10):
        r = await client.get(url, headers=headers)
    msgs, rest = parse_sse(r.content)
    assert rest == b""
    return r.status_code, [(e or "", i, orjson.loads(d)) for e, i, d in msgs], r.content


def with_ids(events: list[Event3]) -> list[Event3]:
    return [e for e in events if e[1] is not None]


@pytest.mark.parametrize(
    ("a", "b", "a_end", "b_end", "status"),
    [
        (["Hel", "lo\n"], ["B1 ", "B2"], done_fields(2), done_fields(2), "completed"),
        (["x"], [], error_fields("task_failed", "boom"), done_fields(0), "failed"),
        ([], ["y"], done_fields(0), error_fields("cancelled", "c"), "cancelled"),
    ],
)
async def test_resume_from_every_id(
    client: httpx.AsyncClient, store: Store, a: list[str], b: list[str], a_end: list[str], b_end: list[str], status: str
) -> None:
    """Given any id received on the stream, the server sends everything after it and nothing at or
    before it, and then ends the response. Regression: at A's or B's terminal id, the reader
    waited forever."""
    doc = await create(client)
    await work(store, doc["id"], a, b, a_end, b_end)
    code, events, raw = await read(client, doc["events_url"])
    assert code == 200
    assert events[0][0] == "meta"
    full = with_ids(events)
    assert full[-1] == ("end", "end", {"status": status})
    assert "".join(e[2]["text"] for e in full if e[0] == "delta" and e[2]["source"] == "a") == "".join(a)
    assert [e[2]["source"] for e in full if e[0] in ("done", "error")] == ["a", "b"]
    assert raw.startswith(b"retry: ")
    for k, (_, eid, _) in enumerate(full[:-1]):
        code, again, _ = await read(client, doc["events_url"], eid)
        assert code == 200, eid
        assert again[0][0] == "meta"
        assert with_ids(again) == full[k + 1 :], f"resumed after {eid}"
        assert not any(e[0] == "phase" and e[2]["phase"] == "slow" for e in again)
    # After `end`: 204, so an EventSource stops reconnecting.
    code, again, _ = await read(client, doc["events_url"], "end")
    assert code == 204 and again == []


async def test_resume_by_query_parameter(client: httpx.AsyncClient, store: Store) -> None:
    doc = await create(client)
    await work(store, doc["id"], ["1", "2", "3"], ["4"], done_fields(3), done_fields(1))
    _, events, _ = await read(client, doc["events_url"])
    full = with_ids(events)
    code, again, _ = await read(client, doc["events_url"] + f"&last_event_id={full[1][1]}")
    assert code == 200 and with_ids(again) == full[2:]


@pytest.mark.parametrize("bad", ["x-1-1", "a-01-1", "a-1", "b-0-0", "a-99999999999999-0", "end"])
async def test_bad_last_event_id(client: httpx.AsyncClient, store: Store, bad: str) -> None:
    """Malformed, not of this stream, or past the end of a running stream: 400 with a JSON error."""
    doc = await create(client)
    assert await store.start(doc["id"], "a", "test") == "queued"
    await store.append(doc["id"], "a", ["x"])
    r = await client.get(doc["events_url"], headers={"Last-Event-ID": bad})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_last_event_id"


async def test_keepalive_ping_while_nothing_happens(settings: Settings, store: Store) -> None:
    """A quiet stream sends a `: ping` comment every TANDEM_SSE_PING_S, and still ends normally."""
    app = create_app(settings.model_copy(update={"sse_ping_s": 0.05}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tandem.test") as c:
            h = await create(c)

            async def later() -> None:
                await asyncio.sleep(0.3)
                await work(store, h["id"], ["x"], ["y"], done_fields(1), done_fields(1))

            writer = asyncio.create_task(later())
            status, events, raw = await read(c, h["events_url"])
            await writer
    assert status == 200
    assert raw.count(b": ping\n\n") >= 3
    assert [e[0] for e in events if e[1] is not None] == ["delta", "done", "delta", "done", "end"]


async def test_refused_connections_leave_no_subscription(settings: Settings, store: Store) -> None:
    """A connection subscribes to its stream's channel while its request is checked (api/hub.py
    `hold`); one that is refused gives it back."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        hub = app.state.tandem.hub
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem.test") as c:
            doc = await create(c)
            assert await store.start(doc["id"], "a", "test") == "queued"
            await store.append(doc["id"], "a", ["x"])
            url = f"/v1/streams/{doc['id']}/events"
            channel = store.keys.channel(doc["id"])
            refused = [
                await c.get(url, params={"token": "not-the-token"}),
                await c.get(url, params={"token": doc["token"]}, headers={"Last-Event-ID": "a/99999999999999-0"}),
                await c.get(url, params={"token": doc["token"]}, headers={"Last-Event-ID": "end"}),
                await c.get("/v1/streams/no-such-stream/events", params={"token": doc["token"]}),
            ]
            assert [r.status_code for r in refused] == [403, 400, 400, 404]
            assert hub._held == {} and hub.listeners == 0
            for _ in range(200):  # the hub's loop sends the UNSUBSCRIBE when it next wakes
                ((_, n),) = await store.redis.pubsub_numsub(channel)
                if n == 0:
                    break
                await asyncio.sleep(0.01)
            assert n == 0


async def test_settled_waits_in_turn_and_closes_what_it_did_not_wait_for() -> None:
    """shared.background.settled: a connect's reads, started together, awaited one after another."""
    loop = asyncio.get_running_loop()

    async def boom() -> None:
        raise ValueError("no")

    done: asyncio.Future[int] = loop.create_future()
    done.set_result(3)
    out = await settled(done, None, boom())
    assert out[0] == 3 and out[1] is None and isinstance(out[2], ValueError)

    async def one() -> int:
        return 1

    never: asyncio.Future[None] = loop.create_future()
    later: asyncio.Future[None] = loop.create_future()
    not_started = one()
    task = asyncio.ensure_future(settled(never, not_started, later))
    await asyncio.sleep(0)
    task.cancel()  # the request is cancelled (shutdown) while it waits for the first
    with pytest.raises(asyncio.CancelledError):
        await task
    assert inspect.getcoroutinestate(not_started) == inspect.CORO_CLOSED and later.cancelled()


async def first_body(app: Any, path: str, query: str, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes]:
    """Call the ASGI app as a server would: the status, and the first body chunk it sends."""
    sent: list[dict[str, Any]] = []
    first = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays until the test is done
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
        "headers": [(b"host", b"tandem.test"), *(headers or [])], "client": ("127.0.0.1", 5000), "server": ("tandem.test", 80),
    }  # fmt: skip
    task = asyncio.create_task(app(scope, receive, send))
    try:
        await asyncio.wait_for(first.wait(), 5)
    finally:
        task.cancel()
        await asyncio.wait([task])
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = next(m for m in sent if m["type"] == "http.response.body" and m.get("body"))
    return start["status"], body["body"]


async def test_the_first_events_go_out_with_the_head(settings: Settings, store: Store) -> None:
    """A connect reads A's first entries with its checks (before its subscription is confirmed):
    the first body chunk carries them with `meta`, fresh or resumed, nothing repeated."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem.test") as c:
            doc = await create(c)
        sid = doc["id"]
        assert await store.start(sid, "a", "test") == "queued"
        assert await store.start(sid, "b", "test") == "queued"
        await store.append(sid, "a", ["one ", "two ", "three "])
        ids = [eid for eid, _ in await store.read(sid, "a", "0-0", 10)]
        path, query = f"/v1/streams/{sid}/events", f"token={doc['token']}"

        status, body = await first_body(app, path, query)
        msgs, _ = parse_sse(body)
        assert status == 200
        assert [(e, i) for e, i, _ in msgs] == [("meta", None), ("phase", None), *(("delta", f"a-{i}") for i in ids)]

        status, body = await first_body(app, path, query, [(b"last-event-id", f"a-{ids[0]}".encode())])
        msgs, _ = parse_sse(body)
        assert status == 200
        assert [(e, i) for e, i, _ in msgs] == [("meta", None), ("phase", None), *(("delta", f"a-{i}") for i in ids[1:])]


async def test_served_connections_leave_no_garbage_cycle(settings: Settings, store: Store) -> None:
    """The whole events route under a real uvicorn (httptools), with the garbage collector off:
    every connection's objects go by reference counting alone once it is over, whether the client
    left, the stream ended, or the request was refused (a full collection, which the API's GC
    thresholds make rare, would otherwise be the only thing to free them: README, Performance)."""
    from api.feed import Feed
    from api.response import Liveness
    from tests.integration.test_response import serving

    def alive(kind: type) -> int:
        return sum(type(o) is kind for o in gc.get_objects())

    app = create_app(settings.model_copy(update={"sse_ping_s": 60.0}))
    gc.collect()
    gc.disable()
    try:
        async with app.router.lifespan_context(app), serving(app) as port:
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base) as c:
                doc = await create(c)
                sid, token = doc["id"], doc["token"]
                await store.start(sid, "a", "test")
                await store.start(sid, "b", "test")
                await store.append(sid, "a", ["one ", "two "])
                path = f"/v1/streams/{sid}/events?token={token}"

                async def get(headers: str = "") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode())
                    await writer.drain()
                    return reader, writer

                async with asyncio.timeout(20):
                    leaves, leaves_w = await get()
                    await leaves.readuntil(b"event: delta")
                    leaves_w.transport.abort()  # the client leaves mid-stream
                    refused, refused_w = await get("Last-Event-ID: not-an-id\r\n")
                    assert (await refused.readuntil(b"\r\n")).startswith(b"HTTP/1.1 400")
                    refused_w.close()
                    reads, reads_w = await get()
                    await reads.readuntil(b"event: delta")
                    await store.finish(sid, ["a"], done_fields(2))
                    await store.finish(sid, ["b"], done_fields(0))
                    await reads.readuntil(b"event: end")
                    reads_w.close()
                    while alive(Liveness) or alive(Feed):  # noqa: ASYNC110 (counts, nothing to wait on)
                        await asyncio.sleep(0.02)
    finally:
        gc.enable()
