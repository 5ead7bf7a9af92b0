"""The body of one SSE response: feed -> pacer -> bytes, several ready events per send."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from shared.events import sse_message, sse_retry
from api.feed import Feed

# A flush of a long backlog goes out in sends of at most this many events, yielding to the loop
# between them, so one stream cannot hold the loop while its socket buffer fills.
MAX_EVENTS_PER_SEND = 256


async def event_stream(
    feed: Feed,
    meta_doc: dict[str, object],
    retry_ms: int,
    on_close: Callable[[], None],
    on_events: Callable[[list[object], float], None] | None = None,
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    pacer = feed.pacer
    try:
        yield sse_retry(retry_ms) + sse_message("meta", meta_doc)
        while True:
            feed.waker.clear()
            if feed.needs_fill():
                await feed.fill()
            now = loop.time()
            items, wake_at = pacer.poll(now, MAX_EVENTS_PER_SEND)
            if items:
                if on_events is not None:
                    on_events(items, now)  # type: ignore[arg-type]
                yield b"".join(item.sse() for item in items)
            if pacer.finished:
                return
            if wake_at is not None and wake_at <= loop.time():
                await asyncio.sleep(0)  # more is due now: let other streams have a turn first
                continue
            if feed.needs_fill():
                continue
            await feed.waker.wait(wake_at)
    finally:
        on_close()
