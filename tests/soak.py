"""Soak: mixed traffic for a long while through nginx (deploy/nginx.conf) in front of two API
replicas and two workers, with random client drops and one API replica restart per minute
(SIGTERM and SIGKILL in turn). Checks every stream end to end: no errors, no lost or repeated
events; prints memory samples (RSS of every process, Redis used_memory) to show they stay flat.

    .venv/bin/python -m tests.soak                 # 600 s (`make soak`)
    .venv/bin/python -m tests.soak --duration 60   # a quick one

Not part of the test suite. Exit status 0 when every check held.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from redis import Redis

from shared.redis_server import RedisServer
from tests.e2e.test_faults_api import Follower, check_exactly_once, random_body, rss_kb
from tests.harness import Proc, Stack
from tests.nginx import run_nginx


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    streams: int = 0
    completed: dict[str, int] = field(default_factory=dict)  # end status -> count
    events: int = 0
    connections: int = 0
    drops: int = 0  # connections the client dropped on purpose
    broken: int = 0  # connections that broke under it (replica restarts)
    create_retries: int = 0  # POSTs answered 502/503 (a replica going away), retried
    reconnect_statuses: dict[int, int] = field(default_factory=dict)
    cancels: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def client_loop(base: str, deadline: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=15.0) as http:
        while time.monotonic() < deadline:
            handles = None
            for attempt in range(20):
                try:
                    r = http.post(base + "/v1/streams", json=random_body(rng))
                except httpx.HTTPError as e:
                    tally.errors.append(f"create: {type(e).__name__}: {e}")
                    break
                if r.status_code == 201:
                    handles = r.json()
                    break
                if r.status_code in (502, 503) and attempt < 19:
                    tally.add(create_retries=1)
                    time.sleep(0.25)
                    continue
                tally.errors.append(f"create: {r.status_code} {r.text[:200]}")
                break
            if handles is None:
                time.sleep(0.5)
                continue
            tally.add(streams=1)
            f = Follower(handles["events_url"], [base], header=rng.random() < 0.5)
            cancel_after = rng.randint(3, 30) if rng.random() < 0.05 else None
            started = time.monotonic()
            try:
                while not f.ended:
                    if time.monotonic() - started > 120:
                        raise AssertionError(f"stream {handles['id']} not finished in 120 s: {[c.how for c in f.connections]}")
                    drop_p = 0.04 if rng.random() < 0.4 else 0.0
                    conn = f.connect(base, stop=lambda _ev, p=drop_p: rng.random() < p, read_timeout=30)  # type: ignore[misc]
                    if cancel_after is not None and len(f.ids()) >= cancel_after:
                        http.delete(base + handles["status_url"])
                        tally.add(cancels=1)
                        cancel_after = None
                    if conn.how == "stopped":
                        tally.add(drops=1)
                    elif conn.how.startswith("broken"):
                        tally.add(broken=1)
                    elif conn.how.startswith("status") and not f.ended:
                        code = int(conn.how.split()[1])
                        with tally.lock:
                            tally.reconnect_statuses[code] = tally.reconnect_statuses.get(code, 0) + 1
                        if code not in (502, 503):
                            raise AssertionError(f"reconnect answered {code}")
                        time.sleep(0.3)
                    f.header = rng.random() < 0.5  # resume by header or by query, in turn
                status = http.get(base + handles["status_url"]).json()
                check_exactly_once(f, status)
                end = next(e for e in f.events if e.event == "end").data["status"]
                with tally.lock:
                    tally.completed[end] = tally.completed.get(end, 0) + 1
                tally.add(events=len(f.ids()), connections=len(f.connections))
            except Exception as e:
                tally.errors.append(f"stream {handles['id']}: {type(e).__name__}: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--restart-every", type=float, default=60.0, help="seconds between API replica restarts")
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between memory samples")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="tandem-soak-"))
    redis = RedisServer(tmp / "redis", appendonly=True).start()
    s = Stack(tmp, redis, env_extra={"TANDEM_RETENTION_S": "60", "TANDEM_SSE_PING_S": "5"})
    tally = Tally()
    samples: list[str] = []
    restarts: list[str] = []
    mem: dict[str, list[int]] = {}
    logs: list[tuple[str, str]] = []
    problems_in_logs: list[str] = []
    stuck = 0
    rdb = Redis.from_url(redis.url)
    try:
        for _ in range(2):
            s.start_worker()
        apis: list[Proc] = [s.start_api(), s.start_api()]
        with run_nginx(tmp, [a.url for a in apis]) as nginx:
            t0 = time.monotonic()
            deadline = t0 + args.duration
            print(f"soak: {args.duration:.0f}s, {args.clients} clients, nginx {nginx.url} -> {[a.url for a in apis]}, 2 workers, data in {tmp}", flush=True)
            threads = [
                threading.Thread(target=client_loop, args=(nginx.url, deadline, args.seed * 1000 + i, tally), daemon=True)
                for i in range(args.clients)
            ]
            for t in threads:
                t.start()
            next_restart, next_sample, n = t0 + args.restart_every, t0, 0
            while time.monotonic() < deadline:
                now = time.monotonic()
                if now >= next_sample:
                    line = sample(now - t0, apis, s.workers, redis, rdb, tally, mem)
                    samples.append(line)
                    print(line, flush=True)
                    next_sample += args.sample_every
                if now >= next_restart and now < deadline - 5:
                    # api0 and api1 in turn; each gets SIGTERM, then SIGKILL next time, and so on.
                    i, how = n % 2, ("SIGTERM", "SIGKILL")[(n // 2) % 2]
                    old = apis[i]
                    before = rss_kb(old.popen.pid)
                    if how == "SIGTERM":
                        took = old.term()
                    else:
                        t_kill = time.monotonic()
                        old.kill()
                        took = time.monotonic() - t_kill
                    apis[i] = s.start_api(port=old.port)
                    msg = f"[{now - t0:6.1f}s] restart {old.name} by {how} (RSS before {before / 1024:.1f} MB, exit {took:.2f}s), back in {time.monotonic() - now:.2f}s"
                    restarts.append(msg)
                    print(msg, flush=True)
                    n += 1
                    next_restart += args.restart_every
                time.sleep(0.2)
            for t in threads:
                t.join(180)
            stuck = sum(t.is_alive() for t in threads)
            samples.append(sample(time.monotonic() - t0, apis, s.workers, redis, rdb, tally, mem))
            print(samples[-1])
            logs = [(p.name, p.output()) for p in [*s.apis, *s.workers]]
    finally:
        s.stop()
        rdb.close()
        redis.stop()

    print("\n== soak summary ==")
    print(f"streams {tally.streams}, end statuses {tally.completed}, events {tally.events}, connections {tally.connections}")
    print(f"client drops {tally.drops}, connections broken by restarts {tally.broken}, reconnects answered {tally.reconnect_statuses}, "
          f"creates retried {tally.create_retries}, cancels {tally.cancels}, restarts {len(restarts)}")
    flat = memory_verdict(mem)
    for line in flat:
        print(line)
    for name, log in logs:
        for m in re.finditer(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*(.*)", log):
            problems_in_logs.append(f"{name}: traceback: {m.group(1)[:200]}")
    tracebacks = len(problems_in_logs)
    problems = list(tally.errors)
    if stuck:
        problems.append(f"{stuck} client threads did not finish")
    if tracebacks:
        problems += problems_in_logs
    if tally.streams == 0 or sum(tally.completed.values()) == 0:
        problems.append("no stream completed")
    problems += [line for line in flat if line.startswith("GROWS")]
    for p in problems[:30]:
        print("ERROR", p)
    print("soak: OK" if not problems else f"soak: {len(problems)} problem(s)")
    return 0 if not problems else 1


def sample(t: float, apis: list[Proc], workers: list[Proc], redis: RedisServer, rdb: Redis, tally: Tally, mem: dict[str, list[int]]) -> str:
    parts = []
    for name, p in [(f"api{i}", a) for i, a in enumerate(apis)] + [(f"worker{i}", w) for i, w in enumerate(workers)]:
        try:
            kb = rss_kb(p.popen.pid)
        except (OSError, AssertionError):
            continue
        mem.setdefault(f"{name}:{p.popen.pid}", []).append(kb)
        parts.append(f"{name} {kb / 1024:.1f}")
    assert redis.proc is not None
    rkb = rss_kb(redis.proc.pid)
    used = int(rdb.info("memory")["used_memory"])  # type: ignore[index]
    mem.setdefault("redis-rss", []).append(rkb)
    mem.setdefault("redis-used", []).append(used // 1024)
    return (f"[{t:6.1f}s] RSS MB: {', '.join(parts)}, redis {rkb / 1024:.1f} (used_memory {used / 1e6:.1f} MB); "
            f"streams {tally.streams}, done {sum(tally.completed.values())}, errors {len(tally.errors)}")


def memory_verdict(mem: dict[str, list[int]]) -> list[str]:
    """Per process (one lifetime each): after a warm-up third, the last third's median against the
    middle third's. Growth beyond 15 MB and 20% is flagged."""
    out = []
    for name, kbs in mem.items():
        if len(kbs) < 6:
            out.append(f"{name}: {len(kbs)} samples (too few to judge), {[round(k / 1024, 1) for k in kbs]} MB")
            continue
        third = len(kbs) // 3
        mid, last = statistics.median(kbs[third : 2 * third]), statistics.median(kbs[2 * third :])
        grew = last - mid
        verdict = "GROWS" if grew > 15 * 1024 and grew > 0.2 * mid else "flat"
        out.append(f"{verdict} {name}: middle third {mid / 1024:.1f} MB -> last third {last / 1024:.1f} MB ({grew / 1024:+.1f} MB, {len(kbs)} samples)")
    return out


if __name__ == "__main__":
    sys.exit(main())
