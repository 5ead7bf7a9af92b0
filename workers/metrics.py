"""A worker's own Prometheus metrics and its heartbeat, for `tandem stats`.

Several worker processes, on one host or many: each process serves its own ``/metrics`` on
``TANDEM_WORKER_METRICS_PORT`` (prometheus_client's ``start_http_server``, in a daemon thread) and
Prometheus scrapes each one as a target, as it does the API replicas. Per-process registries need no
shared directory, no clean-up of dead processes' files and work the same in containers, where every
worker has the same port on its own address. Prometheus multiprocess mode would merge only processes
of one host sharing a directory, and would lose the per-worker view. When the port is taken (several
workers on one host), the next free one of port+1..port+15 is used; each worker publishes its
address in its heartbeat, and `tandem stats` lists them.

``tandem_tokens_produced_total`` counts tokens as they are appended, not when a source ends: a
scrape during a long source sees it grow. It is computed at scrape time from the finished sources'
totals plus the running sources' live counts (the appender's), so the hot path adds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.asyncio import Redis

from shared.background import cancel_and_wait
from shared.keys import Keys
from shared.settings import Settings

log = logging.getLogger("tandem.worker")

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
PORT_ATTEMPTS = 16  # the configured port and the 15 after it
STALE_WORKERS_KEPT_MS = 3_600_000  # a worker silent this long is dropped from `tandem stats`


class Produced(Protocol):
    """What a running source exposes to the metrics: its appender's count so far."""

    @property
    def appended(self) -> int: ...


class SourceRun:
    """One source running on this worker. `end(outcome)` once; a run never ended (the job died
    on an unexpected error) is ended as `error` when it is garbage-collected."""

    __slots__ = ("__weakref__", "_ended", "_finalizer", "_metrics", "produced", "source", "started", "task")

    def __init__(self, metrics: WorkerMetrics, source: str, task: str, produced: Produced) -> None:
        self._metrics = metrics
        self.source, self.task, self.produced = source, task, produced
        self.started = time.monotonic()
        self._ended = False
        self._finalizer = weakref.finalize(self, metrics._abandoned, id(self), produced, source, task, self.started)

    def end(self, outcome: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._finalizer.detach()
        self._metrics._ended(id(self), self.produced, self.source, self.task, self.started, outcome)


class WorkerMetrics:
    """The metrics of one worker process, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()  # scrapes run on the HTTP server's thread
        self._tokens_done: dict[tuple[str, str], int] = defaultdict(int)
        self._running: dict[int, tuple[str, str, Produced]] = {}
        self.sources_done = 0
        self.duration = Histogram(
            "tandem_source_duration_seconds",
            "How long one source ran on a worker, start to its terminal entry",
            ["source", "task"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.outcomes = Counter(
            "tandem_source_outcomes",
            "Sources that ended on this worker, by outcome (done, an error code, cancelled, error)",
            ["source", "task", "outcome"],
            registry=self.registry,
        )
        self.registry.register(self)

    # -- the job's side ------------------------------------------------------------------------

    def start(self, source: str, task: str, produced: Produced) -> SourceRun:
        run = SourceRun(self, source, task, produced)
        with self._lock:
            self._running[id(run)] = (source, task, produced)
        return run

    @property
    def running(self) -> int:
        return len(self._running)

    def _ended(self, key: int, produced: Produced, source: str, task: str, started: float, outcome: str) -> None:
        with self._lock:
            self._running.pop(key, None)
            self._tokens_done[(source, task)] += produced.appended
            self.sources_done += 1
        self.duration.labels(source, task).observe(time.monotonic() - started)
        self.outcomes.labels(source, task, outcome).inc()

    def _abandoned(self, key: int, produced: Produced, source: str, task: str, started: float) -> None:
        self._ended(key, produced, source, task, started, "error")

    # -- the scrape's side (prometheus_client's Collector protocol) ----------------------------

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            totals = dict(self._tokens_done)
            running = list(self._running.values())
        live: dict[str, int] = defaultdict(int)
        for source, task, produced in running:
            totals[(source, task)] = totals.get((source, task), 0) + produced.appended
            live[source] += 1
        tokens = CounterMetricFamily(
            "tandem_tokens_produced", "Tokens (deltas) appended to Redis by this worker", labels=["source", "task"]
        )
        for (source, task), n in sorted(totals.items()):
            tokens.add_metric([source, task], n)
        yield tokens
        gauge = GaugeMetricFamily("tandem_sources_running", "Sources running on this worker now", labels=["source"])
        for source in ("a", "b"):
            gauge.add_metric([source], live.get(source, 0))
        yield gauge


_FALLBACK = WorkerMetrics()  # for a job run with a ctx that on_startup did not build (tests)


def source_run(ctx: dict[str, Any], source: str, task: str, produced: Produced) -> SourceRun:
    """Called by the job when a source starts producing; `run.end(outcome)` when it stops."""
    metrics: WorkerMetrics = ctx.get("metrics") or _FALLBACK
    return metrics.start(source, task, produced)


# -- the worker process: metrics endpoint and heartbeat ----------------------------------------


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve /metrics on `port`, or the first free one of the next PORT_ATTEMPTS - 1."""
    last: OSError | None = None
    for candidate in range(port, min(port + PORT_ATTEMPTS, 65536)):
        try:
            server, _thread = start_http_server(candidate, addr=host, registry=registry)
        except OSError as e:
            last = e
            continue
        return server, candidate
    raise OSError(f"no free port for worker metrics in {port}..{port + PORT_ATTEMPTS - 1}: {last}")


class WorkerOps:
    """The heartbeat `tandem stats` reads, and the metrics endpoint, of one worker process."""

    def __init__(self, redis: Redis, settings: Settings, worker_id: str, metrics: WorkerMetrics) -> None:
        self.redis, self.settings, self.worker_id, self.metrics = redis, settings, worker_id, metrics
        self.keys = Keys(settings.key_prefix)
        self.started_ms = int(time.time() * 1000)
        self.metrics_address: str | None = None
        self._server: WSGIServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        if s.worker_metrics_port:
            try:
                self._server, port = serve_metrics(self.metrics.registry, s.worker_metrics_host, s.worker_metrics_port)
            except OSError as e:
                log.warning("worker metrics not served", extra={"error": str(e)})
            else:
                self.metrics_address = f"{s.worker_metrics_host}:{port}"
                log.info("worker metrics served", extra={"address": self.metrics_address, "worker": self.worker_id})
        try:
            await self.beat()
        except Exception as e:  # Redis down at start-up: arq retries its own connection; keep trying in the loop
            log.warning("worker heartbeat failed", extra={"error": str(e)})
        self._task = asyncio.create_task(self._loop(), name="tandem-worker-heartbeat")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        with contextlib.suppress(Exception):
            async with self.redis.pipeline(transaction=True) as tx:
                tx.zrem(self.keys.workers, self.worker_id)
                tx.delete(self.keys.worker(self.worker_id))
                await tx.execute()
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()

    def info(self, now_ms: int) -> dict[str, Any]:
        return {
            "id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_ms": self.started_ms,
            "last_ms": now_ms,
            "running": self.metrics.running,
            "sources_done": self.metrics.sources_done,
            "metrics": self.metrics_address,
            "queue": self.settings.queue_name,
        }

    async def beat(self) -> None:
        now = int(time.time() * 1000)
        ttl_ms = int(self.settings.worker_heartbeat_s * 3000)
        async with self.redis.pipeline(transaction=True) as tx:
            tx.zadd(self.keys.workers, {self.worker_id: now})
            tx.set(self.keys.worker(self.worker_id), orjson.dumps(self.info(now)), px=ttl_ms)
            tx.zremrangebyscore(self.keys.workers, "-inf", now - STALE_WORKERS_KEPT_MS)
            await tx.execute()

    async def _loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.settings.worker_heartbeat_s)
            try:
                await self.beat()
                if failing:
                    log.info("worker heartbeat recovered", extra={"worker": self.worker_id})
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not failing:
                    log.warning("worker heartbeat failed", extra={"worker": self.worker_id, "error": str(e)})
                failing = True


async def start_worker_ops(ctx: dict[str, Any], settings: Settings) -> None:
    """From the worker's on_startup, after ctx["worker_id"] is set."""
    metrics = WorkerMetrics()
    ops = WorkerOps(ctx["redis"], settings, ctx["worker_id"], metrics)
    ctx["metrics"], ctx["ops"] = metrics, ops
    await ops.start()


async def stop_worker_ops(ctx: dict[str, Any]) -> None:
    ops: WorkerOps | None = ctx.get("ops")
    if ops is not None:
        await ops.stop()
