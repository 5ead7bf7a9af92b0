"""Polls on demand: a worker polls arq's queue as soon as a job is enqueued or an abort requested,
not only every TANDEM_WORKER_POLL_DELAY_S.

The API publishes on ``<prefix>:jobs`` in the same MULTI/EXEC that enqueues a stream's jobs, and
with each abort (DELETE, ``tandem cancel``, an orphan). Each worker holds one pub/sub connection
to that channel and wakes its poll loop on every message. The poll itself is unchanged, so a
message lost (a reconnect, an outage) costs at most one poll interval, as before: the channel
only shortens the wait. Measured at 100 paced streams on the bench (poll delay 20 ms), the wait
for the next poll was half of a stream's time to first delta.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from redis.asyncio import Redis

from shared.background import cancel_and_wait
from shared.settings import Settings
from workers.lease import BACKOFF_MAX_S, REDIS_ERRORS

log = logging.getLogger("tandem.worker")

HEARD_S = 15.0  # a PING goes out after this long without a message; twice as long unheard: reconnect
BACKOFF_FIRST_S = 0.1


class Wakeup:
    """One pub/sub subscription to ``Keys.jobs``; `wake` is called for each message, and once
    each time the subscription is (re)made: a job enqueued while it was down is found then."""

    def __init__(self, settings: Settings, channel: str, wake: Callable[[], None], *, heard_s: float = HEARD_S) -> None:
        self._settings = settings
        self._channel = channel
        self._wake = wake
        self._heard_s = heard_s
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()  # the subscription is up
        self.subscriptions = 0  # times it was made

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tandem-worker-wakeup")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        backoff, logged = BACKOFF_FIRST_S, False
        while True:
            made = self.subscriptions
            try:
                await self._listen()
                continue  # it went silent: subscribe again at once
            except Exception as e:
                if self.subscriptions != made:  # it was up: a new outage
                    backoff, logged = BACKOFF_FIRST_S, False
                if not logged:  # once per outage
                    logged = True
                    if isinstance(e, REDIS_ERRORS):
                        log.info("job wake-ups unavailable; the worker polls on its timer until Redis answers", extra={"error": str(e) or type(e).__name__})
                    else:
                        log.warning("job wake-ups failed; the worker polls on its timer meanwhile", exc_info=True)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _listen(self) -> None:
        """Until the connection fails (raises) or goes silent (returns)."""
        name = f"tandem-worker:{socket.gethostname()}:{os.getpid()}"  # as its other connections
        # No socket timeout: the subscription waits for messages indefinitely; silence is
        # noticed by the PING below instead.
        redis = Redis.from_url(self._settings.effective_redis_url, socket_connect_timeout=2.0, client_name=name)
        try:
            async with redis.pubsub() as ps:
                await ps.subscribe(self._channel)
                loop = asyncio.get_running_loop()
                heard = loop.time()
                pinged = False
                while True:
                    msg = await ps.get_message(timeout=self._heard_s)
                    now = loop.time()
                    if msg is None:
                        if now - heard >= 2 * self._heard_s:
                            log.info("job wake-ups went silent; subscribing again")
                            return
                        if not pinged:
                            await ps.ping()
                            pinged = True
                        continue
                    heard, pinged = now, False
                    kind = msg.get("type")
                    if kind == "subscribe":
                        log.info("job wake-ups subscribed", extra={"channel": self._channel})
                        self.subscriptions += 1
                        self.subscribed.set()
                        self._wake()
                    elif kind == "message":
                        self._wake()
        finally:
            self.subscribed.clear()
            await redis.aclose()
