"""`make bench`: tandem against the in-process baseline, side by side, in one run.

Starts a private Redis (RedisServer), one `tandem api`, two `tandem worker`s and the baseline
(bench/baseline_server.py), drives both with the load generator (bench/loadgen.py, processes of
its own) and writes bench/out/results.json, bench/out/bench.png and the table on stdout.

    .venv/bin/python -m bench.run            # the full run (a few minutes)
    .venv/bin/python -m bench.run --smoke    # seconds, small numbers: what CI runs

Every client and server shares the machine's 2 cores, so every figure comes with the CPU each
process used in its window (utime+stime from /proc): server CPU per event shows what the server
costs whatever the client takes, and client CPU per event shows the client is not the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis as redis_sync

from bench import report
from bench.sysstat import CpuWindow, cpu_seconds, fd_count, local_ports_to, pcts, python_speed, raise_nofile, rss_kib
from shared.redis_server import RedisServer, free_port
from tests.harness import Stack

ROOT = Path(__file__).resolve().parent.parent
UNPACED = {"slow_interval_ms": 0, "b_interval_ms": 0}
IDLE_DELAY_MS = 3_600_000
PARTS = ("throughput", "latency", "backlog", "profile", "open")


class BenchError(RuntimeError):
    pass


@dataclass
class Params:
    mode: str
    throughput_streams: list[int]
    events_per_run: int  # tokens per stream = events_per_run / streams (at least min_tokens)
    min_tokens: int
    paced_streams: int
    paced_rate: float  # tokens/s per stream
    paced_seconds: float  # how long each stream's A runs
    paced_ramp_s: float  # streams are created evenly over this long
    b_delay_ms: tuple[float, float]  # B completes this long after its start: the flush (some during the ramp, most after)
    slow_interval_ms: int
    resume_fraction: float
    resume_at_s: tuple[float, float]  # after creation; after the flush, before A's end
    resume_gap_s: float
    backlog_tokens: int
    backlog_b_delay_ms: float
    backlog_runs: int
    open_streams: list[int]
    clients: int = 1
    profile: bool = False
    profile_streams: int = 1000
    profile_native: bool = False
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    keep_logs: bool = False
    env: dict[str, str] = field(default_factory=dict)


SMOKE = Params(
    mode="smoke", throughput_streams=[1, 20], events_per_run=4000, min_tokens=20,
    paced_streams=20, paced_rate=20, paced_seconds=3.5, paced_ramp_s=0.3, b_delay_ms=(300, 1000), slow_interval_ms=250,
    resume_fraction=0.25, resume_at_s=(1.0, 2.0), resume_gap_s=0.2,
    backlog_tokens=2000, backlog_b_delay_ms=700, backlog_runs=1, open_streams=[200],
)  # fmt: skip
FULL = Params(
    mode="full", throughput_streams=[1, 100, 1000, 5000], events_per_run=250_000, min_tokens=100,
    paced_streams=1000, paced_rate=20, paced_seconds=15, paced_ramp_s=2.0, b_delay_ms=(600, 9000), slow_interval_ms=250,
    resume_fraction=0.2, resume_at_s=(2.5, 13.0), resume_gap_s=0.2,
    backlog_tokens=10_000, backlog_b_delay_ms=2500, backlog_runs=3, open_streams=[1000, 10_000], profile=True,
)  # fmt: skip

# Settings for tandem's processes in the bench (TANDEM_* variables; no code changes):
TANDEM_ENV = {
    "TANDEM_WORKER_MAX_JOBS": "20000",  # default 100 per worker: 1,000 paced streams need 2,000 jobs at once
    "TANDEM_MAX_SOURCE_EVENTS": "1000000",  # the 1-stream run writes 250,000 tokens to one source
    "TANDEM_RETENTION_S": "600",
    "TANDEM_LOG_LEVEL": "warning",  # info logs a line per stream and per job
}


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    pids: dict[str, int]  # every server-side process; the first serves HTTP
    hold: Callable[[], None]
    release: Callable[[], None]

    @property
    def server_pid(self) -> int:
        return next(iter(self.pids.values()))


class Client:
    """One loadgen process running one job."""

    def __init__(self, job: dict[str, Any], log: Path) -> None:
        self.log = log
        self._log_fh = log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log_fh, text=True, bufsize=1,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.send(json.dumps(job))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, line: str = "go") -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def expect(self, key: str, timeout: float) -> Any:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"loadgen: no {key!r} within {timeout:.0f}s") from None
        if line is None:
            raise BenchError(f"loadgen exited: {self.log.read_text(errors='replace')[-2000:]}")
        doc = json.loads(line)
        if "error" in doc:
            raise BenchError(f"loadgen: {doc['error']}\n{doc.get('trace', '')}")
        return doc[key]

    def close(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.popen.stdin is not None
                self.popen.stdin.close()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log_fh.close()


class Bench:
    def __init__(self, params: Params, out: Path) -> None:
        self.p = params
        self.out = out
        self.tmp = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
        self.stack = contextlib.ExitStack()
        self.redis: RedisServer | None = None
        self.redis_client: redis_sync.Redis | None = None
        self.tandem: Target | None = None
        self.baseline: Target | None = None
        self.api_pid = 0
        self.queue_name = ""
        self._warm: set[str] = set()

    # -- start and stop ------------------------------------------------------------------------

    def start(self) -> None:
        # AOF on, fsync every second: the durable configuration tandem is meant to run with.
        self.redis = RedisServer(self.tmp / "redis", appendonly=True).start()
        self.stack.callback(self.redis.stop)
        raise_nofile(self.redis.proc.pid if self.redis.proc else None)
        self.redis_client = redis_sync.Redis.from_url(self.redis.url)
        stack = Stack(self.tmp, self.redis, env_extra={**TANDEM_ENV, **self.p.env})
        self.stack.callback(stack.stop)
        self.queue_name = stack.env["TANDEM_QUEUE_NAME"]
        workers = [stack.start_worker(), stack.start_worker()]
        api = stack.start_api()
        self.api_pid = api.popen.pid
        raise_nofile(self.api_pid)

        def hold() -> None:
            for w in workers:
                os.kill(w.popen.pid, signal.SIGSTOP)

        def release() -> None:
            for w in workers:
                os.kill(w.popen.pid, signal.SIGCONT)

        pids = {"api": self.api_pid, "worker0": workers[0].popen.pid, "worker1": workers[1].popen.pid}
        assert self.redis.proc is not None
        pids["redis"] = self.redis.proc.pid
        self.stack.callback(release)  # never leave a stopped worker behind
        self.tandem = Target("tandem", api.port or 0, pids, hold, release)

        port = free_port()
        log = (self.tmp / "baseline.log").open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.baseline_server", "--port", str(port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        self.stack.callback(_kill, proc)
        raise_nofile(proc.pid)
        base = f"http://127.0.0.1:{port}"
        _wait_http(base + "/healthz", proc)
        self.baseline = Target(
            "baseline", port, {"baseline": proc.pid},
            lambda: _post(base + "/bench/hold"), lambda: _post(base + "/bench/release"),
        )  # fmt: skip

    def close(self) -> None:
        if self.redis_client is not None:
            self.redis_client.close()
        self.stack.close()
        if self.p.keep_logs:
            print(f"[bench] logs kept in {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def targets(self) -> list[Target]:
        assert self.tandem is not None and self.baseline is not None
        return [self.baseline, self.tandem]

    # -- helpers -------------------------------------------------------------------------------

    def clients(self, target: Target, job: dict[str, Any], n: int, name: str) -> list[Client]:
        k = max(1, min(self.p.clients, n))
        out = []
        for i in range(k):
            share = n // k + (1 if i < n % k else 0)
            spec = {**job, "port": target.port, "n": share, "seed": 1000 * i + 7}
            out.append(Client(spec, self.tmp / f"loadgen-{target.name}-{name}-{i}.log"))
        return out

    def settle(self, target: Target, limit_s: float = 10.0) -> None:
        """Wait until each of the target's processes is quiet (< 5% of a core over 0.4 s, give or
        take a tick): the workers and Redis may still be winding down the previous run. tandem's
        runs start with an empty Redis (`fresh_redis`)."""
        if target.name == "tandem" and self.redis_client is not None:
            self.fresh_redis()
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            c0 = {k: cpu_seconds(p) for k, p in target.pids.items()}
            time.sleep(0.4)
            if all(cpu_seconds(p) - c0[k] <= 0.4 * 0.05 + 0.01 for k, p in target.pids.items()):
                return

    def fresh_redis(self, limit_s: float = 60.0) -> None:
        """Empty Redis and rewrite its append-only file, before each of tandem's runs. What earlier
        runs left (millions of entries after the throughput runs) otherwise makes Redis fork AOF
        rewrites of tens of MB during the next run, children that take a core for half a second
        each on the same two cores: three of them overlapped one paced run, and its token p99 was
        ~60 ms instead of ~10. (In production Redis has cores of its own.) Each run then measures
        what it runs, in any order."""
        assert self.redis_client is not None
        self.redis_client.flushall()
        self.redis_client.bgrewriteaof()  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            info: dict[str, Any] = self.redis_client.info("persistence")  # type: ignore[assignment]
            if not int(info.get("aof_rewrite_in_progress", 0)) and not int(info.get("aof_rewrite_scheduled", 0)):
                return
            time.sleep(0.05)

    def api_redis_conns(self) -> int:
        """Redis connections held by the API process: CLIENT LIST entries from the API's local ports."""
        assert self.redis is not None and self.redis_client is not None
        ports = local_ports_to(self.api_pid, self.redis.port)
        clients: list[dict[str, Any]] = self.redis_client.client_list()  # type: ignore[assignment]
        return sum(1 for c in clients if int(str(c.get("addr", ":0")).rsplit(":", 1)[1]) in ports)

    def redis_used_kib(self) -> float:
        assert self.redis_client is not None
        info: dict[str, Any] = self.redis_client.info("memory")  # type: ignore[assignment]
        return int(info["used_memory"]) / 1024

    # -- scenarios -----------------------------------------------------------------------------

    def idle_cpu(self, seconds: float = 2.0) -> dict[str, Any]:
        """What every process costs with no stream at all (arq polls its queue; the hub waits)."""
        pids = {k: v for t in self.targets() for k, v in t.pids.items()}
        win = CpuWindow(pids)
        win.start(time.time())
        time.sleep(seconds)
        win.stop(time.time())
        return win.summary()

    def throughput(self, target: Target, n: int, on_release: Callable[[], None] | None = None,
                   on_done: Callable[[], None] | None = None) -> dict[str, Any]:  # fmt: skip
        p = self.p
        tokens = max(p.events_per_run // n, p.min_tokens)
        job: dict[str, Any] = {
            "kind": "throughput", "a": {"tokens": tokens, "interval_ms": 0}, "b": {"tokens": 1, "interval_ms": 0},
            "pacing": UNPACED, "open_timeout_s": 60 + n / 50, "timeout_s": 60 + n * tokens / 5000,
        }  # fmt: skip
        self.settle(target)
        target.hold()
        clients: list[Client] = []
        sampler = ConnSampler(self, target)
        try:
            clients = self.clients(target, job, n, f"tp{n}")
            for c in clients:
                c.expect("ready", job["open_timeout_s"] + 30)
            win = CpuWindow({**target.pids, **{f"client{i}": c.pid for i, c in enumerate(clients)}})
            sampler.start()
            t_rel = time.time()
            win.start(t_rel)
            if on_release is not None:
                on_release()
            target.release()
            for c in clients:
                c.send("go")
            results = [c.expect("result", job["timeout_s"] + 30) for c in clients]
            win.stop(time.time())
            if on_done is not None:
                on_done()
        finally:
            target.release()
            sampler.stop()
            for c in clients:
                c.close()
        return summarize_throughput(target, n, tokens, t_rel, results, win, sampler.max)

    def paced(self, target: Target) -> dict[str, Any]:
        p = self.p
        tokens = round(p.paced_seconds * p.paced_rate)
        tandem = target.name == "tandem"
        job: dict[str, Any] = {
            "kind": "paced", "ramp_s": p.paced_ramp_s, "a_tokens": tokens,
            "a": {"tokens": tokens, "interval_ms": 1000 / p.paced_rate}, "b": {"tokens": 1, "interval_ms": 0},
            "b_delay_ms_range": list(p.b_delay_ms),
            "pacing": {"slow_interval_ms": p.slow_interval_ms, "b_interval_ms": 0},
            # tokens written while every stream is open: after the ramp, before the first stream ends
            "window_s": [p.paced_ramp_s + 0.2, p.paced_seconds],
            "require_flush": tandem,
            "resume_fraction": p.resume_fraction if tandem else 0.0,
            "resume_at_s": list(p.resume_at_s), "resume_gap_s": p.resume_gap_s,
            "timeout_s": p.paced_seconds + p.paced_ramp_s + 60,
        }  # fmt: skip
        self.settle(target)
        clients = self.clients(target, job, p.paced_streams, "paced")
        win = CpuWindow({**target.pids, **{f"client{i}": c.pid for i, c in enumerate(clients)}})
        win.start(time.time())
        try:
            results = [c.expect("result", job["timeout_s"] + 30) for c in clients]
            win.stop(time.time())
        finally:
            for c in clients:
                c.close()
        lat = sorted(x for r in results for x in r["token_lat_ms"])
        out: dict[str, Any] = {
            "streams": p.paced_streams, "tokens_per_s": p.paced_rate, "tokens_per_stream": tokens,
            "token_samples": len(lat),
            **_named("token", pcts(lat, 0.5, 0.9, 0.99, 0.999)),
            "token_max_ms": lat[-1] if lat else None,
            **_named("due", pcts((x for r in results for x in r["due_lat_ms"]), 0.5, 0.99)),
            "token_cdf_ms": [lat[min(len(lat) - 1, round(i * (len(lat) - 1) / 200))] for i in range(201)] if lat else [],
            **_named("ttfd", pcts((x for r in results for x in r["ttfd_ms"]), 0.5, 0.99)),
            **_named("create", pcts((x for r in results for x in r["create_ms"]), 0.5, 0.99)),
            "streams_ok": sum(r["streams_ok"] for r in results),
            "order_errors": sum(r["order_errors"] for r in results),
            "errors": sorted({e for r in results for e in r["errors"]})[:5],
            "cpu": win.summary(),
        }  # fmt: skip
        out["server_cpu_pct"] = out["cpu"][next(iter(target.pids))]["pct"]
        events = max(1, sum(r["deltas"] for r in results))
        out["events"] = events
        out["server_cpu_us_per_event"] = round(win.cpu[next(iter(target.pids))] / events * 1e6, 2)
        out["stack_cpu_us_per_event"] = round(sum(win.cpu[k] for k in target.pids) / events * 1e6, 2)
        if tandem:
            out["workers_cpu_us_per_event"] = round((win.cpu["worker0"] + win.cpu["worker1"]) / events * 1e6, 2)
            out["redis_cpu_us_per_event"] = round(win.cpu["redis"] / events * 1e6, 2)
        if tandem:
            out |= _named("flush", pcts((x for r in results for x in r["flush_ms"]), 0.5, 0.99))
            out["flush_samples"] = sum(len(r["flush_ms"]) for r in results)
            out |= _named("flush_steady", pcts((x for r in results for x in r["flush_steady_ms"]), 0.5, 0.99))
            out["flush_steady_samples"] = sum(len(r["flush_steady_ms"]) for r in results)
            out["flushes_while_away"] = sum(r["flushes_while_away"] for r in results)
            span = [x for r in results for x in r["token_flush_span_ms"]]
            out |= _named("token_flush_span", pcts(span, 0.5, 0.99))
            out["token_flush_span_samples"] = len(span)
            out |= _named("resume", pcts((x for r in results for x in r["resume_ms"]), 0.5, 0.99))
            out |= _named("resume_steady", pcts((x for r in results for x in r["resume_steady_ms"]), 0.5, 0.99))
            out["resume_steady_samples"] = sum(len(r["resume_steady_ms"]) for r in results)
            out["ramp_s"] = max(r["ramp_s"] for r in results)  # how long creating every stream took
            out["resumes"] = sum(r["resumes"] for r in results)
            out["resumes_of_missed_events"] = sum(r["resumes_of_missed_events"] for r in results)
        return out

    def backlog(self, target: Target) -> dict[str, Any]:
        p = self.p
        job: dict[str, Any] = {
            "kind": "backlog", "n": p.backlog_runs,
            "a": {"tokens": p.backlog_tokens, "interval_ms": 0},
            "b": {"tokens": 1, "interval_ms": 0, "delay_ms": p.backlog_b_delay_ms},
            "pacing": {"slow_interval_ms": 60_000, "b_interval_ms": 0},
            "timeout_s": 60,
        }  # fmt: skip
        self.settle(target)
        # One client, runs one after another.
        client = Client({**job, "port": target.port, "seed": 7}, self.tmp / f"loadgen-{target.name}-backlog.log")
        try:
            res = client.expect("result", 60 * p.backlog_runs + 30)
        finally:
            client.close()
        runs = res["runs"]
        out: dict[str, Any] = {"tokens": p.backlog_tokens, "runs": runs, "errors": res["errors"]}
        for key in ("backlog_ms", "flush_first_ms", "burst_ms"):
            vals = [r[key] for r in runs if key in r]
            if vals:
                out[key] = round(statistics.median(vals), 2)
        return out

    def open_streams(self, target: Target, n: int) -> dict[str, Any]:
        tandem = target.name == "tandem"
        job: dict[str, Any] = {
            "kind": "idle", "a": {"tokens": 1, "delay_ms": IDLE_DELAY_MS}, "b": {"tokens": 1, "delay_ms": IDLE_DELAY_MS},
            "pacing": UNPACED, "open_timeout_s": 60 + n / 50,
        }  # fmt: skip
        if target.name not in self._warm:
            # Serve a few streams first, so one-off start-up allocations (imports, caches, the
            # pool's connections) do not count as per-stream memory.
            self._warm.add(target.name)
            self._idle_streams(target, {**job, "open_timeout_s": 60}, 50, "warmup")
        self.settle(target)
        pid = target.server_pid
        before: dict[str, float] = {"rss_kib": rss_kib(pid), "fds": fd_count(pid)}
        if tandem:
            before["redis_conns"] = self.api_redis_conns()
            before["redis_used_kib"] = self.redis_used_kib()
        # Idle: producers held (tandem: jobs stay queued; baseline: producer tasks wait), so the
        # server holds each stream open with nothing to send, as with a long delay_ms.
        target.hold()
        clients: list[Client] = []
        try:
            clients = self.clients(target, job, n, f"open{n}")
            opened = sum(c.expect("ready", job["open_timeout_s"] + 30)["opened"] for c in clients)
            time.sleep(1.0)
            after: dict[str, float] = {"rss_kib": rss_kib(pid), "fds": fd_count(pid)}
            if tandem:
                after["redis_conns"] = self.api_redis_conns()
                after["redis_used_kib"] = self.redis_used_kib()
            self._close_idle(clients)
        finally:
            self._release_idle(target, clients)
        out: dict[str, Any] = {
            "streams": n, "opened": opened, "before": before, "after": after,
            "rss_per_stream_kib": round((after["rss_kib"] - before["rss_kib"]) / max(opened, 1), 2),
            "fds_per_stream": round((after["fds"] - before["fds"]) / max(opened, 1), 3),
        }  # fmt: skip
        if tandem:
            out["redis_conns"] = after["redis_conns"]
            out["redis_conns_idle"] = before["redis_conns"]
            out["redis_kib_per_stream"] = round((after["redis_used_kib"] - before["redis_used_kib"]) / max(opened, 1), 2)
        return out

    def _idle_streams(self, target: Target, job: dict[str, Any], n: int, name: str) -> None:
        target.hold()
        clients: list[Client] = []
        try:
            clients = self.clients(target, job, n, name)
            for c in clients:
                c.expect("ready", job["open_timeout_s"] + 30)
            self._close_idle(clients)
        finally:
            self._release_idle(target, clients)

    @staticmethod
    def _close_idle(clients: list[Client]) -> None:
        """Tell idle-stream clients to drop their connections, and wait for their reports."""
        for c in clients:
            c.send("close")
        for c in clients:
            c.expect("result", 60)

    def _release_idle(self, target: Target, clients: list[Client]) -> None:
        for c in clients:
            c.close()
        if target.name == "tandem" and self.redis_client is not None:
            self.redis_client.delete(self.queue_name)  # the held jobs never run
        target.release()

    def profile(self) -> dict[str, Any]:
        """py-spy on the API process during an unpaced run of `profile_streams` (1,000) streams."""
        assert self.tandem is not None
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not os.path.exists(exe):
            return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
        n = self.p.profile_streams
        raw = self.out / "profile-api.txt"
        # Python frames only, without pausing the API: the least distortion (py-spy itself needs CPU
        # on the same 2 cores). --profile-native pauses it for each sample and shows C frames too
        # (CPython's GC, syscalls), at a much lower throughput while it runs.
        rate = 100
        mode = ["--native"] if self.p.profile_native else ["--nonblocking"]
        holder: dict[str, Any] = {}

        def start() -> None:
            holder["t0"] = time.monotonic()
            holder["proc"] = subprocess.Popen(
                [exe, "record", "--pid", str(self.api_pid), "--rate", str(rate), "--format", "raw", "-F", *mode,
                 "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(0.3)  # attached before the producers go

        def stop() -> None:
            holder["secs"] = time.monotonic() - holder["t0"]
            proc: subprocess.Popen[bytes] = holder["proc"]
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        run = self.throughput(self.tandem, n, start, stop)
        prof = report.parse_pyspy(raw, rate * holder.get("secs", 1.0)) if raw.exists() else {"error": "py-spy wrote nothing"}
        return {"streams": n, "events_per_s": run["events_per_s"], "file": raw.name, "native": self.p.profile_native, **prof}


class ConnSampler:
    """The most Redis connections the API, and each worker, held during a run: CLIENT LIST every
    0.5 s, counted by the names tandem gives its connections (`tandem-api:<host>:<pid>`,
    `tandem-worker:<host>:<pid>`), and once at the end from each process's own sockets (/proc),
    which would count an unnamed connection too. (Reading /proc every 0.5 s instead took the
    machine a tenth of a core: /proc/<pid>/net/tcp lists every socket of the host, 10,000 and
    more at 5,000 streams.)"""

    def __init__(self, bench: Bench, target: Target) -> None:
        self.bench = bench
        self.pids = {k: v for k, v in target.pids.items() if k == "api" or k.startswith("worker")}
        self.max: dict[str, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis_sync.Redis | None = None

    def _seen(self, counts: dict[str, int]) -> None:
        assert self.max is not None
        for name, n in counts.items():
            self.max[name] = max(self.max.get(name, 0), n)

    def _named(self) -> dict[str, int]:
        assert self._client is not None
        by_pid = {str(pid): name for name, pid in self.pids.items()}
        counts = dict.fromkeys(self.pids, 0)
        clients: list[dict[str, Any]] = self._client.client_list()  # type: ignore[assignment]
        for c in clients:
            label = str(c.get("name", ""))
            if label.startswith(("tandem-api:", "tandem-worker:")):
                name = by_pid.get(label.rsplit(":", 1)[1])
                if name is not None:
                    counts[name] += 1
        return counts

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._seen(self._named())

    def start(self) -> None:
        if self.pids and self.bench.redis is not None:
            self.max = {}
            self._client = redis_sync.Redis.from_url(self.bench.redis.url)
            self._seen(self._named())
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._client is not None and self.bench.redis is not None:
            self._thread.join()
            self._seen(self._named())
            self._seen({name: len(local_ports_to(pid, self.bench.redis.port)) for name, pid in self.pids.items()})
            self._client.close()


def summarize_throughput(
    target: Target, n: int, tokens: int, t_rel: float, results: list[dict[str, Any]], win: CpuWindow, conns: dict[str, int] | None
) -> dict[str, Any]:
    bins: dict[int, int] = {}
    for r in results:
        for k, v in r["bins"].items():
            bins[int(k)] = bins.get(int(k), 0) + v
    firsts = [x for r in results for x in r["first_t"]]
    ends = [x for r in results for x in r["end_t"]]
    total = sum(bins.values())
    out: dict[str, Any] = {
        "streams": n, "tokens_per_stream": tokens, "events": total, "events_expected": n * (tokens + 1),
        "events_per_s": steady_rate(bins),
        "streams_complete": sum(e is not None for e in ends),
        "peak_active_streams": peak_active(firsts, ends),
        **_named("first_delta", pcts(((f - t_rel) * 1000 for f in firsts if f is not None), 0.5, 0.99)),
        **_named("create", pcts((x for r in results for x in r["create_ms"]), 0.5, 0.99)),
        "errors": sorted({e for r in results for e in r["errors"]})[:5],
        "cpu": win.summary(),
    }  # fmt: skip
    done = [e for e in ends if e is not None]
    out["duration_s"] = round(max(done) - t_rel, 3) if done else None
    out["events_per_s_overall"] = round(total / out["duration_s"]) if out["duration_s"] else None
    events = max(total, 1)
    server = [k for k in target.pids]
    out["server_cpu_us_per_event"] = round(win.cpu[server[0]] / events * 1e6, 2)
    out["stack_cpu_us_per_event"] = round(sum(win.cpu[k] for k in server) / events * 1e6, 2)
    out["client_cpu_us_per_event"] = round(sum(v for k, v in win.cpu.items() if k.startswith("client")) / events * 1e6, 2)
    out["server_cpu_pct"] = out["cpu"][server[0]]["pct"]
    if conns is not None:
        out["api_redis_conns_max"] = conns["api"]
        # A worker's connections: its append pipe's, plus its pool's (TANDEM_WORKER_REDIS_POOL_SIZE).
        out["worker_redis_conns_max"] = max(v for k, v in conns.items() if k.startswith("worker"))
    return out


def steady_rate(bins: dict[int, int]) -> float | None:
    """Events/s between the 10th and the 90th percentile of all receipts (ramp and tail left out)."""
    total = sum(bins.values())
    if not total:
        return None
    keys = sorted(bins)
    lo_n, hi_n = 0.1 * total, 0.9 * total
    cum, t10, c10, t90, c90 = 0, keys[0], 0, keys[-1], total
    for k in keys:
        before, cum = cum, cum + bins[k]
        if before < lo_n <= cum:
            t10, c10 = k, before
        if before < hi_n <= cum:
            t90, c90 = k, cum
            break
    span_ms = t90 - t10 + 1
    return round((c90 - c10) / (span_ms / 1000), 1)


def peak_active(firsts: list[float | None], ends: list[float | None]) -> int:
    marks = sorted([(f, 1) for f, e in zip(firsts, ends, strict=True) if f is not None and e is not None]
                   + [(e, -1) for f, e in zip(firsts, ends, strict=True) if f is not None and e is not None])  # fmt: skip
    cur = best = 0
    for _, d in marks:
        cur += d
        best = max(best, cur)
    return best


def _named(prefix: str, ps: dict[str, float | None]) -> dict[str, float | None]:
    return {f"{prefix}_{k}_ms": v for k, v in ps.items()}


def _post(url: str) -> None:
    httpx.post(url, timeout=5.0).raise_for_status()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _wait_http(url: str, proc: subprocess.Popen[bytes], limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{url}: the process exited")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{url} not ready within {limit_s}s")


@contextlib.contextmanager
def bench(params: Params, out: Path) -> Iterator[Bench]:
    b = Bench(params, out)
    try:
        b.start()
        yield b
    finally:
        b.close()


def run(params: Params, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    t_start = time.time()
    parts = set(params.parts)
    if "throughput" not in parts:
        params.throughput_streams = []
    if "open" not in parts:
        params.open_streams = []
    doc: dict[str, Any] = {
        "meta": {
            "mode": params.mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
            "cpus": os.cpu_count(), "python": sys.version.split()[0], "tandem_env": {**TANDEM_ENV, **params.env},
            "latency_resolution_ms": 1.0, "loadavg_start": round(os.getloadavg()[0], 2),
            "python_speed_start": python_speed(),
        },
        "params": asdict(params),
        "throughput": {}, "open_streams": {},
    }  # fmt: skip
    with bench(params, out) as b:
        doc["idle_cpu"] = b.idle_cpu()
        # Memory first, on fresh processes: after the throughput runs the heap keeps freed memory
        # that later streams reuse, and the RSS difference would undercount them.
        for n in params.open_streams:
            row: dict[str, Any] = {}
            for t in b.targets():
                log(f"open streams: {t.name}, {n}")
                row[t.name] = b.open_streams(t, n)
            doc["open_streams"][str(n)] = row
        for n in params.throughput_streams:
            row = {}
            for t in b.targets():
                log(f"throughput: {t.name}, {n} streams")
                row[t.name] = b.throughput(t, n)
            row["ratio"] = report.ratio(row["tandem"].get("events_per_s"), row["baseline"].get("events_per_s"))
            doc["throughput"][str(n)] = row
        doc["latency"] = {}
        for t in b.targets() if "latency" in parts else []:
            log(f"paced: {t.name}, {params.paced_streams} streams of {params.paced_rate:g} tokens/s")
            doc["latency"][t.name] = b.paced(t)
        doc["backlog"] = {}
        for t in b.targets() if "backlog" in parts else []:
            log(f"backlog: {t.name}, {params.backlog_tokens} tokens")
            doc["backlog"][t.name] = b.backlog(t)
        if params.profile and "profile" in parts:
            log("profile: py-spy on the API")
            doc["profile"] = b.profile()
    doc["meta"]["duration_s"] = round(time.time() - t_start, 1)
    doc["meta"]["loadavg_end"] = round(os.getloadavg()[0], 2)
    doc["meta"]["python_speed_end"] = python_speed()
    doc["targets"] = report.targets(doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.run", description="tandem vs the in-process baseline, in one run")
    ap.add_argument("--smoke", action="store_true", help="seconds, small numbers (CI)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--clients", type=int, default=None, help="load generator processes (default 1)")
    ap.add_argument("--streams", default=None, help="throughput concurrency levels, e.g. 1,100,1000")
    ap.add_argument("--open", default=None, help="open-stream counts for RSS, e.g. 1000,10000")
    ap.add_argument("--events", type=int, default=None, help="events per throughput run (tokens/stream = events/streams)")
    ap.add_argument("--paced-streams", type=int, default=None)
    ap.add_argument("--paced-rate", type=float, default=None, help="tokens/s per paced stream (default 20)")
    ap.add_argument("--only", default=None, help=f"comma-separated parts to run: {','.join(PARTS)} (default: all)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None, help="py-spy the API (full: on)")
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames: GC, syscalls); slows the API")
    ap.add_argument("--env", action="append", default=[], metavar="TANDEM_X=V", help="a setting for tandem's processes (repeatable)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the processes' logs and Redis's files (temp dir)")
    args = ap.parse_args(argv)
    params = SMOKE if args.smoke else FULL
    params.keep_logs = args.keep_logs
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("TANDEM_"):
            ap.error(f"--env: expected TANDEM_NAME=value, got {item!r}")
        params.env[key] = value
    params.profile_native = args.profile_native
    if args.clients:
        params.clients = args.clients
    if args.streams:
        params.throughput_streams = [int(x) for x in args.streams.split(",")]
    if args.open:
        params.open_streams = [int(x) for x in args.open.split(",")]
    if args.events:
        params.events_per_run = args.events
    if args.only:
        params.parts = [x for x in args.only.split(",") if x]
        unknown = set(params.parts) - set(PARTS)
        if unknown:
            ap.error(f"--only: unknown parts {sorted(unknown)}; known: {','.join(PARTS)}")
    if args.paced_streams:
        params.paced_streams = args.paced_streams
    if args.paced_rate:
        params.paced_rate = args.paced_rate
    if args.profile is not None:
        params.profile = args.profile
    args.out.mkdir(parents=True, exist_ok=True)
    raise_nofile()

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    doc = run(params, args.out, log)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    png = report.plot(doc, args.out / "bench.png")
    print(report.table(doc))
    missing, wrong = report.missing(doc), report.problems(doc)
    log(f"wrote {args.out / 'results.json'}" + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"))
    for problem in wrong:
        log(f"PROBLEM: {problem}")
    if missing:
        log(f"missing or non-numeric fields: {', '.join(missing)}")
    return 1 if missing or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
