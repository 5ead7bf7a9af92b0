"""The FastAPI application factory: `create_app(settings)`; `tandem api` runs it under uvicorn."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arq.connections import ArqRedis
from fastapi import FastAPI
from redis.asyncio import BlockingConnectionPool, Redis

from api import errors
from api.demo import router as demo_router
from api.fastpath import EventsFastPath
from api.hub import Hub
from api.limits import BodyLimit
from api.metrics import ApiMetrics
from api.readers import ReaderCounts
from api.routes import State, router
from shared.gcpolicy import tune_gc
from shared.logs import setup_logging
from shared.mux import Mux
from shared.settings import Settings
from shared.store import Store
from workers.registry import load_registry
from workers.settings import serialize


def redis_clients(settings: Settings) -> tuple[ArqRedis, Redis]:
    """A bounded command pool for the whole process, and one connection for the hub."""
    name = f"tandem-api:{socket.gethostname()}:{os.getpid()}"  # CLIENT LIST shows who holds what
    common = {
        "client_name": name,
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": 2.0,
        "health_check_interval": 0,
    }
    pool = BlockingConnectionPool.from_url(
        settings.effective_redis_url, max_connections=settings.redis_pool_size, timeout=5, **common
    )
    commands = ArqRedis(connection_pool=pool, job_serializer=serialize)
    # No socket timeout on the hub's connection: it waits for announcements for as long as it likes.
    hub = Redis.from_url(settings.effective_redis_url, socket_connect_timeout=2.0, client_name=name)
    return commands, hub


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    setup_logging(settings)
    registry = load_registry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        commands, hub_client = redis_clients(settings)
        # The reads of every connecting reader share one multiplexed connection (shared/mux.py);
        # the pool serves the rest (creates, cancels, the reader counts).
        mux = Mux(commands.connection_pool, timeout_s=settings.redis_socket_timeout_s)
        store = Store(commands, settings, mux)
        hub = Hub(hub_client, store.keys.hub)
        await hub.start()
        readers = ReaderCounts(commands, store.keys, hub)  # readers per stream, for `tandem ls`
        await readers.start()
        app.state.tandem = state = State(settings, commands, store, hub, registry, ApiMetrics())
        state.open_streams.watch_sends(settings.sse_send_timeout_s, settings.sse_ping_s)
        tune_gc()  # thousands of open streams: rare full collections (tail latency)
        try:
            yield
        finally:
            await state.open_streams.stop()
            await readers.stop()
            await hub.stop()
            await mux.aclose()
            await commands.aclose()

    app = FastAPI(title="tandem", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    errors.install(app)
    app.include_router(router)
    app.include_router(demo_router)  # the demo page at /
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(EventsFastPath)  # GET .../events, without FastAPI's layers (api/fastpath.py)
    return app


def close_streams(app: FastAPI) -> int:
    """End every open SSE stream of this process now (on SIGTERM): each body ends cleanly and its
    client resumes on another replica with Last-Event-ID."""
    state = getattr(app.state, "tandem", None)
    return state.open_streams.close_all() if state is not None else 0
