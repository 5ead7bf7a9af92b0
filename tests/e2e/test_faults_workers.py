"""Worker-side faults on real processes (issue 3, scenarios 2 and 6, and Redis restarts):

- a worker SIGKILLed mid-source: its lease expires, a sweeper ends the source with `worker_lost`
  within TANDEM_LEASE_S, B and `end` follow, and arq's later re-run of the job writes nothing;
- a worker SIGTERMed mid-source: sources that finish within TANDEM_WORKER_DRAIN_S finish normally,
  the others end with `worker_lost` ("worker shut down");
- a dropped SSE connection never stops generation; DELETE stops the running task within 1 s,
  measured at the task; TANDEM_ORPHAN_S cancels streams nobody reads;
- the worker outlives a Redis restart: a short outage loses nothing, a long one ends the in-flight
  source with `worker_lost`, and new streams run as soon as Redis is back.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis import Redis

from shared.keys import Keys
from shared.redis_server import RedisServer
from tests.client import Received, Run, create, read_events, received
from tests.harness import Proc, Stack, stack, wait_ready
from tests.tasks_probe import records

pytestmark = pytest.mark.e2e

PROBE = '["tests.tasks_probe:TASK"]'


class LiveReader(threading.Thread):
    """Reads one SSE stream in a thread; `events` fills as they arrive (monotonic receipt times)."""

    def __init__(self, base: str, events_url: str, last_id: str | None = None, stop_after: int | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.last_id, self.stop_after = base + events_url, last_id, stop_after
        self.events: list[Received] = []
        self.status = 0
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        counted = 0
        try:
            with httpx.Client(timeout=httpx.Timeout(10.0, read=60.0)) as c, c.stream("GET", self.url, headers=headers) as r:
                self.status = r.status_code
                for ev in received(r):
                    self.events.append(ev)
                    if ev.id is not None:
                        self.last_id = ev.id
                        counted += 1
                    if ev.event == "end" or (self.stop_after is not None and counted >= self.stop_after):
                        return
        except BaseException as e:  # surfaced by the test
            self.error = e

    def first(self, event: str, source: str | None = None, timeout: float = 30.0) -> Received:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in list(self.events):
                if e.event == event and (source is None or e.data.get("source") == source):
                    return e
            if not self.is_alive() and self.error is not None:
                raise AssertionError(f"reader failed: {self.error!r}")
            time.sleep(0.005)
        raise AssertionError(f"no {event} {source or ''} within {timeout}s; got {[e.event for e in self.events]}")

    def deltas(self, source: str) -> int:
        return sum(1 for e in list(self.events) if e.event == "delta" and e.data["source"] == source)

    def wait_deltas(self, source: str, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.deltas(source) < n:
            assert time.monotonic() < deadline, f"fewer than {n} {source} deltas in {timeout}s"
            time.sleep(0.005)

    def text(self, source: str) -> str:
        return "".join(e.data["text"] for e in self.events if e.event == "delta" and e.data["source"] == source)

    def finish(self, timeout: float = 60.0) -> Run:
        self.join(timeout)
        assert not self.is_alive(), "reader did not finish"
        run = Run(self.status, list(self.events), self.last_id, any(e.event == "end" for e in self.events))
        return run


def body(a: dict[str, Any], b: dict[str, Any], a_task: str = "simulated", b_task: str = "simulated", slow: int = 0) -> dict[str, Any]:
    return {
        "prompt": "faults",
        "a": {"task": a_task, "options": a},
        "b": {"task": b_task, "options": b},
        "pacing": {"slow_interval_ms": slow, "b_interval_ms": 0},
    }


def status(base: str, h: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(base + h["status_url"], timeout=10).json()
    return doc


def wait_status(base: str, h: dict[str, Any], done: set[str], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = status(base, h)
        if st["status"] in done:
            return st
        assert time.monotonic() < deadline, f"status still {st['status']} after {timeout}s"
        time.sleep(0.05)


def worker_of(r: Redis, s: Stack, stream_id: str, source: str) -> Proc:
    """The worker process running a source (its pid is in the meta `<src>_worker` field)."""
    wid = r.hget(Keys(s.prefix).meta(stream_id), f"{source}_worker")
    assert wid, "source not started"
    pid = int(wid.decode().split(":")[-2])
    return next(w for w in s.workers if w.popen.pid == pid)


def job_result(r: Redis, s: Stack, stream_id: str, source: str, timeout: float) -> dict[str, Any]:
    """Wait for arq's stored result of a source's job (the job_id is derived from the stream)."""
    key = "arq:result:" + Keys(s.prefix).job_id(stream_id, source)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while (raw := r.get(key)) is None:
        assert time.monotonic() < deadline, f"arq did not run {key} within {timeout}s"
        time.sleep(0.05)
    doc: dict[str, Any] = orjson.loads(raw)
    return doc


def check_consistent(run: Run, st: dict[str, Any]) -> None:
    kinds = [e.event for e in run.events]
    assert kinds[-1] == "end", kinds[-5:]
    for src in ("a", "b"):
        terminals = [e for e in run.events if e.event in ("done", "error") and e.data.get("source") == src]
        assert len(terminals) == 1, f"{src}: {terminals}"
        assert run.text(src) == st[src]["text"], f"{src}: what the reader got is the stored text"
    ids = [e.id for e in run.events if e.id]
    assert len(ids) == len(set(ids))


# -- scenario 2: a worker dies -----------------------------------------------------------------


@pytest.mark.parametrize("lease_s", [2.0, 10.0])
def test_sigkill_mid_source_ends_with_worker_lost(tmp_path: Path, redis_server: RedisServer, lease_s: float) -> None:
    """Two workers taking one job each, so A and B run on different processes; A's is SIGKILLed."""
    with stack(tmp_path, redis_server, apis=1, workers=2, TANDEM_LEASE_S=str(lease_s), TANDEM_WORKER_MAX_JOBS="1") as s:
        base = s.apis[0].url
        r = Redis.from_url(redis_server.url)
        b_delay = (lease_s + 2) * 1000
        h = create(base, body({"tokens": 2000, "interval_ms": 20}, {"delay_ms": b_delay, "text": "B after the loss"}))
        reader = LiveReader(base, h["events_url"])
        reader.wait_deltas("a", 5)
        victim = worker_of(r, s, h["id"], "a")
        assert worker_of(r, s, h["id"], "b") is not victim
        victim.kill()
        t_kill = time.monotonic()
        lost = reader.first("error", "a", timeout=lease_s + 10)
        detect = lost.t - t_kill
        run = reader.finish()
        st = status(base, h)
        print(f"\nSIGKILL (TANDEM_LEASE_S={lease_s:g}): worker_lost at the reader {detect:.2f} s after the kill "
              f"(bound 0.9 x lease = {0.9 * lease_s:.1f} s); A kept {len(run.text('a').split())} tokens; "
              f"B done {run.of('done')[-1].t - t_kill:.2f} s after the kill")
        assert lost.data["code"] == "worker_lost"
        assert detect <= lease_s + 0.5, "the loss is noticed within TANDEM_LEASE_S"
        check_consistent(run, st)
        assert st["a"]["error"]["code"] == "worker_lost" and st["a"]["state"] == "failed"
        assert st["b"]["state"] == "done" and st["b"]["text"] == "B after the loss"
        assert run.of("end")[0].data["status"] == "failed" and st["status"] == "failed"

        # The job left arq's queue when its source started, so arq never runs it again by itself.
        # A job that does run again (one killed after arq claimed it, before its source started, is
        # still queued) must write nothing: put it back, release it, and let the survivor run it.
        k = Keys(s.prefix)
        job_id = k.job_id(h["id"], "a")
        assert r.zscore(s.env["TANDEM_QUEUE_NAME"], job_id) is None
        xlen = r.xlen(k.events(h["id"], "a"))
        r.zadd(s.env["TANDEM_QUEUE_NAME"], {job_id: 1})
        r.delete("arq:in-progress:" + job_id)
        again = job_result(r, s, h["id"], "a", timeout=15)
        print(f"arq re-ran the job (try {again['t']}): returned {again['r']!r}, A entries {xlen} -> {r.xlen(k.events(h['id'], 'a'))}")
        assert again["t"] == 2 and again["r"] == "failed"
        assert r.xlen(k.events(h["id"], "a")) == xlen
        assert status(base, h)["a"] == st["a"]
        assert r.zscore(k.running, f"{h['id']}:a") is None and not r.exists(k.lease(h["id"], "a"))


def test_sigterm_drains_then_ends_the_rest_with_worker_lost(tmp_path: Path, redis_server: RedisServer) -> None:
    drain = 3.0
    with stack(tmp_path, redis_server, apis=1, workers=1, TANDEM_WORKER_DRAIN_S=str(drain)) as s:
        base = s.apis[0].url
        r = Redis.from_url(redis_server.url)
        short = create(base, body({"tokens": 40, "interval_ms": 50}, {"text": "b1"}))  # 2 s of A
        long = create(base, body({"tokens": 400, "interval_ms": 50}, {"text": "b2"}))  # 20 s of A
        rs, rl = LiveReader(base, short["events_url"]), LiveReader(base, long["events_url"])
        rs.wait_deltas("a", 3)
        rl.wait_deltas("a", 3)
        t0 = time.monotonic()
        exit_s = s.workers[0].term(timeout=drain + 15)
        run_s, run_l = rs.finish(), rl.finish()
        st_s, st_l = status(base, short), status(base, long)
        done_s = next(e for e in run_s.events if e.event == "done" and e.data["source"] == "a").t - t0
        lost = next(e for e in run_l.events if e.event == "error" and e.data["source"] == "a")
        print(f"\nSIGTERM (drain {drain:g} s): short A done {done_s:.2f} s after the signal; long A worker_lost "
              f"{lost.t - t0:.2f} s after it ({len(run_l.text('a').split())} tokens kept); worker exited in {exit_s:.2f} s")
        assert s.workers[0].popen.returncode == 0
        assert st_s["status"] == "completed" and st_s["a"]["tokens"] == 40
        check_consistent(run_s, st_s)
        assert lost.data == {"source": "a", "code": "worker_lost", "message": "worker shut down"}
        assert st_l["status"] == "failed" and st_l["b"]["state"] == "done"
        check_consistent(run_l, st_l)
        assert drain - 0.3 <= lost.t - t0 <= drain + 3, "running sources get the drain time, then end"
        assert exit_s <= drain + 5

        # arq does not run the cancelled job again: it left the queue when its source started (and
        # arq only releases a cancelled job, counting on it being queued still). Were it queued
        # again, another worker would run it, and write nothing.
        k = Keys(s.prefix)
        job_id = k.job_id(long["id"], "a")
        assert r.zscore(s.env["TANDEM_QUEUE_NAME"], job_id) is None
        xlen = r.xlen(k.events(long["id"], "a"))
        r.zadd(s.env["TANDEM_QUEUE_NAME"], {job_id: 1})
        s.start_worker()
        again = job_result(r, s, long["id"], "a", timeout=20)
        print(f"the cancelled job, queued again, re-ran on a new worker (try {again['t']}): returned {again['r']!r}")
        assert again["r"] == "failed" and r.xlen(k.events(long["id"], "a")) == xlen


# -- scenario 6: drop versus stop --------------------------------------------------------------


def test_dropped_connection_never_stops_generation(tmp_path: Path, redis_server: RedisServer) -> None:
    with stack(tmp_path, redis_server, apis=1, workers=1) as s:
        base = s.apis[0].url
        text = "".join(f"w{i} " for i in range(60))
        h = create(base, body({"text": text, "interval_ms": 30}, {"delay_ms": 300, "text": "b"}, slow=100))
        t0 = time.monotonic()
        first = read_events(base, h["events_url"], stop_after=2)
        assert len([e for e in first.events if e.id]) == 2
        st = wait_status(base, h, {"completed", "failed", "cancelled"})
        print(f"\ndropped after 2 events; the stream completed {time.monotonic() - t0:.2f} s later with "
              f"{st['a']['tokens']} A tokens and nobody reading")
        assert st["status"] == "completed" and st["a"]["text"] == text and st["a"]["tokens"] == 60
        assert st["b"]["text"] == "b"


def test_delete_stops_the_running_task_within_1s(tmp_path: Path, redis_server: RedisServer) -> None:
    rec_a, rec_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with stack(tmp_path, redis_server, apis=1, workers=1, TANDEM_TASKS=PROBE) as s:
        base = s.apis[0].url
        r = Redis.from_url(redis_server.url)
        h = create(base, body({"record": str(rec_a), "tokens": 10_000, "interval_ms": 20},
                              {"record": str(rec_b), "delay_ms": 600_000}, a_task="probe", b_task="probe"))
        reader = LiveReader(base, h["events_url"])
        reader.wait_deltas("a", 5)
        deadline = time.monotonic() + 10
        while len(records(rec_b)) < 1:
            assert time.monotonic() < deadline, "B did not start"
            time.sleep(0.02)
        t_delete = time.time()
        resp = httpx.delete(base + h["status_url"], timeout=10)
        assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
        stops: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 5
        while len(stops) < 2 and time.monotonic() < deadline:
            for src, path in (("a", rec_a), ("b", rec_b)):
                ends = [x for x in records(path) if x["event"] != "started"]
                if ends:
                    stops[src] = ends[0]
            time.sleep(0.01)
        run = reader.finish()
        k = Keys(s.prefix)
        xlen = r.xlen(k.events(h["id"], "a"))
        time.sleep(0.5)
        lat = {src: float(x["t"]) - t_delete for src, x in stops.items()}  # type: ignore[arg-type]
        print(f"\nDELETE -> task stopped: A {lat.get('a', -1) * 1000:.0f} ms ({stops.get('a', {}).get('event')}), "
              f"B {lat.get('b', -1) * 1000:.0f} ms ({stops.get('b', {}).get('event')}) after the request was sent")
        assert set(stops) == {"a", "b"}, "both tasks were stopped"
        assert all(x["event"] == "CancelledError" for x in stops.values())
        assert max(lat.values()) < 1.0
        assert run.of("end")[0].data["status"] == "cancelled"
        assert r.xlen(k.events(h["id"], "a")) == xlen, "nothing written after the cancel"


def test_orphans_are_cancelled_readers_are_not(tmp_path: Path, redis_server: RedisServer) -> None:
    orphan_s = 2.0
    with stack(tmp_path, redis_server, apis=1, workers=1, TANDEM_ORPHAN_S=str(orphan_s), TANDEM_LEASE_S="2") as s:
        base = s.apis[0].url
        long_a = {"tokens": 1000, "interval_ms": 20}
        unread = create(base, body(long_a, {"text": "b"}))
        t_unread = time.monotonic()
        read = create(base, body({"tokens": 250, "interval_ms": 20}, {"text": "b"}))  # 5 s > orphan_s
        reader = LiveReader(base, read["events_url"])
        dropped = create(base, body(long_a, {"text": "b"}))
        read_events(base, dropped["events_url"], stop_after=75)  # ~1.5 s: long enough to be counted as read
        t_drop = time.monotonic()

        st_u = wait_status(base, unread, {"cancelled"}, timeout=15)
        u_after = time.monotonic() - t_unread
        st_d = wait_status(base, dropped, {"cancelled"}, timeout=15)
        d_after = time.monotonic() - t_drop
        run = reader.finish()
        st_r = status(base, read)
        print(f"\norphans (TANDEM_ORPHAN_S={orphan_s:g}): never read -> cancelled {u_after:.2f} s after create; "
              f"dropped -> cancelled {d_after:.2f} s after the drop; read throughout (5 s) -> {st_r['status']}")
        assert st_u["a"]["error"]["code"] == "cancelled" and "TANDEM_ORPHAN_S" in st_u["a"]["error"]["message"]
        assert orphan_s - 0.1 <= u_after <= orphan_s + 3 and orphan_s - 0.1 <= d_after <= orphan_s + 3
        assert st_d["status"] == "cancelled" and st_d["a"]["tokens"] < 1000
        assert st_r["status"] == "completed" and st_r["a"]["tokens"] == 250
        check_consistent(run, st_r)


# -- the worker survives Redis restarts --------------------------------------------------------


def restart(redis: RedisServer, down_s: float) -> tuple[RedisServer, float]:
    redis.stop()
    t_stop = time.monotonic()
    time.sleep(down_s)
    again = RedisServer(redis.data_dir, port=redis.port, appendonly=True).start()
    return again, time.monotonic() - t_stop


def wait_api(api: Proc, timeout: float = 30.0) -> None:
    wait_ready(api, timeout=timeout)


def resume_to_end(base: str, h: dict[str, Any], last_id: str | None, timeout: float = 30.0) -> Run:
    deadline = time.monotonic() + timeout
    while True:
        try:
            run = read_events(base, h["events_url"], last_id, timeout=20)
            if run.status == 200 and run.ended:
                return run
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "could not read the stream to its end after the restart"
        time.sleep(0.2)


def test_worker_survives_redis_restarts(tmp_path: Path) -> None:
    lease_s = 4.0  # lease TTL 2.8 s: a 0.5 s outage keeps it, a 5 s one does not
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        with stack(tmp_path, redis, apis=1, workers=1, TANDEM_LEASE_S=str(lease_s)) as s:
            base = s.apis[0].url
            worker = s.workers[0]
            text = "".join(f"r{i} " for i in range(150))

            # A short outage: the in-flight source goes on, nothing lost or repeated.
            h1 = create(base, body({"text": text, "interval_ms": 40}, {"text": "b1"}))
            first = read_events(base, h1["events_url"], stop_after=10)
            redis, down = restart(redis, 0.3)
            t_up = time.monotonic()
            wait_api(s.apis[0])
            h2 = create(base, body({"tokens": 5, "interval_ms": 10}, {"text": "b"}))
            st2 = wait_status(base, h2, {"completed", "failed", "cancelled"})
            new_ok = time.monotonic() - t_up
            rest = resume_to_end(base, h1, first.last_id)
            st1 = status(base, h1)
            print(f"\nRedis down {down:.2f} s: API ready again and a new stream {st2['status']} {new_ok:.2f} s after Redis "
                  f"was back; the in-flight stream {st1['status']} with {st1['a']['tokens']}/150 A tokens")
            assert worker.alive(), "the worker outlived the restart"
            assert st2["status"] == "completed"
            assert st1["status"] == "completed" and st1["a"]["text"] == text
            assert first.text("a") + rest.text("a") == text, "resumed across the restart: nothing lost or repeated"
            assert new_ok < 10

            # An outage longer than the lease: the in-flight source ends with worker_lost once Redis
            # is back; the stream ends; the next one runs.
            h3 = create(base, body({"tokens": 400, "interval_ms": 40}, {"text": "b3"}))
            first = read_events(base, h3["events_url"], stop_after=10)
            redis, down = restart(redis, 5.0)
            t_up = time.monotonic()
            rest = resume_to_end(base, h3, first.last_id)
            ended = time.monotonic() - t_up
            st3 = status(base, h3)
            h4 = create(base, body({"tokens": 5, "interval_ms": 10}, {"text": "b"}))
            st4 = wait_status(base, h4, {"completed", "failed", "cancelled"})
            print(f"Redis down {down:.2f} s (> lease {0.7 * lease_s:.1f} s): in-flight A ended "
                  f"{st3['a']['error'] and st3['a']['error']['code']} and its reader got `end` {ended:.2f} s after Redis "
                  f"was back; next stream {st4['status']}")
            assert worker.alive()
            assert st3["a"]["error"]["code"] == "worker_lost" and st3["status"] == "failed"
            assert first.text("a") + rest.text("a") == st3["a"]["text"]
            assert rest.of("end") and st4["status"] == "completed"
            assert "Redis unavailable" in worker.output() and "Redis is back" in worker.output()
    finally:
        redis.stop()
