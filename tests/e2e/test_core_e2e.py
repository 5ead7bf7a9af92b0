"""The core contract on real processes: two `tandem api`, two `tandem worker`, a real Redis."""

from __future__ import annotations

import itertools
import random
import statistics
import threading
import time
from typing import Any

import httpx
import pytest

from tests.client import Run, create, read_events
from tests.harness import Stack

pytestmark = pytest.mark.e2e


def body(a: dict[str, Any], b: dict[str, Any], slow: int = 200, b_spacing: int = 0, prompt: str = "hello") -> dict[str, Any]:
    return {
        "prompt": prompt,
        "a": {"task": "simulated", "options": a},
        "b": {"task": "simulated", "options": b},
        "pacing": {"slow_interval_ms": slow, "b_interval_ms": b_spacing},
    }


def entry_ms(event_id: str) -> float:
    """Wall-clock ms at which the worker wrote this entry (a Redis stream id's first part)."""
    return float(event_id.split("-")[1])


def status(base: str, handles: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(base + handles["status_url"], timeout=10).json()
    return doc


def check_shape(run: Run) -> None:
    """Contract invariants on one complete connection."""
    kinds = [e.event for e in run.events]
    assert kinds[0] == "meta"
    assert kinds[-1] == "end"
    with_id = [e for e in run.events if e.event in ("delta", "done", "error", "end")]
    assert all(e.id for e in with_id)
    assert all(e.id is None for e in run.events if e.event in ("meta", "phase"))
    sources = [e.data.get("source") for e in with_id if e.event != "end"]
    assert sources == sorted(sources), "all of A's events come before all of B's"
    for src in ("a", "b"):
        terminals = [e for e in with_id if e.event in ("done", "error") and e.data["source"] == src]
        assert len(terminals) == 1, f"{src} ends with exactly one done or error"
    ids = [e.id for e in with_id]
    assert len(ids) == len(set(ids))


def test_paced_flush_then_b(live: Stack) -> None:
    """A: 40 tokens every 20 ms; B completes after 1.5 s; slow interval 200 ms."""
    base = live.apis[0].url
    h = create(base, body({"tokens": 40, "interval_ms": 20}, {"delay_ms": 1500, "text": "Sources: one two three"}, slow=200))
    run = read_events(base, h["events_url"])
    check_shape(run)
    st = status(base, h)
    assert run.text("a") == st["a"]["text"] and run.text("b") == st["b"]["text"] == "Sources: one two three"
    b_done = next(e for e in run.events if e.event == "done" and e.data["source"] == "b")
    b_completed_ms = entry_ms(b_done.id or "")
    # Client receipt times in wall-clock ms (monotonic offset to wall clock, measured once).
    offset = time.time() * 1000 - time.monotonic() * 1000
    a_deltas = [e for e in run.events if e.event == "delta" and e.data["source"] == "a"]
    before = [e for e in a_deltas if e.t * 1000 + offset < b_completed_ms]
    after = [e for e in a_deltas if e.t * 1000 + offset >= b_completed_ms]
    gaps = [(y.t - x.t) * 1000 for x, y in itertools.pairwise(before)]
    print(f"\nslow phase: {len(before)} A deltas, min gap {min(gaps):.1f} ms; backlog {len(after)} deltas")
    assert len(before) >= 5
    assert min(gaps) >= 190, "A is spaced by the slow interval while B runs"
    flush_lag = [(e.t * 1000 + offset) - b_completed_ms for e in after]
    print(f"flush: first backlog delta {flush_lag[0]:.1f} ms after B completed, last {max(flush_lag):.1f} ms")
    assert len(after) >= 20
    assert max(flush_lag[: len(after) // 2]) < 100, "the backlog is flushed at once, not paced"
    phases = [e.data["phase"] for e in run.of("phase")]
    assert phases[:2] == ["slow", "flush"] and phases[-1] == "b"
    kinds = [e.event for e in run.events if e.event != "phase"]
    assert kinds.index("end") == len(kinds) - 1
    assert run.of("end")[0].data == {"status": "completed"}


def test_a_ends_before_b(live: Stack) -> None:
    base = live.apis[1].url
    h = create(base, body({"tokens": 4, "interval_ms": 10}, {"delay_ms": 1200, "tokens": 5, "interval_ms": 10}, slow=100))
    run = read_events(base, h["events_url"])
    check_shape(run)
    assert [e.data["phase"] for e in run.of("phase")] == ["slow", "waiting", "b"]
    a_done = next(e for e in run.events if e.event == "done" and e.data["source"] == "a")
    first_b = next(e for e in run.events if e.event == "delta" and e.data["source"] == "b")
    assert first_b.t - a_done.t > 0.7, "the stream waits for B after A is done"
    assert run.of("end")[0].data["status"] == "completed"
    assert a_done.data["tokens"] == 4


def test_b_fails(live: Stack) -> None:
    base = live.apis[0].url
    h = create(base, body({"tokens": 30, "interval_ms": 20}, {"delay_ms": 500, "tokens": 5, "interval_ms": 0, "fail_after": 2}))
    run = read_events(base, h["events_url"])
    check_shape(run)
    err = run.of("error")[0]
    assert err.data["source"] == "b" and err.data["code"] == "task_failed"
    assert "flush" in [e.data["phase"] for e in run.of("phase")], "B's failure completes B: A flushes"
    assert run.text("b") == status(base, h)["b"]["text"] and len(run.text("b")) > 0
    assert run.of("end")[0].data["status"] == "failed"
    assert status(base, h)["status"] == "failed"


def test_a_fails(live: Stack) -> None:
    base = live.apis[1].url
    h = create(base, body({"tokens": 30, "interval_ms": 5, "fail_after": 5}, {"delay_ms": 200, "text": "B text"}, slow=50))
    run = read_events(base, h["events_url"])
    check_shape(run)
    err = run.of("error")[0]
    assert err.data == {"source": "a", "code": "task_failed", "message": "simulated failure after 5 tokens"}
    assert run.text("a") == status(base, h)["a"]["text"]
    assert run.text("b") == "B text", "B still follows a failed A"
    assert run.of("end")[0].data["status"] == "failed"
    assert status(base, h)["a"]["error"]["code"] == "task_failed"


def test_cancel(live: Stack) -> None:
    base = live.apis[0].url
    h = create(base, body({"tokens": 200, "interval_ms": 20}, {"delay_ms": 30_000, "text": "never"}))
    first = read_events(base, h["events_url"], stop_after=3)
    t0 = time.monotonic()
    r = httpx.delete(base + h["status_url"], timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    run = read_events(live.apis[1].url, h["events_url"], first.last_id)
    print(f"\ncancel: end received {(time.monotonic() - t0) * 1000:.0f} ms after DELETE")
    errors = run.of("error")
    assert [(e.data["source"], e.data["code"]) for e in errors] == [("a", "cancelled"), ("b", "cancelled")]
    assert run.of("end")[0].data["status"] == "cancelled"
    st = status(base, h)
    assert st["status"] == "cancelled" and st["a"]["state"] == st["b"]["state"] == "cancelled"
    tokens = st["a"]["tokens"]
    time.sleep(0.6)
    assert status(base, h)["a"]["tokens"] == tokens, "the worker stopped writing"


def _resume_until_end(live: Stack, h: dict[str, Any], rng: random.Random, header: bool) -> tuple[list[Any], int]:
    received: list[Any] = []
    last: str | None = None
    connections = 0
    while True:
        api = live.apis[connections % len(live.apis)]
        run = read_events(api.url, h["events_url"], last, stop_after=rng.randint(1, 6), header=header)
        connections += 1
        if run.status == 204:
            return received, connections
        assert run.status == 200
        received += [e for e in run.events if e.id is not None]
        last = run.last_id
        if run.ended:
            # A reconnect after `end` gets 204, so an EventSource stops.
            again = read_events(live.apis[connections % 2].url, h["events_url"], last, header=header)
            assert again.status == 204
            return received, connections


@pytest.mark.parametrize("header", [True, False], ids=["header", "query"])
def test_resume_across_replicas_exactly_once(live: Stack, header: bool) -> None:
    rng = random.Random(7 if header else 8)
    base = live.apis[0].url
    h = create(base, body({"tokens": 30, "interval_ms": 15}, {"delay_ms": 400, "tokens": 8, "interval_ms": 10}, slow=50))
    received, connections = _resume_until_end(live, h, rng, header)
    ids = [e.id for e in received]
    assert len(ids) == len(set(ids)), "no event twice"
    st = status(base, h)
    text = {s: "".join(e.data["text"] for e in received if e.event == "delta" and e.data["source"] == s) for s in "ab"}
    assert text["a"] == st["a"]["text"] and text["b"] == st["b"]["text"]
    assert [e.event for e in received][-1] == "end"
    assert len([e for e in received if e.event == "delta"]) == st["a"]["tokens"] + st["b"]["tokens"]
    print(f"\nresume ({'header' if header else 'query'}): {len(received)} events over {connections} connections")


def test_serving_api_killed_mid_stream(live: Stack) -> None:
    victim, other = live.apis
    h = create(victim.url, body({"tokens": 60, "interval_ms": 20}, {"delay_ms": 600, "text": "B after kill"}, slow=100))
    holder: dict[str, Run] = {}

    def reader() -> None:  # a connection open on the victim when it dies
        try:
            holder["run"] = read_events(victim.url, h["events_url"])
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=reader)
    first = read_events(victim.url, h["events_url"], stop_after=4)
    partial = [e for e in first.events if e.id]
    t.start()
    time.sleep(0.3)
    victim.kill()
    t.join(10)
    assert not ("run" in holder and holder["run"].ended), "the kill came mid-stream, before `end` on the victim"
    run = read_events(other.url, h["events_url"], first.last_id)
    assert run.status == 200 and run.ended
    got = partial + [e for e in run.events if e.id]
    st = status(other.url, h)
    assert "".join(e.data["text"] for e in got if e.event == "delta" and e.data["source"] == "a") == st["a"]["text"]
    assert len({e.id for e in got}) == len(got)
    assert run.of("end")[0].data["status"] == "completed"


def test_kill_while_reading(live: Stack) -> None:
    """The connection that is actually streaming is on the killed process; resume on the other."""
    victim, other = live.apis
    h = create(victim.url, body({"tokens": 50, "interval_ms": 20}, {"delay_ms": 800, "text": "done"}, slow=100))
    got: list[Any] = []
    last: list[str | None] = [None]
    broke = threading.Event()

    def reader() -> None:
        import orjson

        from tests.client import parse_sse

        with httpx.Client(timeout=httpx.Timeout(10.0, read=30)) as c, c.stream("GET", victim.url + h["events_url"]) as r:
            buf = b""
            try:
                for chunk in r.iter_raw():
                    buf += chunk
                    msgs, buf = parse_sse(buf)
                    for event, eid, data in msgs:
                        if eid:
                            got.append((event, eid, orjson.loads(data)))
                            last[0] = eid
            except httpx.HTTPError:
                pass
        broke.set()

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.5)
    assert got, "reading before the kill"
    victim.kill()
    assert broke.wait(10), "the client notices the dead replica"
    t.join(5)
    before = len(got)
    run = read_events(other.url, h["events_url"], last[0])
    got += [(e.event, e.id, e.data) for e in run.events if e.id]
    st = status(other.url, h)
    a_text = "".join(d["text"] for ev, _, d in got if ev == "delta" and d["source"] == "a")
    assert a_text == st["a"]["text"]
    assert len({eid for _, eid, _ in got}) == len(got)
    print(f"\nSIGKILL mid-stream: {before} events before the kill, {len(got) - before} after resuming on the other replica")


def test_204_after_end(live: Stack) -> None:
    base = live.apis[0].url
    h = create(base, body({"tokens": 3, "interval_ms": 0}, {"tokens": 1, "interval_ms": 0}, slow=0))
    run = read_events(base, h["events_url"])
    assert run.ended and run.last_id == "end"
    for api in live.apis:
        r = httpx.get(api.url + h["events_url"], headers={"Last-Event-ID": "end"}, timeout=10)
        assert r.status_code == 204
    # Without Last-Event-ID a finished stream replays from the beginning.
    again = read_events(live.apis[1].url, h["events_url"])
    assert [e.id for e in again.events if e.id] == [e.id for e in run.events if e.id]


def test_flush_reaction_over_50_runs(live: Stack) -> None:
    """Flush reaction: B's completion (its `done` entry's write time) -> first flushed A delta at the client."""
    base = live.apis[0].url
    offset = time.time() * 1000 - time.monotonic() * 1000
    lags: list[float] = []
    for i in range(50):
        h = create(
            base, body({"tokens": 30, "interval_ms": 10}, {"delay_ms": 150 + (i % 7) * 13, "tokens": 1, "interval_ms": 0}, slow=100)
        )
        run = read_events(base, h["events_url"])
        b_done_ms = entry_ms(next(e for e in run.events if e.event == "done" and e.data["source"] == "b").id or "")
        flushed = [e for e in run.events if e.event == "delta" and e.data["source"] == "a" and e.t * 1000 + offset >= b_done_ms]
        assert flushed, "A still had a backlog when B completed"
        lags.append(flushed[0].t * 1000 + offset - b_done_ms)
    lags.sort()
    p50, p99 = statistics.median(lags), lags[int(len(lags) * 0.99) - 1]
    print(f"\nflush reaction over {len(lags)} runs: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {lags[-1]:.2f} ms")
    assert p50 < 50
