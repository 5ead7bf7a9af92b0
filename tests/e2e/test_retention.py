"""Retention and caps on real processes (issue 3, scenario 7): a finished stream is 404 and its keys
are gone after TANDEM_RETENTION_S; the `streams` index and the `running` set do not keep it; a
source that reaches TANDEM_MAX_SOURCE_EVENTS ends with `too_long`; Redis memory after 1,000 streams
and their retention is back where it started."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from shared.keys import Keys
from shared.redis_server import RedisServer
from tests.client import create, read_events
from tests.harness import stack

pytestmark = pytest.mark.e2e


def body(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": "retention", "a": {"task": "simulated", "options": a}, "b": {"task": "simulated", "options": b},
            "pacing": {"slow_interval_ms": 0, "b_interval_ms": 0}}


def stream_keys(r: Redis, prefix: str, stream_id: str) -> list[bytes]:
    return list(r.scan_iter(match=f"{prefix}:{{{stream_id}}}:*", count=1000))


def wait_for(what: str, check: Any, timeout: float, every: float = 0.05) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout}s"
        time.sleep(every)
    return time.monotonic() - t0


def test_finished_stream_expires_and_leaves_nothing(tmp_path: Path, redis_server: RedisServer) -> None:
    retention = 2
    with stack(tmp_path, redis_server, apis=1, workers=1, TANDEM_RETENTION_S=str(retention)) as s:
        base = s.apis[0].url
        r = Redis.from_url(redis_server.url)
        k = Keys(s.prefix)
        h = create(base, body({"tokens": 10, "interval_ms": 5}, {"text": "b"}))
        run = read_events(base, h["events_url"])
        assert run.ended
        t_end = time.monotonic()
        assert httpx.get(base + h["status_url"], timeout=5).status_code == 200
        assert stream_keys(r, s.prefix, h["id"]) and r.zscore(k.index, h["id"]) is not None
        wait_for("404", lambda: httpx.get(base + h["status_url"], timeout=5).status_code == 404, retention + 5)
        gone = time.monotonic() - t_end
        events = httpx.get(base + h["events_url"], timeout=5)
        keys_left = stream_keys(r, s.prefix, h["id"])
        trimmed = wait_for("index trimmed", lambda: r.zscore(k.index, h["id"]) is None, 10)
        jobs = [f"arq:{kind}:{k.job_id(h['id'], src)}" for kind in ("job", "result", "in-progress", "retry") for src in ("a", "b")]
        print(f"\nTANDEM_RETENTION_S={retention}: status 404 {gone:.2f} s after `end`; index entry dropped "
              f"{trimmed:.2f} s later; keys left {keys_left}; arq keys left {r.exists(*jobs)}")
        assert retention - 0.2 <= gone <= retention + 3
        assert events.status_code == 404
        assert keys_left == []
        assert r.zscore(k.running, f"{h['id']}:a") is None and r.zscore(k.running, f"{h['id']}:b") is None
        assert r.exists(*jobs) == 0, "arq keeps a job's result no longer than the stream"


def test_source_reaching_max_events_ends_too_long(tmp_path: Path, redis_server: RedisServer) -> None:
    cap = 10
    with stack(tmp_path, redis_server, apis=1, workers=1, TANDEM_MAX_SOURCE_EVENTS=str(cap)) as s:
        base = s.apis[0].url
        h = create(base, body({"tokens": 50, "interval_ms": 5}, {"delay_ms": 300, "text": "b after"}))
        run = read_events(base, h["events_url"])
        st = httpx.get(base + h["status_url"], timeout=5).json()
        a_deltas = [e for e in run.events if e.event == "delta" and e.data["source"] == "a"]
        err = [e for e in run.events if e.event == "error"]
        print(f"\nTANDEM_MAX_SOURCE_EVENTS={cap}: A sent {len(a_deltas)} deltas then {err[0].data['code'] if err else None}; "
              f"B {st['b']['state']}; end {run.of('end')[0].data}")
        assert len(a_deltas) == cap - 1 and len(err) == 1 and err[0].data["source"] == "a"
        assert err[0].data["code"] == "too_long" and "TANDEM_MAX_SOURCE_EVENTS" in err[0].data["message"]
        assert st["a"]["tokens"] == cap - 1 and st["a"]["text"] == run.text("a")
        assert st["b"]["state"] == "done" and run.text("b") == "b after"
        assert run.of("end")[0].data == {"status": "failed"}


def memory(r: Redis) -> tuple[int, int]:
    """(used_memory without what client connections hold, connected_clients). The workers' pools
    keep however many connections a burst needed (more in one round than another), and each
    holds buffers: that is not the data tandem leaves behind."""
    info = r.info("memory")
    return int(info["used_memory"]) - int(info["mem_clients_normal"]), int(r.info("clients")["connected_clients"])


def settled(r: Redis) -> tuple[int, int]:
    """The lowest of a few samples: client buffers come and go with the heartbeats' commands."""
    samples = []
    for _ in range(6):
        time.sleep(0.25)
        samples.append(memory(r))
    return min(samples)


def test_memory_returns_after_retention(tmp_path: Path) -> None:
    """1,000 streams through the API and two workers, twice: memory after each round's retention is
    back where it started, up to what Redis keeps once it has served a burst (more pooled client
    connections, the scripts cache): the same after the second round, so nothing accumulates."""
    retention, n = 15, 1000
    redis = RedisServer(tmp_path / "redis", appendonly=False).start()
    try:
        with stack(tmp_path, redis, apis=1, workers=2, TANDEM_RETENTION_S=str(retention)) as s:
            base = s.apis[0].url
            r = Redis.from_url(redis.url)
            k = Keys(s.prefix)
            time.sleep(1.5)  # workers and the API have written their heartbeats
            keys0, (mem0, clients0) = r.dbsize(), settled(r)
            payload = body({"text": "one two three four five", "interval_ms": 0}, {"text": "b"})
            rounds: list[tuple[int, int, int, int]] = []
            for rnd in (1, 2):
                t0 = time.monotonic()
                with ThreadPoolExecutor(8) as pool, httpx.Client(timeout=10) as c:
                    ids = list(pool.map(lambda _: c.post(base + "/v1/streams", json=payload).json()["id"], range(n)))
                created = time.monotonic() - t0

                def all_done(ids: list[str] = ids) -> bool:
                    with r.pipeline(transaction=False) as p:
                        for sid in ids:
                            p.hget(k.meta(sid), "status")
                        return all(v == b"completed" for v in p.execute())

                wait_for(f"round {rnd}: {n} streams completed", all_done, retention - created - 1, every=0.2)
                done = time.monotonic() - t0
                mem1, clients1 = memory(r)
                assert r.dbsize() >= keys0 + 3 * n and r.zcard(k.index) == n

                # Besides what was there, only each worker's count of appended deltas (one small key
                # per worker process, refreshed by its writes: shared/store.py) stays.
                def counters() -> int:
                    return sum(1 for _ in r.scan_iter(match=f"{s.prefix}:appended:*"))

                wait_for("keys expired", lambda: r.dbsize() <= keys0 + counters(), retention + 30, every=0.5)
                assert counters() <= 2
                wait_for("index trimmed", lambda: r.zcard(k.index) == 0, 30, every=0.2)
                expired = time.monotonic() - t0
                mem2, clients2 = settled(r)
                rounds.append((mem1, mem2, clients1, clients2))
                print(f"\nround {rnd}: {n} streams created in {created:.1f} s, completed by {done:.1f} s, all expired and "
                      f"unindexed by {expired:.1f} s (TANDEM_RETENTION_S={retention})\n  used_memory less client buffers: before {mem0} / after "
                      f"{mem1} (+{mem1 - mem0}) / after retention {mem2} ({mem2 - mem0:+d}); clients {clients0} / {clients1} / {clients2}")
                assert r.dbsize() <= keys0 + counters() and r.zcard(k.running) == 0
                assert sum(1 for _ in r.scan_iter(match=f"{s.prefix}:{{*", count=1000)) == 0
                assert sum(1 for _ in r.scan_iter(match="arq:*", count=1000)) == 0
            (peak1, rest1, _, clients), (_, rest2, _, _) = rounds
            extra = clients - clients0  # connections the pools opened for the burst and keep
            print(f"  residue after retention: round 1 {rest1 - mem0:+d} B ({(rest1 - mem0) / (peak1 - mem0):.1%} of the "
                  f"growth; {extra} more pooled connections, {(rest1 - mem0) / max(extra, 1) / 1024:.1f} KiB each), "
                  f"round 2 {rest2 - mem0:+d} B")
            assert peak1 - mem0 > 5_000_000, "the streams did take memory"
            assert rest1 - mem0 < extra * 32 * 1024 + 64 * 1024, "back where it started, but for the extra connections"
            assert abs(rest2 - rest1) < 128 * 1024, "a second round leaves nothing more (< 131 B a stream): no unbounded growth"
    finally:
        redis.stop()
