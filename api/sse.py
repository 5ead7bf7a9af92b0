"""The body of one SSE response: feed -> pacer -> bytes, several ready events per send.

Faults, and what one connection does about them:
- Redis stops answering: the connection stays open (keepalive pings go on) and catches up once
  Redis is back: when the hub has resubscribed (it calls the feed's `on_resync`), or on a bounded
  backoff. A browser's EventSource would give up on a 503, so holding on beats closing.
- The server shuts down (SIGTERM): the body ends at once, cleanly; the client resumes elsewhere
  with Last-Event-ID (`Liveness`, closed by `OpenStreams.close_all`).
- The client stops reading: one send waits at most TANDEM_SSE_SEND_TIMEOUT_S (a per-process
  watchdog checks every second), then the connection is aborted, not merely closed (see
  `api.response.SSEResponse`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable

from api.feed import Feed
from api.hub import REDIS_DOWN
from api.response import ChunkWriter, Liveness
from shared.events import Event, sse_comment, sse_message, sse_retry

log = logging.getLogger("tandem.api")

# A flush of a long backlog goes out in sends of at most this many events, yielding to the loop
# between them, so one stream cannot hold the loop while its socket buffer fills.
MAX_EVENTS_PER_SEND = 256
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0
PING = sse_comment("ping")  # catch-up reads after a Redis error: doubling delay, bounded


async def event_stream(
    feed: Feed,
    meta_doc: dict[str, object],
    retry_ms: int,
    on_close: Callable[[], None],
    on_events: Callable[[list[object], float], None] | None = None,
    *,
    live: Liveness,
    ping_s: float,
    hub_connected: Callable[[], bool] | None = None,
    on_a_delta: Callable[[float], None] | None = None,
) -> AsyncIterator[bytes]:
    """`live`: closed when the client left or the process shuts down (the body ends at once; the
    client resumes elsewhere). `ping_s`: a comment line goes out when nothing else was sent for
    that long; the process's watchdog wakes the stream for it (`Liveness.ping_due`), so waiting
    for the next event arms no timer. `hub_connected`: whether the hub's pub/sub connection is
    up; while it is down, a failed catch-up read waits for the hub's resync instead of retrying
    on a timer. `on_events`: told of what goes out; `on_a_delta`, if given, instead of it for the
    single A deltas of the fast lane (`send_live`)."""
    loop = asyncio.get_running_loop()
    pacer = feed.pacer
    hold: float | None = None  # after a failed read: none before this loop time (inf: until the hub resyncs)
    held_at = 0  # feed.resyncs when the hold began: a resync since then ends it
    backoff = RETRY_MIN_S

    parked = False  # waiting for the feed's waker, with nothing half done: `deliver` may send
    parked_until: float | None = None  # the deadline of that wait
    # While parked for the pacer's next slot (A slowed while B runs: one delta per 250 ms on
    # every open stream), the slot is served by a timer callback (`tick`), as `deliver` serves
    # an announcement: the task is not woken, the events go out in the callback, and the timer
    # is armed again for the next slot. (Waking the task for each slot, a future, a task step and
    # the response's send chain, cost 35-40 µs per slot against 27-29: `python -m bench.slots`.)
    timer: asyncio.TimerHandle | None = None
    # `tick` re-arms itself through `arm`: through this variable, which the end of the response
    # clears, so the closures do not hold each other (and the feed, the connection) in a cycle.
    on_slot: Callable[[], None] | None = None

    def may_read() -> bool:
        return hold is None or loop.time() >= hold or feed.resyncs != held_at

    def due(now: float) -> tuple[bytes | None, float | None]:
        """What the pacer lets go at `now`, as one chunk (counted, and the keepalive clock reset),
        and when to ask again: for the task's sends and `deliver`'s alike."""
        items, wake_at = pacer.poll(now, MAX_EVENTS_PER_SEND)
        if not items:
            return None, wake_at
        if on_events is not None:
            on_events(items, now)  # type: ignore[arg-type]
        live.ping_due = now + ping_s
        return (items[0].sse() if len(items) == 1 else b"".join([item.sse() for item in items])), wake_at

    def writer_now() -> ChunkWriter | None:
        """The connection's writer, if the hub's callback may write to it now: the stream is
        parked (its task is not sending), open, and the connection takes bytes."""
        writer = live.writer
        return writer if parked and writer is not None and live.reason is None and writer.ready() else None

    def failed() -> None:
        # This runs in the hub's loop: a failure must cost this connection only (raised, the hub
        # would drop its Redis connection and resync every reader). What the pacer let go may not
        # have reached the client, so the response ends; the client resumes after what it got.
        log.warning("a send from the hub's callback failed; the response ends", exc_info=True)
        live.close("send_failed")

    def arm(at: float) -> None:
        """Serve the pacer's next slot at loop time `at` from `tick` (the task stays parked)."""
        nonlocal timer, parked_until
        if timer is not None:
            timer.cancel()
        if on_slot is not None:
            timer, parked_until = loop.call_at(at, on_slot), at

    def served(wake_at: float | None) -> None:
        """After a send from a callback: the task is woken if there is more to do than sending
        on time (a read, the end, more due now); else the next slot is timed from here."""
        nonlocal timer, parked_until
        if pacer.finished or feed.needs_fill() or (wake_at is not None and wake_at <= loop.time()):
            feed.waker.set()
        elif wake_at is not None:
            if timer is None and parked_until is not None:
                if wake_at < parked_until:
                    feed.waker.set()  # the task's own deadline (a read retry) is later: it decides
            elif wake_at != parked_until:
                arm(wake_at)
        elif timer is not None:
            timer.cancel()
            timer, parked_until = None, None

    def tick() -> None:
        """The pacer's slot has come while the task is parked (see `timer`): sent as an
        announcement's events are."""
        nonlocal timer, parked_until
        timer, parked_until = None, None
        deliver()

    def deliver() -> None:
        """The feed took in an announcement (in the hub's callback). While this stream is parked
        and its connection takes bytes now, what the pacer releases goes out from here: no task
        wake-up, no trip through the ASGI send chain, and the token leaves in the loop turn that
        brought it (at 20,000 paced tokens/s that was a third of the API's CPU). Anything else is
        the task's: it is woken when there is more to do than this, or sooner than it would wake."""
        writer = writer_now()
        if writer is None or feed.must_read_first():
            feed.waker.set()
            return
        try:
            chunk, wake_at = due(loop.time())
            if chunk is not None:
                writer.write(chunk)
        except Exception:
            failed()
            return
        served(wake_at)

    def send_live(event: Event) -> bool:
        """The feed's fast lane (`Feed.send`), for A's next event: when the pacer lets it through
        as it arrives (a delta while A flushes, nothing queued before it), it is written from the
        hub's callback while this stream is parked and its connection takes bytes, without being
        queued in the pacer and polled out again (a fifth of the API's work per live token).
        False: not now; the feed queues it as usual."""
        writer = writer_now()
        if writer is None:
            return False
        try:
            if feed.needs_fill() or not pacer.passes(event):
                return False
            now = loop.time()
            writer.write(event.sse())
            if on_a_delta is not None:
                on_a_delta(now)
            elif on_events is not None:
                on_events([event], now)
        except Exception:
            failed()
            return True
        live.ping_due = now + ping_s
        return True

    try:
        head = sse_retry(retry_ms) + sse_message("meta", meta_doc)
        first, _ = due(loop.time())  # what the request read already and the pacer lets go at once
        yield head + first if first is not None else head
        live.ping_due = loop.time() + ping_s
        feed.notify, feed.send = deliver, send_live
        on_slot = tick
        while True:
            if live.closed:
                return  # the client left, or resumes on another replica
            feed.waker.clear()
            if feed.needs_fill() and may_read():
                try:
                    await feed.fill()
                    hold, backoff = None, RETRY_MIN_S
                except REDIS_DOWN as e:
                    if hold is None:
                        log.debug("reader waits for Redis", extra={"error": str(e)})  # the hub logs the outage once
                    up = hub_connected() if hub_connected is not None else True
                    hold, held_at = (loop.time() + backoff if up else math.inf), feed.resyncs
                    backoff = min(backoff * 2, RETRY_MAX_S)
            now = loop.time()
            chunk, wake_at = due(now)
            if chunk is not None:
                yield chunk
            elif now >= live.ping_due:
                live.ping_due = now + ping_s
                yield PING
            if pacer.finished:
                return
            if wake_at is not None and wake_at <= loop.time():
                await asyncio.sleep(0)  # more is due now: let other streams have a turn first
                continue
            if feed.needs_fill() and may_read():
                continue
            deadline = None
            if hold is not None and hold != math.inf and feed.needs_fill():
                deadline = hold if wake_at is None else min(wake_at, hold)
            parked, parked_until = True, deadline
            if deadline is None and wake_at is not None:
                arm(wake_at)
            try:
                await feed.waker.wait(deadline)
            finally:
                parked, parked_until = False, None
                if timer is not None:
                    timer.cancel()
                    timer = None
    finally:
        on_slot = None  # (no timer is left: the wait's own `finally` cancels it)
        feed.notify, feed.send = feed.waker.set, None
        on_close()
