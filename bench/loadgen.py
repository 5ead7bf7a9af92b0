"""The load generator: a raw asyncio/uvloop HTTP/1.1 client with a minimal SSE reader.

It runs in a process of its own (``python -m bench.loadgen``), so its CPU is measured apart from
the servers'. Protocol: one JSON job on stdin's first line; JSON lines on stdout:
``{"ready": {...}}`` once every stream of the job is open (jobs that wait then read one more line
from stdin before going on) and ``{"result": {...}}`` at the end, or ``{"error": "..."}``.

Per event the client does as little Python as it can: a throughput job only counts
``event: delta`` lines in each complete block (``bytes.count``, in C); the latency jobs run one
compiled regex over each block, once the loop turn has read every socket that was readable. Times
are ``time.time()`` at ``data_received``, before that parsing (one client process stands in for
a thousand browsers: its parsing of one connection's flush must not delay the receipt times of
the others), on the same clock as Redis's entry ids (whose milliseconds are the worker's write
time) and the baseline's ids.
"""

from __future__ import annotations

import asyncio
import gc
import random
import re
import sys
import time
import traceback
from typing import Any

import orjson
import uvloop

from bench.sysstat import raise_nofile

INF = float("inf")

# One SSE message carrying an event: tandem writes `event, id, data`; sse-starlette `id, event, data`.
_MSG = re.compile(rb"(?:id: ([^\n]*)\n)?event: ([a-z]+)\n(?:id: ([^\n]*)\n)?data: ([^\n]*)\n")


def parse_id(eid: bytes) -> tuple[int, int, int]:
    """`a-<ms>-<seq>` -> (source byte, ms, seq); `end` -> (ord('e'), 0, 0)."""
    if eid == b"end":
        return (101, 0, 0)
    dash = eid.index(b"-", 2)
    return (eid[0], int(eid[2:dash]), int(eid[dash + 1 :]))


# -- small requests over keep-alive connections ---------------------------------------------------


class Conn:
    def __init__(self, host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.host, self.reader, self.writer = host, reader, writer
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(f"{host}:{port}", reader, writer)

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length, chunked = 0, False
        for line in raw.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                self.closed = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            data = b"".join(p[:-2] for p in parts)
        else:
            data = await self.reader.readexactly(length) if length else b""
        return status, data

    def close(self) -> None:
        self.closed = True
        self.writer.close()


class Pool:
    def __init__(self, host: str, port: int, size: int = 32) -> None:
        self.host, self.port = host, port
        self._sem = asyncio.Semaphore(size)
        self._idle: list[Conn] = []

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, float]:
        """(status, body, when the request was sent): time waiting for a connection is not counted."""
        async with self._sem:
            conn = self._idle.pop() if self._idle else await Conn.open(self.host, self.port)
            sent = time.time()
            try:
                status, data = await conn.request(method, path, body)
            except BaseException:
                conn.close()
                raise
            if conn.closed:
                conn.close()
            else:
                self._idle.append(conn)
            return status, data, sent

    def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()


# -- one stream, as the client sees it ------------------------------------------------------------


class Rec:
    """Everything measured about one stream, across its connections."""

    __slots__ = (
        "a_deltas", "a_done_ms", "a_done_t", "b_done_ms", "body", "closed", "deltas", "done", "drop_t", "end_t",
        "error", "events_url", "excl_hi", "excl_lo", "first_a_ms", "first_flushed_t", "first_t", "flush_t", "id",
        "idx", "last_a_t", "last_id", "last_key", "meta_t", "opened", "order_errors", "post_t", "posted_t", "reader",
        "resume_first_ms", "resume_first_t", "resume_t", "status",
    )  # fmt: skip

    def __init__(self, idx: int, body: bytes) -> None:
        self.idx, self.body = idx, body
        self.id = self.events_url = ""
        self.post_t = self.posted_t = 0.0
        self.meta_t: float | None = None
        self.first_t: float | None = None
        self.end_t: float | None = None
        self.deltas = self.a_deltas = self.order_errors = 0
        self.status = 0
        self.error: str | None = None
        self.last_id: bytes | None = None
        self.last_key: tuple[int, int, int] | None = None
        self.flush_t: float | None = None
        self.first_flushed_t: float | None = None
        self.first_a_ms: int | None = None
        self.last_a_t: float | None = None
        self.a_done_t: float | None = None
        self.a_done_ms: int | None = None
        self.b_done_ms: int | None = None
        self.drop_t: float | None = None
        self.resume_t: float | None = None
        self.resume_first_t: float | None = None
        self.resume_first_ms: int | None = None
        self.excl_lo, self.excl_hi = INF, INF  # token writes in this window were missed, not live
        self.reader: Reader | None = None
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        self.opened: asyncio.Future[None] = loop.create_future()  # the first `meta` arrived
        self.closed = False

    def got_meta(self, t: float) -> None:
        if self.meta_t is None:
            self.meta_t = t
            self.opened.set_result(None)

    def finish(self, error: str | None = None) -> None:
        if error and self.error is None and self.end_t is None:
            self.error = error
        if not self.done.done():
            self.done.set_result(None)


class Sink:
    """What a job does with each complete block of SSE bytes."""

    def block(self, reader: Reader, rec: Rec, block: bytes, t: float) -> None:
        raise NotImplementedError


class CountSink(Sink):
    """Throughput: deltas per millisecond of receipt. `CountReader` counts them as it reads,
    without parsing blocks (so `block` is never called)."""

    def __init__(self) -> None:
        self.bins: dict[int, int] = {}


class ParseSink(Sink):
    """Latency jobs: every event with its id; token latency = receipt - the id's write millisecond."""

    def __init__(self, window_ms: tuple[float, float] = (-INF, INF), require_flush: bool = False, interval_ms: float | None = None) -> None:
        self.window = window_ms
        self.require_flush = require_flush  # tandem: only A's tokens written after the flush are live
        self.token_lat: list[float] = []
        self.token_ms: list[int] = []  # each sample's write millisecond (which span of the run it is from)
        # From each token's due time in its producer's schedule (the first token's write + i x the
        # interval) to its receipt: what a person sees, the producer's own delays and (tandem) the
        # worker's write window included, which the write-to-receipt latency leaves out.
        self.interval_ms = interval_ms
        self.due_lat: list[float] = []

    def block(self, reader: Reader, rec: Rec, block: bytes, t: float) -> None:
        for m in _MSG.finditer(block):
            ev = m.group(2)
            eid = m.group(1) or m.group(3)
            if eid is None:
                if ev == b"meta":
                    rec.got_meta(t)
                elif ev == b"phase" and rec.flush_t is None and b'"flush"' in m.group(4):
                    rec.flush_t = t
                continue
            key = parse_id(eid)
            if rec.last_key is not None and key <= rec.last_key:
                rec.order_errors += 1
            rec.last_key, rec.last_id = key, eid
            if rec.resume_t is not None and rec.resume_first_t is None:
                rec.resume_first_t, rec.resume_first_ms = t, key[1]
                rec.excl_hi = t * 1000
            src, ms = key[0], key[1]
            if ev == b"delta":
                rec.deltas += 1
                if rec.first_t is None:
                    rec.first_t = t
                if src == 97:  # "a"
                    rec.a_deltas += 1
                    rec.last_a_t = t
                    if rec.first_a_ms is None:
                        rec.first_a_ms = ms
                    if rec.flush_t is not None and rec.first_flushed_t is None:
                        rec.first_flushed_t = t
                    live = rec.flush_t is not None and ms > rec.flush_t * 1000 if self.require_flush else True
                    if live and self.window[0] <= ms <= self.window[1] and not (rec.excl_lo <= ms <= rec.excl_hi):
                        self.token_lat.append(t * 1000 - ms)
                        self.token_ms.append(ms)
                        if self.interval_ms is not None:
                            self.due_lat.append(t * 1000 - (rec.first_a_ms + (rec.a_deltas - 1) * self.interval_ms))
            elif ev == b"done":
                if src == 98:
                    rec.b_done_ms = ms
                else:
                    rec.a_done_t, rec.a_done_ms = t, ms
            elif ev == b"end":
                rec.end_t = t
                reader.close()
                rec.finish()
                return


_queued: list[tuple[Any, ...]] = []  # (function, args...): blocks read, with their receipt times, in order


def _later(*call: Any) -> None:
    _queued.append(call)
    if len(_queued) == 1:
        asyncio.get_running_loop().call_soon(_run_queued)


def _run_queued() -> None:
    calls = _queued[:]
    _queued.clear()
    for fn, *args in calls:
        fn(*args)


class Reader(asyncio.Protocol):
    """One SSE response: HTTP/1.1 head, chunked transfer decoding, then complete blocks to the sink."""

    __slots__ = ("_body", "_chunked", "_crlf", "_head", "_left", "_raw", "bins", "dropped", "rec", "sink", "transport")

    def __init__(self, rec: Rec, sink: Sink) -> None:
        self.rec, self.sink = rec, sink
        self.transport: asyncio.Transport | None = None
        self._head: bytes | None = b""
        self._chunked = False
        self._raw = b""
        self._left = 0
        self._crlf = 0
        self._body = bytearray()
        self.dropped = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        t = time.time()
        if self._head is not None:
            head = self._head + data
            i = head.find(b"\r\n\r\n")
            if i < 0:
                self._head = head
                return
            self._head = None
            self.rec.status = status = int(head[9:12])
            self._chunked = b"transfer-encoding: chunked" in head[:i].lower()
            data = head[i + 4 :]
            if status != 200:
                self.close()
                self.rec.finish(f"HTTP {status}")
                return
        if self._chunked:
            if not (self._raw or self._left or self._crlf or self._body) and data.endswith(b"\n\n\r\n"):
                # The common case (a paced token): the read is one whole chunk of whole events.
                j = data.find(b"\r\n")
                if j > 0 and j + 4 + int(data[:j], 16) == len(data):
                    self._block(data[j + 2 : -2], t)
                    return
            self._dechunk(data)
        else:
            self._body += data
        j = self._body.rfind(b"\n\n")
        if j >= 0:
            block = bytes(self._body[: j + 2])
            del self._body[: j + 2]
            self._block(block, t)

    def _block(self, block: bytes, t: float) -> None:
        # Parsed after every socket that this loop turn found readable has been read and stamped:
        # parsing one connection's flush (a hundred events) in its data_received would delay the
        # receipt time of every connection read after it in the same turn, which one client
        # process standing in for a thousand browsers must not add to their latency.
        _later(self.parse, block, t)

    def parse(self, block: bytes, t: float) -> None:
        try:
            self.sink.block(self, self.rec, block, t)
        except Exception as e:  # a parse error must show up in the result, not as a silent close
            self.rec.finish(f"client: {type(e).__name__}: {e}")
            self.abort()

    def _dechunk(self, data: bytes) -> None:
        if not (self._raw or self._left or self._crlf):  # the common case: a read is one whole chunk
            j = data.find(b"\r\n")
            if j > 0:
                end = j + 2 + int(data[:j], 16)
                if end > j + 2 and len(data) == end + 2:
                    self._body += data[j + 2 : end]
                    return
        buf = self._raw + data if self._raw else data
        pos, n = 0, len(buf)
        while pos < n:
            if self._left:
                take = min(self._left, n - pos)
                self._body += buf[pos : pos + take]
                pos += take
                self._left -= take
                if not self._left:
                    self._crlf = 2
            elif self._crlf:
                take = min(self._crlf, n - pos)
                pos += take
                self._crlf -= take
            else:
                j = buf.find(b"\r\n", pos)
                if j < 0:
                    break
                size = int(buf[pos:j].split(b";", 1)[0], 16)
                pos = j + 2
                if size == 0:
                    pos = n
                    break
                self._left = size
        self._raw = buf[pos:]

    def close(self) -> None:
        self.dropped = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.dropped = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        _later(self._lost, exc)  # after the blocks read before it

    def _lost(self, exc: Exception | None) -> None:
        if not self.dropped:
            self.rec.finish(f"connection lost: {exc}" if exc else "closed before end")


_DELTA, _META, _END, _ERROR = b"event: delta\n", b"event: meta\n", b"event: end\n", b"event: error\n"


class CountReader(Reader):
    """Throughput's reader: a handful of C calls per read, whatever the read holds.

    It neither decodes the chunked framing nor splits messages: each chunk the server sends holds
    whole SSE messages (tandem and sse-starlette both send whole events), so the markers never
    straddle a chunk boundary; they can straddle a read boundary, which the kept tail covers (one
    byte shorter than the delta marker, so no delta is counted twice; the others only set a flag).
    A stream whose source failed (an `error` event: worker lost, task failed, cancelled) still
    ends, and is counted as an error of the run.
    """

    __slots__ = ("_tail",)

    def __init__(self, rec: Rec, sink: CountSink) -> None:
        super().__init__(rec, sink)
        self._tail = b""
        self.bins = sink.bins

    def data_received(self, data: bytes) -> None:
        t = time.time()
        rec = self.rec
        if self._head is not None:
            head = self._head + data
            i = head.find(b"\r\n\r\n")
            if i < 0:
                self._head = head
                return
            self._head = None
            rec.status = int(head[9:12])
            data = head[i + 4 :]
            if rec.status != 200:
                self.close()
                rec.finish(f"HTTP {rec.status}")
                return
        buf = self._tail + data if self._tail else data
        self._tail = buf[-12:]
        if rec.meta_t is None and _META in buf:
            rec.got_meta(t)
        k = buf.count(_DELTA)
        if k:
            if rec.first_t is None:
                rec.first_t = t
            rec.deltas += k
            ms = int(t * 1000)
            self.bins[ms] = self.bins.get(ms, 0) + k
        if _ERROR in buf:
            rec.finish("a source failed (an error event)")
        if _END in buf:
            rec.end_t = t
            self.close()
            rec.finish()


async def open_sse(host: str, port: int, rec: Rec, sink: Sink, last_id: bytes | None = None) -> Reader:
    loop = asyncio.get_running_loop()
    reader = CountReader(rec, sink) if isinstance(sink, CountSink) else Reader(rec, sink)
    rec.reader = reader
    head = f"GET {rec.events_url} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
    if last_id is not None:
        head += f"Last-Event-ID: {last_id.decode()}\r\n"
    await loop.create_connection(lambda: reader, host, port)
    assert reader.transport is not None
    reader.transport.write(head.encode() + b"\r\n")
    return reader


# -- jobs -----------------------------------------------------------------------------------------


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
    sys.stdout.flush()


async def wait_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def body_for(job: dict[str, Any], rng: random.Random) -> bytes:
    b_opts = dict(job["b"])
    lo_hi = job.get("b_delay_ms_range")
    if lo_hi:
        b_opts["delay_ms"] = round(rng.uniform(lo_hi[0], lo_hi[1]), 1)
    doc = {
        "prompt": job.get("prompt", "bench"),
        "a": {"task": "simulated", "options": job["a"]},
        "b": {"task": "simulated", "options": b_opts},
        "pacing": job["pacing"],
    }
    return orjson.dumps(doc)


async def create(pool: Pool, rec: Rec) -> None:
    status, data, rec.post_t = await pool.request("POST", "/v1/streams", rec.body)
    rec.posted_t = time.time()
    if status != 201:
        raise RuntimeError(f"create: HTTP {status}: {data[:200]!r}")
    doc = orjson.loads(data)
    rec.id, rec.events_url = doc["id"], doc["events_url"]


class Job:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.host: str = spec.get("host", "127.0.0.1")
        self.port: int = spec["port"]
        self.pool = Pool(self.host, self.port, spec.get("post_concurrency", 32))
        self.connect_sem = asyncio.Semaphore(spec.get("connect_concurrency", 256))
        self.rng = random.Random(spec.get("seed", 1))
        self.recs = [Rec(i, body_for(spec, self.rng)) for i in range(spec["n"])]

    async def _open(self, rec: Rec, sink: Sink) -> None:
        """Connect one created stream; returns once its meta arrived (or it failed)."""
        if rec.done.done():
            return
        async with self.connect_sem:
            try:
                await open_sse(self.host, self.port, rec, sink)
                await asyncio.wait([rec.opened, rec.done], return_when=asyncio.FIRST_COMPLETED)
            except Exception as e:
                rec.finish(f"{type(e).__name__}: {e}")

    async def open_all(self, sink: Sink, limit_s: float) -> None:
        """Create every stream (at the pool's concurrency), then connect them all."""
        await asyncio.gather(*(self._create_only(r) for r in self.recs))
        await asyncio.wait_for(asyncio.gather(*(self._open(r, sink) for r in self.recs)), limit_s)

    async def _create_only(self, rec: Rec) -> None:
        try:
            await create(self.pool, rec)
        except Exception as e:
            rec.finish(f"{type(e).__name__}: {e}")

    async def wait_all(self, limit_s: float) -> bool:
        pending = [r.done for r in self.recs if not r.done.done()]
        if not pending:
            return True
        _, still = await asyncio.wait(pending, timeout=limit_s)
        for r in self.recs:
            if not r.done.done():
                r.finish("timeout")
                if r.reader is not None:
                    r.reader.abort()
        return not still

    def failures(self) -> list[str]:
        return sorted({r.error for r in self.recs if r.error})[:5]

    def creates_ms(self) -> list[float]:
        return [round((r.posted_t - r.post_t) * 1000, 3) for r in self.recs if r.posted_t]


async def job_throughput(job: Job) -> dict[str, Any]:
    """Open every stream (its producer held back by the caller), report ready, read everything."""
    sink = CountSink()
    await job.open_all(sink, job.spec.get("open_timeout_s", 120))
    emit({"ready": {"opened": sum(r.meta_t is not None for r in job.recs)}})
    await wait_line()  # the caller has released the producers
    complete = await job.wait_all(job.spec.get("timeout_s", 120))
    return {
        "complete": complete,
        "bins": sink.bins,
        "first_t": [r.first_t for r in job.recs],
        "end_t": [r.end_t for r in job.recs],
        "deltas": [r.deltas for r in job.recs],
        "errors": job.failures(),
        "create_ms": job.creates_ms(),
    }


async def job_idle(job: Job) -> dict[str, Any]:
    """Open every stream and keep it open, idle, until told to close."""
    sink = CountSink()
    await job.open_all(sink, job.spec.get("open_timeout_s", 300))
    opened = sum(r.meta_t is not None and r.error is None for r in job.recs)
    emit({"ready": {"opened": opened}})
    await wait_line()
    for r in job.recs:
        if r.reader is not None:
            r.reader.abort()
    await asyncio.sleep(0.2)
    return {"opened": opened, "errors": job.failures(), "create_ms": job.creates_ms()}


async def job_paced(job: Job) -> dict[str, Any]:
    """Streams created at a steady rate over `ramp_s`, each read to its end; some drop and resume."""
    spec = job.spec
    n, ramp = len(job.recs), spec["ramp_s"]
    t0 = time.time()
    w0, w1 = spec.get("window_s", (0.0, 1e9))
    sink = ParseSink((1000 * (t0 + w0), 1000 * (t0 + w1)), require_flush=spec.get("require_flush", False), interval_ms=spec["a"].get("interval_ms"))
    resume_idx = set(job.rng.sample(range(n), round(n * spec.get("resume_fraction", 0.0))))
    lo, hi = spec.get("resume_at_s", (1.0, 2.0))
    gap = spec.get("resume_gap_s", 0.2)

    async def one(rec: Rec, resume_at: float | None) -> None:
        try:
            await create(job.pool, rec)
            await open_sse(job.host, job.port, rec, sink)
            if resume_at is None:
                return
            await asyncio.sleep(max(0.0, rec.post_t + resume_at - time.time()))
            if rec.done.done() or rec.reader is None:
                return
            rec.reader.abort()
            rec.drop_t = time.time()
            rec.excl_lo = rec.drop_t * 1000 - 50
            await asyncio.sleep(gap)
            rec.resume_t = time.time()
            await open_sse(job.host, job.port, rec, sink, rec.last_id)
        except Exception as e:
            rec.finish(f"{type(e).__name__}: {e}")

    tasks = []
    for rec in job.recs:
        delay = t0 + rec.idx * ramp / n - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        at = job.rng.uniform(lo, hi) if rec.idx in resume_idx else None
        tasks.append(asyncio.create_task(one(rec, at)))
    await asyncio.gather(*tasks)
    complete = await job.wait_all(spec.get("timeout_s", 120))
    tokens = spec.get("a_tokens")
    per: dict[str, list[float]] = {"ttfd_ms": [], "flush_ms": [], "resume_ms": [], "flush_steady_ms": [], "resume_steady_ms": []}
    # Flushes and resumes while streams are still being created (every create and connect costs
    # the API far more than an event) are told apart from those with every stream open: "steady".
    ramp_end = max((r.posted_t for r in job.recs if r.posted_t), default=0.0)
    resume_missed = flush_unseen = 0
    for r in job.recs:
        if r.first_t is not None:
            per["ttfd_ms"].append(round((r.first_t - r.post_t) * 1000, 3))
        if r.first_flushed_t is not None and r.b_done_ms is not None:
            if r.drop_t is not None and r.resume_t is not None and r.drop_t <= r.first_flushed_t and r.resume_t * 1000 >= r.b_done_ms:
                # The client was away (dropped, then resumed) between B's completion and the
                # flush: it got the flush on reconnecting, a resume's latency (counted there).
                flush_unseen += 1
                continue
            per["flush_ms"].append(x := round(r.first_flushed_t * 1000 - r.b_done_ms, 3))
            if r.b_done_ms > ramp_end * 1000:
                per["flush_steady_ms"].append(x)
        if r.resume_first_t is not None and r.resume_t is not None:
            per["resume_ms"].append(x := round((r.resume_first_t - r.resume_t) * 1000, 3))
            if r.drop_t is not None and r.drop_t > ramp_end:
                per["resume_steady_ms"].append(x)
            if r.resume_first_ms is not None and r.resume_first_ms <= r.resume_t * 1000:
                resume_missed += 1  # the first event after the reconnect had been written before it
    # The tokens written while the steady flushes happened: flushes all fall in the first part of
    # the run (B completes 0.6-9 s after its start), while streams are still being created, slowed
    # and resumed, and most token samples come later, when every stream flows freely. A flush
    # travels the token's path, so its latency is comparable with these, not with all tokens.
    steady_b = [r.b_done_ms for r in job.recs if r.b_done_ms is not None and r.first_flushed_t is not None and r.b_done_ms > ramp_end * 1000]
    lo_ms, hi_ms = (min(steady_b), max(steady_b)) if steady_b else (0, -1)
    span_lat = [round(x, 3) for x, ms in zip(sink.token_lat, sink.token_ms, strict=True) if lo_ms <= ms <= hi_ms]
    ok = sum(r.end_t is not None and r.order_errors == 0 and (tokens is None or r.a_deltas == tokens) for r in job.recs)
    return {
        "complete": complete,
        "token_lat_ms": [round(x, 3) for x in sink.token_lat],
        "token_flush_span_ms": span_lat,
        "due_lat_ms": [round(x, 3) for x in sink.due_lat],
        **per,
        "deltas": sum(r.deltas for r in job.recs),
        "resumes": len(per["resume_ms"]),
        "resumes_of_missed_events": resume_missed,
        "flushes_while_away": flush_unseen,
        "ramp_s": round(ramp_end - t0, 3),
        "streams_ok": ok,
        "order_errors": sum(r.order_errors for r in job.recs),
        "errors": job.failures(),
        "create_ms": job.creates_ms(),
    }


async def job_backlog(job: Job) -> dict[str, Any]:
    """One stream at a time: A's whole backlog waits behind B, then flushes (tandem); or a burst (baseline)."""
    sink = ParseSink()
    runs = []
    for rec in job.recs:
        try:
            await create(job.pool, rec)
            await open_sse(job.host, job.port, rec, sink)
        except Exception as e:
            rec.finish(f"{type(e).__name__}: {e}")
        await asyncio.wait([rec.done], timeout=job.spec.get("timeout_s", 60))
        run: dict[str, Any] = {"a_deltas": rec.a_deltas, "ended": rec.end_t is not None}
        if rec.b_done_ms is not None and rec.first_flushed_t is not None and rec.last_a_t is not None:
            run["flush_first_ms"] = round(rec.first_flushed_t * 1000 - rec.b_done_ms, 3)
            run["backlog_ms"] = round(rec.last_a_t * 1000 - rec.b_done_ms, 3)
            run["a_written_before_b_done"] = rec.a_done_ms is not None and rec.a_done_ms <= rec.b_done_ms
        if rec.first_a_ms is not None and rec.last_a_t is not None:
            run["burst_ms"] = round(rec.last_a_t * 1000 - rec.first_a_ms, 3)
        runs.append(run)
        await asyncio.sleep(job.spec.get("pause_s", 0.3))
    return {"runs": runs, "errors": job.failures()}


JOBS = {"throughput": job_throughput, "idle": job_idle, "paced": job_paced, "backlog": job_backlog}


async def main() -> None:
    raise_nofile()
    # The client is the measuring instrument: a pause of its own would be counted as the server's
    # latency. Its collector's full passes over a thousand connections' objects took 10-13 ms,
    # once or twice per paced run, and delayed every token that arrived meanwhile. A job is one
    # bounded run in a process of its own, and what it drops is freed by reference counting.
    gc.disable()
    spec = orjson.loads(sys.stdin.readline())
    job = Job(spec)
    try:
        result = await JOBS[spec["kind"]](job)
        emit({"result": result})
        await wait_line()  # stay (and countable in /proc) until the caller has read its CPU figures
    except Exception as e:
        emit({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
    finally:
        job.pool.close()


if __name__ == "__main__":
    uvloop.run(main())
