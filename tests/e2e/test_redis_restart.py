"""Redis restarted under load (AOF on, appendfsync everysec): the API tier rides it out by itself.

While Redis is away `/readyz` says 503, open SSE connections stay open (keepalive pings) or close so
that the client resumes; once Redis is back, the API processes reconnect with bounded backoff,
`/readyz` says 200, and every stream in flight completes exactly once for its reader, its ids
only going forward. Nothing is restarted by hand, except that a worker process that exits is
started again, as a process supervisor (compose's `restart:`) would: the test prints whether the
worker needed that.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from shared.redis_server import RedisServer
from tests.client import create
from tests.e2e.test_faults_api import (
    Follower,
    assert_clean_log,
    body,
    check_exactly_once,
    in_thread,
    join_all,
    status_of,
    wait_until,
)
from tests.harness import Proc, stack

pytestmark = pytest.mark.e2e


class ReadyProbe:
    """Polls /readyz of one API every 50 ms: (monotonic time, status or 0 for no answer)."""

    def __init__(self, api: Proc) -> None:
        self.api = api
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=2.0) as c:
            while not self.stop.is_set():
                try:
                    code = c.get(self.api.url + "/readyz").status_code
                except httpx.HTTPError:
                    code = 0
                self.samples.append((time.monotonic(), code))
                time.sleep(0.05)

    def first_ok_after(self, t: float) -> float | None:
        return next((ts for ts, code in self.samples if ts >= t and code == 200), None)

    def codes_between(self, t0: float, t1: float) -> set[int]:
        return {code for ts, code in self.samples if t0 <= ts <= t1}


def test_redis_restart_mid_stream(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        # A small read batch: a paced reader's feed keeps catching up from Redis, during the outage too.
        with stack(tmp_path, redis, apis=2, workers=1, TANDEM_READ_BATCH="4") as s:
            a0, a1 = s.apis
            handles = [
                create(a0.url, body({"tokens": 70, "interval_ms": 100}, {"delay_ms": 3000, "text": f"B{n} after the restart"}, slow=50))
                for n in range(2)
            ]
            # A written at once, emitted one delta per 150 ms while B runs: reads from Redis all along.
            handles.append(create(a0.url, body({"tokens": 60, "interval_ms": 5}, {"delay_ms": 6000, "text": "B2 late"}, slow=150)))
            followers = [
                Follower(handles[0]["events_url"], [a0.url, a1.url]),
                Follower(handles[1]["events_url"], [a1.url, a0.url], header=False),
                Follower(handles[2]["events_url"], [a0.url, a1.url]),
            ]
            probes = [ReadyProbe(a0), ReadyProbe(a1)]
            restarted: list[float] = []
            done = threading.Event()

            def supervise() -> None:
                while not done.is_set():
                    for i, w in enumerate(s.workers):
                        if not w.alive():
                            restarted.append(time.monotonic())
                            s.workers[i] = s.start_worker()
                            s.workers.pop()  # start_worker appended it too
                    time.sleep(0.2)

            sup = threading.Thread(target=supervise, daemon=True)
            sup.start()
            threads = [in_thread(lambda f=f: f.follow(timeout=90)) for f in followers]  # type: ignore[misc]
            wait_until(lambda: all(len(f.ids()) >= 5 for f in followers), 20, "readers got events before the restart")
            before = [len(f.ids()) for f in followers]

            t_down = time.monotonic()
            redis.stop()  # SIGTERM: Redis writes its AOF and exits
            time.sleep(2.0)
            during = {p.api.name: p.codes_between(t_down + 0.3, time.monotonic()) for p in probes}
            redis.start()
            t_up = time.monotonic()
            ready = [wait_until(lambda p=p: p.first_ok_after(t_up) is not None, 15, f"{p.api.name} ready again") for p in probes]  # type: ignore[misc]
            ready_after = [(p.first_ok_after(t_up) or 0) - t_up for p in probes]

            join_all(threads, 90)
            done.set()
            for p in probes:
                p.stop.set()
            for f, h in zip(followers, handles, strict=True):
                check_exactly_once(f, status_of(a0.url, h))
            conns = [[c.how for c in f.connections] for f in followers]
            outcome = [
                [f"{e.event}:{e.data.get('source', '')}:{e.data.get('code', e.data.get('status', ''))}" for e in f.events if e.event in ("done", "error", "end")]
                for f in followers
            ]
            print(f"\noutcome per stream: {outcome}")
            print(f"\nRedis down {t_up - t_down:.2f}s; readyz during the outage: {during}; "
                  f"readyz 200 again {', '.join(f'{x:.2f}s' for x in ready_after)} after Redis was back (max {max(ready):.2f}s)")
            print(f"readers had {before} events at the restart; connections per reader: {conns}; "
                  f"all completed exactly once, ids only forward; worker restarted by the supervisor: {len(restarted)} time(s)")
            for p in probes:
                assert during[p.api.name] and 200 not in during[p.api.name], f"{p.api.name}: /readyz said 200 while Redis was down"
            assert max(ready_after) < 5.0, "an API took too long to reconnect"
            # A 2 s outage is well inside the lease (TANDEM_LEASE_S, 10 s): the sources go on.
            assert all(o[-1] == "end::completed" for o in outcome), outcome
            # The catching-up reader's connection was held open through the outage, not broken.
            assert conns[2] == ["end"], conns[2]
            for api in (a0, a1):
                assert api.alive()
                assert_clean_log(api)
    finally:
        redis.stop()
