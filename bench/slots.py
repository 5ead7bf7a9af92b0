"""The API's cost per slow-pace slot, in one process: `--streams` open SSE bodies (api/sse.py) in
the slow phase (B running, A's backlog in Redis), each slot's delta written to a sink instead of a
socket, on uvloop and a private redis-server. Prints the CPU per slot sent.

`make bench` measures the slow phase only as part of a mixed load (a few per cent of its events),
where a change to it is lost in the machine's noise; this isolates it. Compare two versions of
the code by running this at each, alternately, in the same hour.

Run: ``python -m bench.slots --streams 1000 --seconds 6``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import uvloop
from redis.asyncio import Redis

from api.feed import Feed
from api.hub import Hub
from api.response import Liveness
from api.sse import event_stream
from shared.cursor import START
from shared.gcpolicy import tune_gc
from shared.mux import Mux
from shared.pacing import Pacer
from shared.redis_server import RedisServer
from shared.settings import Settings
from shared.store import Store

BACKLOG = 1000  # A's entries per stream, written before the bodies start: more than the run takes


class Sink:
    """Stands in for the connection's ChunkWriter: takes bytes at once, counts the writes."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def ready(self) -> bool:
        return True

    def write(self, chunk: bytes) -> None:
        self.n += 1


async def measure(url: str, streams: int, seconds: float, slow_s: float) -> dict[str, float]:
    settings = Settings(redis_url=url, key_prefix="slots", queue_name="slots:queue", _env_file=None)  # type: ignore[call-arg]
    redis = Redis.from_url(url)
    mux = Mux(redis.connection_pool, timeout_s=5.0)
    store = Store(redis, settings, mux)
    hub = Hub(Redis.from_url(url), "slots:hub", confirm_timeout_s=3.0)
    await hub.start()
    await asyncio.wait_for(hub.connected.wait(), 5.0)
    tasks: list[asyncio.Task[None]] = []
    sinks: list[Sink] = []
    try:
        for _ in range(streams):
            created = await store.create(prompt="p", tasks={"a": ("simulated", {}), "b": ("simulated", {})}, pacing={})
            sid = created.id
            await store.start(sid, "a", "bench")
            await store.start(sid, "b", "bench")
            await store.append(sid, "a", [f"t{i} " for i in range(BACKLOG)])
            feed = Feed(store, sid, START, Pacer(slow_s, 0.0), settings.read_batch, settings.slow_buffer)
            await hub.subscribe(store.keys.channel(sid), feed)
            live = Liveness(feed.waker)
            sink = Sink()
            live.writer = sink  # type: ignore[assignment]
            body = event_stream(feed, {"id": sid}, 1000, lambda: None, live=live, ping_s=60.0)
            sinks.append(sink)
            tasks.append(asyncio.create_task(drain(body, sink)))
        await asyncio.sleep(2 * slow_s + 0.5)  # past the first reads
        tune_gc()  # as the API's start-up does
        cpu0, sent0, young0 = time.process_time(), sum(s.n for s in sinks), gc.get_stats()[0]["collections"]
        await asyncio.sleep(seconds)
        cpu, sent = time.process_time() - cpu0, sum(s.n for s in sinks) - sent0
        young = gc.get_stats()[0]["collections"] - young0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await hub.stop()
        await mux.aclose()
        await redis.aclose()
    return {"slots": sent, "cpu_s": cpu, "us_per_slot": 1e6 * cpu / max(1, sent), "young_gcs": young}


async def drain(body: AsyncIterator[bytes], sink: Sink) -> None:
    async for _ in body:  # what the task sends itself (the first slots, after each read)
        sink.n += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--slow-ms", type=float, default=50.0, help="the slow interval (default 50 ms: 20 slots/s per stream)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), appendonly=False).start()
        try:
            r = uvloop.run(measure(server.url, args.streams, args.seconds, args.slow_ms / 1000))
        finally:
            server.stop()
    print(
        f"{args.streams} streams in the slow phase, {args.slow_ms:g} ms slots, {args.seconds:g} s: "
        f"{r['slots']:,} slots sent, CPU {r['cpu_s']:.2f} s, {r['us_per_slot']:.1f} µs per slot, "
        f"{r['young_gcs']} young GC collections"
    )
    if not r["slots"]:
        print("PROBLEM: no slot was sent")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
