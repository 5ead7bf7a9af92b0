"""How many SSE readers each stream has right now, published for `tandem ls` / `show` / `stats`.

Each API process already knows its open connections per stream: the hub's listeners per channel.
Once a second this process compares that with what it last published and writes only the change
(HSET/HDEL on its own hash ``<prefix>:readers:<api id>``), so a connect or a disconnect costs at most
one Redis write, a burst of them one pipeline, and an idle process nothing but a heartbeat every
HEARTBEAT_S (the hash's TTL, and the process's deadline in ``<prefix>:apis``). A process that dies
stops refreshing: readers of its streams stop counting when its deadline passes, and the hash
expires. Nothing is written per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time

from redis.asyncio import Redis

from api.hub import Hub
from shared.background import cancel_and_wait
from shared.keys import Keys

log = logging.getLogger("tandem.api")

INTERVAL_S = 1.0  # how stale "readers now" may be
HEARTBEAT_S = 10.0
TTL_S = 30.0  # a process silent this long is gone


def new_api_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class ReaderCounts:
    def __init__(self, redis: Redis, keys: Keys, hub: Hub, api_id: str | None = None) -> None:
        self.redis, self.keys, self.hub = redis, keys, hub
        self.api_id = api_id or new_api_id()
        self._published: dict[str, int] = {}
        self._full = True  # (re)write the whole hash: at start, and after a failed write
        self._last_beat = 0.0
        self._task: asyncio.Task[None] | None = None

    def snapshot(self) -> dict[str, int]:
        """Open SSE connections of this process, per stream id."""
        out: dict[str, int] = {}
        for channel, group in list(self.hub._listeners.items()):
            stream_id = self.keys.stream_id_from_key(channel)
            if stream_id is not None and group:
                out[stream_id] = out.get(stream_id, 0) + len(group)
        return out

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="tandem-readers")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        with contextlib.suppress(Exception):
            async with self.redis.pipeline(transaction=True) as tx:
                tx.zrem(self.keys.apis, self.api_id)
                tx.delete(self.keys.readers(self.api_id))
                await asyncio.wait_for(tx.execute(), 1.0)

    async def publish(self) -> None:
        now = time.monotonic()
        current = self.snapshot()
        beat = now - self._last_beat >= HEARTBEAT_S
        if self._full:
            changed, gone = current, [k for k in self._published if k not in current]
        else:
            changed = {k: v for k, v in current.items() if self._published.get(k) != v}
            gone = [k for k in self._published if k not in current]
        if not (changed or gone or beat or self._full):
            return
        key = self.keys.readers(self.api_id)
        ttl_ms = int(TTL_S * 1000)
        try:
            async with self.redis.pipeline(transaction=True) as tx:
                if self._full:
                    tx.delete(key)
                if gone and not self._full:
                    tx.hdel(key, *gone)
                if changed:
                    tx.hset(key, mapping=changed)  # type: ignore[arg-type]
                tx.pexpire(key, ttl_ms)
                wall = int(time.time() * 1000)
                tx.zadd(self.keys.apis, {self.api_id: wall + ttl_ms})
                tx.zremrangebyscore(self.keys.apis, "-inf", wall)
                await tx.execute()
        except Exception:
            self._full = True  # the hash may have expired meanwhile: rewrite it whole next time
            raise
        self._published, self._full, self._last_beat = current, False, now

    async def _loop(self) -> None:
        failing = False
        while True:
            try:
                await self.publish()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not failing:
                    log.warning("could not publish reader counts", extra={"error": str(e)})
                failing = True
            await asyncio.sleep(INTERVAL_S)
