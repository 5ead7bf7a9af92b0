"""The baseline of issue 4: the simplest design, one process, no Redis, no durability.

FastAPI + sse-starlette; each stream is an ``asyncio.Queue`` fed by a producer task in the same
process that emits tokens exactly as the ``simulated`` task schedules them (same tokens, count,
``delay_ms`` and ``interval_ms``), A then B. The same request body and response shape as tandem's
``POST /v1/streams``; the same SSE events (``meta``, ``delta`` with ids, ``done``, ``end``), ids
shaped like tandem's (``a-<ms>-<seq>``, the millisecond the token was written), so one client
measures both. There is no pacing, no resume and nothing survives a restart: that is what tandem
adds, and what the benchmark prices.

Bench-only: ``POST /bench/hold`` makes new producers wait before their schedule starts and
``POST /bench/release`` lets them go, so every stream of a throughput run starts together (tandem's
workers are paused with SIGSTOP for the same purpose).

Run: ``python -m bench.baseline_server --port 8100`` (uvicorn, uvloop, httptools, one process).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from workers.tasks.simulated import derived_tokens, split_tokens

QUEUE_SIZE = 256


class IdClock:
    """Ids like a Redis stream's: the write millisecond and a sequence within it."""

    __slots__ = ("ms", "seq", "src")

    def __init__(self, src: str) -> None:
        self.src, self.ms, self.seq = src, 0, 0

    def next(self) -> str:
        ms = int(time.time() * 1000)
        if ms <= self.ms:
            self.seq += 1
        else:
            self.ms, self.seq = ms, 0
        return f"{self.src}-{self.ms}-{self.seq}"


class Stream:
    __slots__ = ("id", "meta", "queue", "task", "token")

    def __init__(self, stream_id: str, token: str, meta: dict[str, Any]) -> None:
        self.id, self.token, self.meta = stream_id, token, meta
        self.queue: asyncio.Queue[ServerSentEvent] = asyncio.Queue(QUEUE_SIZE)
        self.task: asyncio.Task[None] | None = None


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


def _tokens(prompt: str, opts: dict[str, Any]) -> list[str]:
    text = opts.get("text")
    return split_tokens(text) if text is not None else derived_tokens(prompt, int(opts.get("tokens", 30)))


async def produce(stream: Stream, prompt: str, a: dict[str, Any], b: dict[str, Any], released: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    await released.wait()
    created = loop.time()
    put = stream.queue.put
    for src, opts in (("a", a), ("b", b)):
        clock = IdClock(src)
        tokens = _tokens(prompt, opts)
        start = created + float(opts.get("delay_ms", 0)) / 1000
        interval = float(opts.get("interval_ms", 50)) / 1000
        for i, tok in enumerate(tokens):
            delay = start + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            # As the simulated task: no yield between tokens that are due (unpaced), so the bounded
            # queue is the only point where a producer gives way (see "Fairness" in PERFORMANCE.md).
            data = orjson.dumps({"source": src, "text": tok}).decode()
            await put(ServerSentEvent(data=data, event="delta", id=clock.next(), sep="\n"))
        done = orjson.dumps({"source": src, "tokens": len(tokens)}).decode()
        await put(ServerSentEvent(data=done, event="done", id=clock.next(), sep="\n"))
    await put(ServerSentEvent(data='{"status":"completed"}', event="end", id="end", sep="\n"))


def create_app() -> FastAPI:
    streams: dict[str, Stream] = {}
    released = asyncio.Event()
    released.set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gc.collect()
        gc.freeze()  # as tandem's API does after start-up
        yield
        for s in streams.values():
            if s.task is not None:
                s.task.cancel()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.post("/v1/streams", status_code=201)
    async def create_stream(request: Request) -> Response:
        body = orjson.loads(await request.body())
        prompt = str(body.get("prompt", ""))
        a = (body.get("a") or {}).get("options", {})
        b = (body.get("b") or {}).get("options", {})
        stream_id, token = secrets.token_urlsafe(16), secrets.token_urlsafe(32)
        meta = {
            "id": stream_id,
            "status": "running",
            "a": {"task": "simulated", "state": "running"},
            "b": {"task": "simulated", "state": "running"},
            "pacing": body.get("pacing") or {},
        }
        stream = Stream(stream_id, token, meta)
        stream.task = asyncio.create_task(produce(stream, prompt, a, b, released))
        streams[stream_id] = stream
        base = f"/v1/streams/{stream_id}"
        return _json(
            {
                "id": stream_id,
                "token": token,
                "events_url": f"{base}/events?token={token}",
                "status_url": f"{base}?token={token}",
            },
            201,
        )

    @app.get("/v1/streams/{stream_id}/events", response_model=None)
    async def stream_events(stream_id: str, token: str = "") -> Response:
        stream = streams.get(stream_id)
        if stream is None:
            return _json({"error": {"code": "stream_not_found", "message": "no such stream"}}, 404)
        if not secrets.compare_digest(token, stream.token):
            return _json({"error": {"code": "token_invalid", "message": "wrong token"}}, 403)

        async def body() -> AsyncIterator[ServerSentEvent]:
            try:
                yield ServerSentEvent(data=orjson.dumps(stream.meta).decode(), event="meta", sep="\n")
                get = stream.queue.get
                while True:
                    item = await get()
                    yield item
                    if item.event == "end":
                        return
            finally:
                # One reader per stream, no resume: the stream goes with its connection.
                if stream.task is not None:
                    stream.task.cancel()
                streams.pop(stream_id, None)

        return EventSourceResponse(body(), sep="\n", ping=15, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/bench/hold")
    async def hold() -> dict[str, bool]:
        released.clear()
        return {"held": True}

    @app.post("/bench/release")
    async def release() -> dict[str, bool]:
        released.set()
        return {"held": False}

    @app.get("/healthz")
    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    args = ap.parse_args()
    uvicorn.run(
        create_app(), host=args.host, port=args.port, loop="uvloop", http="httptools", access_log=False, log_level="warning"
    )


if __name__ == "__main__":
    main()
