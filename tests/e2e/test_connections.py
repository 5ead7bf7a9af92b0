"""With 1,000 open SSE streams, one API process holds a handful of Redis connections."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest
import redis

from shared.redis_server import RedisServer
from tests.client import create
from tests.harness import redis_connections, stack

pytestmark = pytest.mark.e2e

STREAMS = 1000


async def open_streams(base_port: int, paths: list[str]) -> tuple[list[asyncio.StreamWriter], int]:
    """Open SSE connections with raw sockets (cheap at this count); wait for each one's meta event."""
    writers: list[asyncio.StreamWriter] = []
    ok = 0

    async def one(path: str) -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection("127.0.0.1", base_port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"event: meta")
        if head.startswith(b"HTTP/1.1 200"):
            ok += 1
        writers.append(writer)

    for i in range(0, len(paths), 100):  # in waves, so the accept queue never overflows
        await asyncio.gather(*(one(p) for p in paths[i : i + 100]))
    return writers, ok


def test_1000_open_streams_hold_few_redis_connections(tmp_path: Path, redis_server: RedisServer) -> None:
    with stack(tmp_path, redis_server, apis=1, workers=1) as s:
        api = s.apis[0]
        base = api.url
        # Streams that stay open: A starts after a long delay, so every connection waits.
        body = {"prompt": "x", "a": {"task": "simulated", "options": {"tokens": 1, "delay_ms": 60_000}}}
        with httpx.Client(base_url=base, timeout=10) as c:
            handles = [c.post("/v1/streams", json=body).json() for _ in range(STREAMS)]
        r = redis.Redis.from_url(redis_server.url)
        before = redis_connections(r, "api", api.popen.pid)

        async def scenario() -> tuple[int, int]:
            writers, ok = await open_streams(api.port or 0, [h["events_url"] for h in handles])
            await asyncio.sleep(0.5)
            held = redis_connections(r, "api", api.popen.pid)
            metrics = (await asyncio.to_thread(httpx.get, base + "/metrics")).text
            assert "tandem_open_streams 1000.0" in metrics, [ln for ln in metrics.splitlines() if "open_streams" in ln]
            for w in writers:
                w.close()
            return ok, held

        ok, held = asyncio.run(scenario())
        status = Path(f"/proc/{api.popen.pid}/status").read_text()
        rss_kb = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS")))
        print(f"\n{ok} open SSE streams on one API process: {held} Redis connections (idle: {before}); API RSS {rss_kb / 1024:.0f} MiB")
        assert ok == STREAMS
        assert held <= 8
        # Still serving: a new stream completes while the others were open.
        h = create(base, {"prompt": "y", "a": {"task": "simulated", "options": {"tokens": 2, "interval_ms": 0}}})
        assert h["id"]
        r.close()
        assert os.path.exists(f"/proc/{api.popen.pid}")
