"""Stopping the background tasks that components own (hub, readers, heartbeat, sweeper, lease,
pipe), and waiting for reads that were started together."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended.

    Only the task's own cancellation is absorbed: `suppress(CancelledError)` around `await task`
    would also swallow a cancellation of the caller, which must go on."""
    if task is None or task is asyncio.current_task():
        return
    if not task.done():
        task.cancel()
        await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: a crashed loop was already logged by its owner


async def settled(*started: Awaitable[Any] | None) -> list[Any]:
    """Per awaitable its result, or the exception it raised; None for None. They were started
    already, so waiting for them in turn costs no round trip more than the slowest, and no task
    each (as `asyncio.gather(return_exceptions=True)` would). If this is cancelled, those not
    waited for yet are closed."""
    out: list[Any] = []
    rest = iter(started)
    try:
        for aw in rest:
            try:
                out.append(await aw if aw is not None else None)
            except Exception as e:
                out.append(e)
    except BaseException:
        for aw in rest:
            if isinstance(aw, asyncio.Future):
                aw.cancel()
            elif aw is not None:
                aw.close()  # type: ignore[attr-defined]
        raise
    return out
