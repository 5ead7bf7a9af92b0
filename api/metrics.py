"""Prometheus metrics of one API process (each replica is scraped on its own)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

_SOURCE_KINDS = ("delta", "done", "error")
_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams_created = Counter("tandem_streams_created", "Streams created", registry=r)
        self.open_streams = Gauge("tandem_open_streams", "SSE connections open now", registry=r)
        self.events_sent = EventsSent()
        r.register(self.events_sent)
        self.resumes = Counter("tandem_resumes", "SSE connections that resumed with Last-Event-ID", registry=r)
        self.flush_reaction = Histogram(
            "tandem_flush_reaction_seconds", "B completion noticed -> flushed A backlog sent", buckets=_FAST, registry=r
        )
        self.first_delta = Histogram(
            "tandem_time_to_first_delta_seconds",
            "connection start -> first delta sent",
            buckets=(*_FAST, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.redis_errors = Counter("tandem_redis_errors", "Requests that failed because Redis did not answer", registry=r)
        self.rejected = Counter("tandem_rejected", "Requests refused with an error response", ["code"], registry=r)


class EventsSent(Collector):
    """tandem_events_sent_total{source,kind}, counted in a plain dict: this runs for every event,
    and a prometheus Counter takes a lock on each increment. Read at scrape time."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {
            (src, kind): 0
            for src, kinds in (("a", _SOURCE_KINDS), ("b", _SOURCE_KINDS), ("stream", ("end", "error")))
            for kind in kinds
        }

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("tandem_events_sent", "SSE events sent", labels=["source", "kind"])
        for (src, kind), n in list(self.counts.items()):
            family.add_metric([src, kind], n)
        yield family
