"""TANDEM_WORKER_REDIS_POOL_SIZE: a worker starting a burst of jobs holds a bounded number of Redis
connections (its pool's, plus its append pipe's and its subscription to the jobs channel), and every job still runs to the end."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import pytest
import redis

from shared.redis_server import RedisServer
from tests.client import create
from tests.harness import redis_connections, stack

pytestmark = pytest.mark.e2e

STREAMS = 300
POOL = 4


def test_a_burst_of_jobs_runs_on_a_bounded_pool(tmp_path: Path, redis_server: RedisServer) -> None:
    with stack(tmp_path, redis_server, apis=1, workers=0) as s:
        worker = s.start_worker(TANDEM_WORKER_REDIS_POOL_SIZE=str(POOL))
        base = s.apis[0].url
        r = redis.Redis.from_url(redis_server.url)
        fast = {"task": "simulated", "options": {"tokens": 20, "interval_ms": 0}}
        # Every job due at once, as in a burst of new streams: the worker is stopped meanwhile.
        worker.popen.send_signal(signal.SIGSTOP)
        try:
            handles = [create(base, {"prompt": "x", "a": fast, "b": fast}) for _ in range(STREAMS)]
        finally:
            worker.popen.send_signal(signal.SIGCONT)
        most, stop = 0, threading.Event()

        def sample() -> None:
            nonlocal most
            while not stop.wait(0.01):
                most = max(most, redis_connections(r, "worker", worker.popen.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with httpx.Client(base_url=base, timeout=10) as c:
                for h in handles:
                    for _ in range(600):
                        st = c.get(h["status_url"]).json()
                        if st["status"] != "queued" and st["status"] != "running":
                            break
                        stop.wait(0.05)
                    assert st["status"] == "completed", st
                    assert st["a"]["tokens"] == 20 and st["b"]["tokens"] == 20, st
        finally:
            stop.set()
            sampler.join()
            r.close()
        print(f"\n{2 * STREAMS} jobs released at once: the worker held at most {most} Redis connections (pool {POOL})")
        assert 1 <= most <= POOL + 2  # + the append pipe's own connection, + the jobs channel's (workers/wakeup.py)
