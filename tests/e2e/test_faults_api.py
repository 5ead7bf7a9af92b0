"""API-side faults on real processes: Redis down at start-up and mid-create, a replica SIGTERMed
with open streams, a reader that stops reading, hostile resume ids.

Also home of helpers the other fault tests and tests/soak.py share: `Follower` (reads one stream to
its end across drops, resuming with Last-Event-ID), `check_exactly_once`, `rss_kb`, `RedisCutter`.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import statistics
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis import Redis

from shared.cursor import Cursor
from shared.redis_server import RedisServer
from tests.client import Received, create, parse_sse, received
from tests.harness import Proc, Stack, stack, wait_ready

pytestmark = pytest.mark.e2e


# -- helpers -----------------------------------------------------------------------------------


def body(a: dict[str, Any], b: dict[str, Any], slow: int = 100, b_spacing: int = 0, prompt: str = "faults") -> dict[str, Any]:
    return {
        "prompt": prompt,
        "a": {"task": "simulated", "options": a},
        "b": {"task": "simulated", "options": b},
        "pacing": {"slow_interval_ms": slow, "b_interval_ms": b_spacing},
    }


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name} at {base}")


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    """Seconds until `check()` held; fails after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - t0
        time.sleep(step)
    raise AssertionError(f"not within {timeout}s: {what}")


def status_of(base: str, handles: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(base + handles["status_url"], timeout=10).json()
    return doc


def is_error_shape(r: httpx.Response) -> bool:
    try:
        doc = r.json()
    except ValueError:
        return False
    err = doc.get("error") if isinstance(doc, dict) else None
    return isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str) and bool(err["message"])


@dataclass
class Connection:
    base: str
    opened: float
    closed: float = 0.0
    how: str = ""  # "end", "closed" (clean end of response), "broken", "status <n>", "stopped"
    events: int = 0


@dataclass
class Follower:
    """Reads one stream to its end across any number of connections, resuming each time with the
    last id it received (header, or ?last_event_id= when `header` is False), on the next of `bases`."""

    events_url: str
    bases: list[str]
    header: bool = True
    events: list[Received] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    last_id: str | None = None
    ended: bool = False
    statuses: list[int] = field(default_factory=list)

    def ids(self) -> list[str]:
        return [e.id for e in self.events if e.id is not None]

    def text(self, source: str) -> str:
        return "".join(e.data["text"] for e in self.events if e.event == "delta" and e.data["source"] == source)

    def connect(self, base: str, stop: Callable[[Received], bool] | None = None, read_timeout: float = 30.0) -> Connection:
        """One connection: read until `end`, until the response ends or breaks, or until `stop(event)`."""
        url = base + self.events_url
        headers = {}
        if self.last_id is not None:
            if self.header:
                headers["Last-Event-ID"] = self.last_id
            else:
                url += "&last_event_id=" + urllib.parse.quote(self.last_id)
        conn = Connection(base, time.monotonic())
        self.connections.append(conn)
        try:
            with httpx.Client(timeout=httpx.Timeout(5.0, read=read_timeout)) as client, client.stream("GET", url, headers=headers) as r:
                self.statuses.append(r.status_code)
                if r.status_code != 200:
                    r.read()
                    conn.how = f"status {r.status_code}"
                    if r.status_code == 204:
                        self.ended = True
                    return conn
                for ev in received(r):
                    self.events.append(ev)
                    conn.events += 1
                    if ev.id is not None:
                        self.last_id = ev.id
                    if ev.event == "end":
                        self.ended = True
                        conn.how = "end"
                        return conn
                    if stop is not None and stop(ev):
                        conn.how = "stopped"
                        return conn
                conn.how = "closed"
        except httpx.HTTPError as e:
            conn.how = f"broken: {type(e).__name__}"
        finally:
            conn.closed = time.monotonic()
        return conn

    def follow(self, timeout: float = 90.0, pause: float = 0.2) -> None:
        """Connect, and reconnect after every drop, until the stream ended."""
        deadline = time.monotonic() + timeout
        i = 0
        while not self.ended:
            assert time.monotonic() < deadline, f"stream not finished in {timeout}s: {[c.how for c in self.connections]}"
            conn = self.connect(self.bases[i % len(self.bases)])
            i += 1
            if not self.ended and conn.how != "closed":
                time.sleep(pause)


def cursor_key(event_id: str) -> tuple[int, int, int]:
    return Cursor.parse(event_id).key


def check_exactly_once(f: Follower, status: dict[str, Any]) -> None:
    """Every event once, in order, ids only going forward; texts equal the status document."""
    ids = f.ids()
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    keys = [cursor_key(i) for i in ids]
    assert keys == sorted(keys), "event ids went backwards"
    kinds = [e.event for e in f.events if e.id is not None]
    assert kinds.count("end") == 1 and kinds[-1] == "end"
    for src in ("a", "b"):
        terminals = [e for e in f.events if e.event in ("done", "error") and e.data.get("source") == src]
        assert len(terminals) == 1, f"{src}: {len(terminals)} terminal events"
        assert f.text(src) == status[src]["text"], f"{src}: text differs from the status document"


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # surfaced by join_all
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


def join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
        assert not t.is_alive(), "a reader thread did not finish"
        errs: list[BaseException] = t.errors  # type: ignore[attr-defined]
        if errs:
            raise errs[0]


def assert_clean_log(proc: Proc) -> None:
    out = proc.output()
    for bad in ("Traceback", "Exception in ASGI application", "Caught handled exception"):
        assert bad not in out, f"{proc.name} logged {bad!r}:\n{out[-3000:]}"


# -- 3. Redis down at start-up, and while creating ---------------------------------------------


def test_redis_down_at_startup(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", appendonly=True)  # not started yet
    s = Stack(tmp_path, redis)
    try:
        t0 = time.monotonic()
        api = s.start_api(wait=False)
        alive_after = wait_until(lambda: httpx.get(api.url + "/healthz", timeout=1).status_code == 200, 20, "healthz with Redis down")
        ready = httpx.get(api.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and is_error_shape(ready), ready.text
        assert ready.json()["error"]["code"] == "redis_unavailable"
        r = httpx.post(api.url + "/v1/streams", json=body({"tokens": 3}, {"text": "b"}), timeout=10)
        assert r.status_code == 503 and is_error_shape(r), r.text
        assert r.json()["error"]["code"] == "redis_unavailable" and r.headers.get("retry-after") == "1"
        ev = httpx.get(api.url + "/v1/streams/abc/events?token=x", timeout=10)
        assert ev.status_code == 503 and is_error_shape(ev), ev.text
        st = httpx.get(api.url + "/v1/streams/abc?token=x", timeout=10)
        assert st.status_code == 503 and is_error_shape(st), st.text
        assert api.alive()

        time.sleep(1.0)  # the hub has been retrying for a while: its backoff is at its cap
        redis.start()
        ready_after = wait_until(lambda: httpx.get(api.url + "/readyz", timeout=1).status_code == 200, 15, "readyz after Redis came up")
        s.start_worker()
        h = create(api.url, body({"tokens": 8, "interval_ms": 10}, {"delay_ms": 100, "text": "B after start"}, slow=20))
        f = Follower(h["events_url"], [api.url])
        f.follow(timeout=30)
        check_exactly_once(f, status_of(api.url, h))
        print(f"\nhealthz 200 {alive_after:.2f}s after start with Redis down; readyz 200 {ready_after:.2f}s after Redis came up "
              f"(total {time.monotonic() - t0:.1f}s); a stream then completed without an API restart")
        assert ready_after < 5.0
        assert_clean_log(api)
    finally:
        s.stop()
        redis.stop()


# A fault-injecting TCP proxy in front of redis-server: "Redis dies at exactly this command".


def resp_commands(buf: bytes) -> tuple[list[tuple[int, int, list[bytes]]], int]:
    """Complete RESP commands (arrays of bulk strings) in `buf`: (start, end, args), and where the
    incomplete rest begins."""
    out: list[tuple[int, int, list[bytes]]] = []
    pos = 0
    while True:
        start = pos
        if pos >= len(buf):
            return out, start
        nl = buf.find(b"\r\n", pos)
        if nl < 0 or buf[pos : pos + 1] != b"*":
            return out, start
        n = int(buf[pos + 1 : nl])
        pos = nl + 2
        args: list[bytes] = []
        for _ in range(n):
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                return out, start
            size = int(buf[pos + 1 : nl])
            if len(buf) < nl + 2 + size + 2:
                return out, start
            args.append(buf[nl + 2 : nl + 2 + size])
            pos = nl + 2 + size + 2
        out.append((start, pos, args))


class RedisCutter:
    """Proxies Redis; when armed with (k, i), on the k-th "relevant" batch of commands (one write
    by the client that names the test's keys) it forwards only the first i commands, then closes
    every connection at once and refuses new ones for `down_s`: to the API, Redis died right there."""

    def __init__(self, upstream_port: int, relevant: bytes, ignore: tuple[bytes, ...]) -> None:
        self.upstream = upstream_port
        self.relevant, self.ignore = relevant, ignore
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.plan: tuple[int, int, float] | None = None
        self.seen = 0
        self.cut: tuple[int, int, int] | None = None  # (k, i, commands in that batch)
        self.down_until = 0.0
        self.batches: list[list[bytes]] = []  # command names of each relevant batch seen while armed
        self.dead: set[socket.socket] = set()  # sockets whose traffic is silently dropped (held, so never confused with a new one)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, k: int, i: int, down_s: float) -> None:
        with self.lock:
            self.plan, self.seen, self.cut, self.batches = (k, i, down_s), 0, None, []

    def close(self) -> None:
        self.server.close()
        self._cut_all()

    def blackhole(self) -> None:
        """Every open connection goes silent, both ways, without being closed: as if the host had
        vanished. New connections work."""
        with self.lock:
            self.dead |= set(self.socks)

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.server.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                c.close()
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                c.close()
                continue
            with self.lock:
                self.socks += [c, u]
            threading.Thread(target=self._up, args=(c, u), daemon=True).start()
            threading.Thread(target=self._down, args=(u, c), daemon=True).start()

    def _down(self, u: socket.socket, c: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := u.recv(65536):
                if u not in self.dead:
                    c.sendall(data)
        self._close(c, u)

    def _up(self, c: socket.socket, u: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := c.recv(65536):
                if c in self.dead:
                    continue
                buf += data
                cmds, rest = resp_commands(buf)
                forward, cut = self._decide(cmds)
                if cut:
                    with self.lock:  # Redis's answer to what goes through is lost with the cut, always
                        self.dead.add(u)
                u.sendall(buf[:forward] if cut else buf[:rest])
                if cut:
                    self._cut_all()
                    return
                buf = buf[rest:]
        self._close(c, u)

    def _decide(self, cmds: list[tuple[int, int, list[bytes]]]) -> tuple[int, bool]:
        """How many bytes to forward, and whether to cut after them."""
        if not cmds:
            return 0, False
        blob = b" ".join(a for _, _, args in cmds for a in args)
        with self.lock:
            if self.plan is None or self.relevant not in blob or any(x in blob for x in self.ignore):
                return 0, False
            k, i, down_s = self.plan
            self.batches.append([args[0].upper() for _, _, args in cmds])
            self.seen += 1
            if self.seen - 1 < k:
                return 0, False
            self.plan = None
            self.cut = (k, i, len(cmds))
            self.down_until = time.monotonic() + down_s
            return (cmds[i][0] if i < len(cmds) else cmds[-1][1]), True

    def _cut_all(self) -> None:
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


def leftovers(r: Redis, prefix: str) -> dict[str, int]:
    return {
        "stream keys": len(list(r.scan_iter(match=f"{prefix}:{{*", count=1000))),
        "index entries": int(r.zcard(f"{prefix}:streams")),  # type: ignore[arg-type]
        "queued jobs": int(r.zcard(f"{prefix}:queue")),  # type: ignore[arg-type]
        "job keys": len(list(r.scan_iter(match=f"arq:job:{prefix}:*", count=1000))),
    }


def test_redis_dies_at_every_step_of_a_create(tmp_path: Path, redis_server: RedisServer) -> None:
    """Redis "dies" (every connection cut, new ones refused for a while) at each command of the
    create's traffic in turn. Each time: a 503 with the JSON shape, and nothing of the stream in
    Redis: no meta key, no index entry, no arq job."""
    s = Stack(tmp_path, redis_server)
    cutter = RedisCutter(redis_server.port, s.prefix.encode(), (b":readers:", b":apis", b"SUBSCRIBE"))
    s.env_extra["TANDEM_REDIS_URL"] = cutter.url
    direct = Redis.from_url(redis_server.url)
    create_body = body({"tokens": 3}, {"text": "b"})
    outcomes: list[str] = []
    try:
        api = s.start_api(TANDEM_REDIS_URL=cutter.url)  # no worker: an enqueued job would stay visible
        k = 0
        while True:
            i, done, n_known = 0, False, None
            while True:
                wait_ready(api, timeout=15)
                # Cut after the whole batch (the reply is lost): Redis is back at once, so the API can
                # take back what EXEC did. Any other cut: Redis stays away longer than the API waits.
                down_s = 0.0 if n_known is not None and i >= n_known else 1.5
                cutter.arm(k, i, down_s)
                r = httpx.post(api.url + "/v1/streams", json=create_body, timeout=15)
                if cutter.cut is None:  # the create needed fewer batches than k: it went through
                    assert r.status_code == 201, r.text
                    got = leftovers(direct, s.prefix)
                    assert got == {"stream keys": 1, "index entries": 1, "queued jobs": 2, "job keys": 2}, got
                    done = True
                    break
                _, _, n = cutter.cut
                n_known = n
                assert r.status_code == 503 and is_error_shape(r), (k, i, r.status_code, r.text)
                time.sleep(0.1)
                got = leftovers(direct, s.prefix)
                outcomes.append(f"batch {k} {'+'.join(c.decode() for c in cutter.batches[-1][:2])}.. cut before command {i}/{n}: 503, left {sum(got.values())}")
                assert got == {"stream keys": 0, "index entries": 0, "queued jobs": 0, "job keys": 0}, (k, i, got)
                if i >= n:
                    break
                i += 1
            if done:
                break
            k += 1
        print("\n" + "\n".join(outcomes))
        print(f"{len(outcomes)} cut points, each answered 503 with nothing left in Redis; then the create went through whole")
        assert len(outcomes) >= 3
        assert_clean_log(api)
    finally:
        s.stop()
        cutter.close()
        direct.close()


class Resyncs:
    def __init__(self) -> None:
        self.resyncs = 0
        self.texts: list[str] = []

    def on_announcement(self, ann: Any) -> None:
        self.texts += [f.get("text", "") for _, f in ann.entries]

    def on_resync(self) -> None:
        self.resyncs += 1


async def test_hub_notices_a_silent_connection(redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub's pub/sub connection goes silent without being closed (host gone, no RST): an idle
    wait is not an error, so the hub PINGs, and reconnects when not even that is answered. Its
    blocking reads stay below the client's socket timeout."""
    import asyncio

    from redis.asyncio import Redis as AsyncRedis

    import api.hub as hub_mod

    assert hub_mod.read_timeout_for(AsyncRedis.from_url(redis_server.url, socket_timeout=1.5)) == 0.75
    assert hub_mod.read_timeout_for(AsyncRedis.from_url(redis_server.url)) == hub_mod.READ_TIMEOUT_S
    assert hub_mod.read_timeout_for(AsyncRedis.from_url(redis_server.url, socket_timeout=15.0)) < 15.0
    monkeypatch.setattr(hub_mod, "PING_IDLE_S", 0.5)
    monkeypatch.setattr(hub_mod, "DEAD_AFTER_S", 2.0)
    cutter = RedisCutter(redis_server.port, b"\x00nothing", ())
    hub = hub_mod.Hub(AsyncRedis.from_url(cutter.url, socket_connect_timeout=1.0, socket_timeout=5.0), f"{prefix}:hub", confirm_timeout_s=2.0)
    direct = AsyncRedis.from_url(redis_server.url)
    try:
        assert hub.read_timeout < 5.0
        await hub.start()
        await asyncio.wait_for(hub.connected.wait(), 5)
        rec = Resyncs()
        channel = f"{prefix}:{{x}}:live"
        await hub.subscribe(channel, rec)
        cutter.blackhole()
        t0 = time.monotonic()
        while rec.resyncs == 0:
            assert time.monotonic() - t0 < 10, "the hub never noticed its silent connection"
            await asyncio.sleep(0.05)
        noticed = time.monotonic() - t0
        await direct.publish(channel, b'{"s":"a","p":"0-0","e":[["1-0",["type","delta","text","after"]]]}')
        for _ in range(100):
            if rec.texts:
                break
            await asyncio.sleep(0.05)
        print(f"\nsilent pub/sub connection: reconnected and resynced after {noticed:.2f}s "
              f"(PING after {hub_mod.PING_IDLE_S}s idle, dead after {hub_mod.DEAD_AFTER_S}s); read timeout {hub.read_timeout}s < socket timeout 5s")
        assert rec.texts == ["after"]
        assert noticed < 6.0
    finally:
        await hub.stop()
        await direct.aclose()
        cutter.close()


# -- 4. an API replica SIGTERMed with open streams ---------------------------------------------


def test_sigterm_with_open_streams(tmp_path: Path, redis_server: RedisServer) -> None:
    with stack(tmp_path, redis_server, apis=2, workers=2) as s:
        old, other = s.apis
        handles = [
            # Longer than any grace period: these cannot finish before the process must go.
            create(old.url, body({"tokens": 100, "interval_ms": 100}, {"delay_ms": 6000, "text": f"B {n} says hi"}, slow=150))
            for n in range(6)
        ]
        followers = [Follower(h["events_url"], [old.url]) for h in handles]
        threads = [in_thread(lambda f=f: f.connect(f.bases[0])) for f in followers]  # type: ignore[misc]
        wait_until(lambda: all(len(f.ids()) >= 3 for f in followers), 20, "every reader got some events")
        assert metric(old.url, "tandem_open_streams") == 6
        t0 = time.monotonic()
        exit_s = old.term()
        join_all(threads, 15)
        closes = [f.connections[0].closed - t0 for f in followers]
        hows = {f.connections[0].how for f in followers}
        # Resume elsewhere: the other replica serves the rest, each event exactly once.
        for f in followers:
            f.bases = [other.url]
        threads = [in_thread(f.follow) for f in followers]
        join_all(threads, 60)
        for f, h in zip(followers, handles, strict=True):
            check_exactly_once(f, status_of(other.url, h))
        print(f"\nSIGTERM -> process exit {exit_s:.2f}s; open streams closed after max {max(closes):.2f}s "
              f"(median {statistics.median(closes):.2f}s), how: {sorted(hows)}; all 6 resumed on the other replica exactly once")
        assert exit_s < 8.0, "grace period well below 10 s"
        assert max(closes) < 6.0
        assert hows == {"closed"}, "closed cleanly (end of response), not broken"
        assert_clean_log(old)


# -- 5. a reader that stops reading ------------------------------------------------------------


def dechunk(raw: bytes) -> bytes:
    """The body of an HTTP/1.1 chunked response read raw (headers included), tolerant of truncation."""
    _, _, rest = raw.partition(b"\r\n\r\n")
    out = b""
    while rest:
        nl = rest.find(b"\r\n")
        if nl < 0:
            break
        size = int(rest[:nl], 16)
        if size == 0:
            break
        out += rest[nl + 2 : nl + 2 + size]
        rest = rest[nl + 2 + size + 2 :]
    return out


def established_to(port: int, local_port: int) -> int:
    """Server-side TCP connections from `port` to our client's `local_port` (ss)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} and dport = :{local_port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len([ln for ln in out.splitlines() if ln.strip()])


def test_slow_reader_is_cut_off(tmp_path: Path, redis_server: RedisServer) -> None:
    send_timeout = 3.0
    with stack(tmp_path, redis_server, apis=1, workers=2, TANDEM_SSE_SEND_TIMEOUT_S=str(send_timeout)) as s:
        api = s.apis[0]
        # A long unpaced stream: ~90k deltas, several MB of SSE, as fast as the worker writes it.
        h_big = create(api.url, body({"tokens": 90_000, "interval_ms": 0}, {"text": "B of the big one"}, slow=0))
        base_rss = rss_kb(api.popen.pid)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", api.port or 0))
        local_port = sock.getsockname()[1]
        sock.sendall(f"GET {h_big['events_url']} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        t_connect = time.monotonic()

        # Meanwhile a normal reader on a live stream: its events' delay from the worker's write.
        h_live = create(api.url, body({"tokens": 60, "interval_ms": 50}, {"text": "B live"}, slow=0))
        live = Follower(h_live["events_url"], [api.url])
        reader = in_thread(live.follow)
        rss: list[int] = []
        cut_at: float | None = None
        while time.monotonic() - t_connect < 20:
            rss.append(rss_kb(api.popen.pid))
            if cut_at is None and established_to(api.port or 0, local_port) == 0:
                cut_at = time.monotonic() - t_connect
            if cut_at is not None and not reader.is_alive():
                break
            time.sleep(0.2)
        join_all([reader], 30)
        offset = time.time() - time.monotonic()
        opened_ms = (live.connections[0].opened + offset) * 1000
        written = [(e, float((e.id or "a-0-0").split("-")[1])) for e in live.events if e.event == "delta" and e.data["source"] == "a"]
        # Live latency: from the worker's write (the entry id's ms) to receipt, for entries written
        # after the reader connected (earlier ones are catch-up, not latency).
        lags = [(e.t + offset) * 1000 - ms for e, ms in written if ms >= opened_ms]
        check_exactly_once(live, status_of(api.url, h_live))

        # The stalled client now reads what it has, and resumes from its last complete event.
        sock.settimeout(2.0)
        raw = b""
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                raw += data
        sock.close()
        msgs, _ = parse_sse(dechunk(raw))
        got = [(ev, eid, payload) for ev, eid, payload in msgs if ev is not None]
        f = Follower(h_big["events_url"], [api.url])
        for ev, eid, payload in got:
            f.events.append(Received(ev, eid, orjson.loads(payload), 0.0))
            f.last_id = eid or f.last_id
        before = len(f.ids())
        f.follow(timeout=60)
        check_exactly_once(f, status_of(api.url, h_big))
        grew = max(rss) - base_rss
        print(f"\nstalled reader: cut off {cut_at}s after connecting (send timeout {send_timeout}s), had {before} events; "
              f"resumed and got all {len(f.ids())}")
        print(f"API RSS while stalled: base {base_rss / 1024:.1f} MB, max {max(rss) / 1024:.1f} MB (+{grew / 1024:.1f} MB) "
              f"over {len(rss)} samples; stream size {sum(len(e.data.get('text', '')) for e in f.events) / 1e6:.2f} MB of text")
        print(f"other reader meanwhile: {len(lags)} live A deltas, lag (worker write -> receipt) p50 {statistics.median(lags):.1f} ms, max {max(lags):.1f} ms")
        assert cut_at is not None, "the stalled connection was never cut"
        assert cut_at < send_timeout + 15
        assert grew < 40 * 1024, "memory grew with the stalled stream"
        assert max(lags) < 1000 and statistics.median(lags) < 100
        assert metric(api.url, "tandem_open_streams") == 0
        assert_clean_log(api)


# -- 6. hostile resume ids ---------------------------------------------------------------------


def raw_get(port: int, path: str, header_value: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nLast-Event-ID: " + header_value + b"\r\nConnection: close\r\n\r\n")
        c.settimeout(3.0)
        out = b""
        with contextlib.suppress(OSError):
            while data := c.recv(65536):
                out += data
                if b"\r\n\r\n" in out and (b"event: end" in out or not out.startswith(b"HTTP/1.1 200")):
                    break
    m = re.match(rb"HTTP/1\.[01] (\d{3})", out)
    assert m, out[:200]
    return int(m.group(1)), out


def test_hostile_resume_ids(tmp_path: Path, redis_server: RedisServer) -> None:
    with stack(tmp_path, redis_server, apis=1, workers=1) as s:
        api = s.apis[0]
        mine = create(api.url, body({"text": "alpha bravo charlie delta echo"}, {"text": "foxtrot golf"}, slow=0))
        theirs = create(api.url, body({"text": "omega psi chi phi"}, {"text": "upsilon tau"}, slow=0))
        full = Follower(mine["events_url"], [api.url])
        full.follow()
        other = Follower(theirs["events_url"], [api.url])
        other.follow()
        my_ids, their_ids = set(full.ids()), [i for i in other.ids() if i != "end"]
        last_a = max((i for i in my_ids if i.startswith("a-")), key=cursor_key)
        ms = int(last_a.split("-")[1])
        hostile = [
            "a-1-0\x00", "\x00", "a-1\r-0", "a-1\n-0", "a-1-0\r\nX-Injected: 1", "a-" + "1" * 63, "x" * 5000,
            f"a-{ms + 100000}-0", f"b-{ms + 100000}-0", "b-18446744073709551615-18446744073709551615", "a-0-0", "b-0-0",
            "a-18446744073709551616-0", "a-99999999999999999999999-0", "a-1-99999999999999999999", "a--1-0", "-1",
            "a-1", "A-1-0", " a-1-0", "a-1-0 ", "a-01-0", "a-\u0661-0", "end\x00", "END", "${jndi:ldap://x}", "<script>x</script>",
            "a-1-0;b-1-0", "../../etc/passwd", *their_ids,
        ]
        results: dict[str, int] = {}
        plain = 0  # 400s from the HTTP parser (raw NUL/CR/LF in a header): the app never sees those
        path = mine["events_url"]
        for raw in hostile:
            for how in ("query", "header"):
                if how == "query":
                    r = httpx.get(api.url + path + "&last_event_id=" + urllib.parse.quote(raw, safe=""), timeout=10)
                    code, text = r.status_code, r.text
                    shaped = is_error_shape(r) if code == 400 else True
                    payload = r.content
                else:
                    if any(ch in raw for ch in "\x00\r\n") or not raw.isascii() or raw != raw.strip():
                        code, payload = raw_get(api.port or 0, path, raw.encode())
                        text = payload.decode("latin-1")
                        # The HTTP parser refuses these before the app: plain 400, never echoed, never 500.
                        shaped = code != 400 or b"application/json" in payload or b"Invalid HTTP request" in payload
                        plain += code == 400 and b"application/json" not in payload
                    else:
                        r = httpx.get(api.url + path, headers={"Last-Event-ID": raw}, timeout=10)
                        code, text, payload = r.status_code, r.text, r.content
                        shaped = is_error_shape(r) if code == 400 else True
                key = f"{how}:{raw[:24]!r}"
                results[key] = code
                assert code in (200, 204, 400), (key, code, text[:300])
                assert shaped, (key, text[:300])
                if len(raw.strip()) >= 4 and code == 400:
                    assert raw.encode() not in payload, f"{key}: the id was echoed back"
                if code == 200:
                    # A correct resume of *this* stream: only its ids, only its text, from that point on.
                    msgs, _ = parse_sse(dechunk(payload) if payload.startswith(b"HTTP/") else payload)
                    ids = [eid for _, eid, _ in msgs if eid is not None]
                    texts = "".join(orjson.loads(d)["text"] for ev, _, d in msgs if ev == "delta")
                    assert ids and set(ids) <= my_ids, f"{key}: ids of another stream"
                    assert (full.text("a") + full.text("b")).endswith(texts), f"{key}: not this stream's rest"
                    assert "omega" not in texts and "upsilon" not in texts
        counts = {c: sum(1 for v in results.values() if v == c) for c in sorted(set(results.values()))}
        print(f"\n{len(results)} hostile resume requests ({len(hostile)} ids x header/query): status counts {counts}; "
              f"({plain} of the 400s from the HTTP parser, the rest JSON error shape); none echoed, no 500, never another stream's data")
        resumed = [k for k, v in results.items() if v == 200]
        print(f"resumed (another stream's id that is also a position of this one, same Redis entry id): {resumed}")
        assert_clean_log(api)


# Shuffled traffic for the soak (kept here so the soak and the tests share one reader).
def random_body(rng: random.Random) -> dict[str, Any]:
    return body(
        {"tokens": rng.randint(5, 80), "interval_ms": rng.choice([0, 5, 20, 50])},
        {"delay_ms": rng.randint(0, 3000), "tokens": rng.randint(1, 30), "interval_ms": rng.choice([0, 10, 30])},
        slow=rng.choice([0, 50, 150, 300]),
        b_spacing=rng.choice([0, 0, 20]),
        prompt=rng.choice(["soak", "hello world", "explain redis streams"]),
    )


def iter_forever(seq: list[str]) -> Iterator[str]:
    while True:
        yield from seq
